"""The OpenAI-compatible HTTP API of a frontend (aiohttp handlers).

    GET  /v1/models             the one model this mesh serves (also /v1/models/{id})
    POST /v1/completions        prompt as text, token ids, or a list of either; n sequences per prompt
    POST /v1/chat/completions   messages through the checkpoint's chat template
    GET  /health                200 while linked to a gateway that can serve, else 503 saying why
    GET  /version               {"version": stagemesh's}

Each request goes to the gateway over the frontend's link as the gRPC ``Generate`` does
(``frontend.servicer``): tokenized here (long prompts off the loop), validated, seeded, one mesh
request per choice. Streaming answers are server-sent events; the HTTP status waits for the
first news, so a request the mesh refuses (queue full, no chain) gets 429 / 503 like a
non-streamed one. A client that disconnects cancels its requests (the server cancels the
handler: ``handler_cancellation``, ``frontend.http``).
"""

from __future__ import annotations

import json
import random

from aiohttp import web

import stagemesh
from frontend.chat_template import ChatTemplate
from frontend.link import GatewayLink
from frontend.openai_choices import ChoiceRun, start_choices, token_counts
from frontend.openai_protocol import ApiError, Options, bad, parse_chat, parse_completion
from frontend.openai_responses import SSE_DONE, Envelope, sse, usage
from frontend.prompt_encoder import PromptEncoder
from stagemesh.config import ModelConfig
from stagemesh.tokenizer import Tokenizer

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class OpenAIApi:
    """The routes above, over one frontend's link to the gateway."""

    def __init__(self, link: GatewayLink, tokenizer: Tokenizer | None, config: ModelConfig, model_name: str,
                 template: ChatTemplate):
        self.link, self.tokenizer, self.config = link, tokenizer, config
        self.model_name, self.template = model_name, template
        self.encoder = PromptEncoder(tokenizer, config.max_position_embeddings)
        self._rng = random.SystemRandom()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", self.version)

    def close(self) -> None:
        self.encoder.close()

    # --- documents ------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        self._check_model(request.match_info["model"])
        return web.json_response(self._model_card())

    async def health(self, request: web.Request) -> web.Response:
        if not self.link.connected.is_set():
            raise ApiError(503, f"this frontend has no link to the gateway at {self.link.address}; retry shortly",
                           code="unavailable")
        if not self.link.can_serve:
            raise ApiError(503, "the gateway has no chain in service; retry shortly", code="unavailable")
        return web.json_response({"status": "ok"})

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": stagemesh.__version__})

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "stagemesh",
                "max_model_len": self.config.max_position_embeddings}

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this mesh serves {self.model_name!r}",
                           param="model", code="model_not_found")

    # --- generation -----------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = parse_completion(await _body(request))
        self._check_model(req.options.model)
        prompts = [await self.encoder.encode(p) if isinstance(p, str) else p for p in req.prompts]
        return await self._answer(request, prompts, req.options, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req = parse_chat(await _body(request))
        self._check_model(req.options.model)
        text = self.template.render(req.messages, add_generation_prompt=True, extra=req.template_kwargs)
        prompt = await self.encoder.encode(text, chat=True)
        return await self._answer(request, [prompt], req.options, chat=True)

    async def _answer(self, request: web.Request, prompts: list, options: Options, *, chat: bool
                      ) -> web.StreamResponse:
        if self.tokenizer is None:
            raise bad("this model has no tokenizer.json, and the OpenAI API answers text; use the gRPC API")
        choices = start_choices(self.link, self.tokenizer, self.config, prompts, options, self._rng, chat=chat)
        run = ChoiceRun(self.link, choices)
        envelope = Envelope(options.model or self.model_name, chat)
        try:
            if options.stream:
                return await _stream(request, run, envelope, options.include_usage)
            return await _whole(run, envelope)
        finally:
            run.close()


async def _whole(run: ChoiceRun, envelope: Envelope) -> web.Response:
    """Every choice's whole text; the first error fails the call (the others are cancelled)."""
    texts = {c.index: [] for c in run.choices}
    entries = {c.index: [] for c in run.choices}
    while (news := await run.next()) is not None:
        choice, text, tokens = news
        if choice.error is not None:
            raise ApiError.from_mesh(choice.error, final=choice.stream.final)
        texts[choice.index].append(text)
        entries[choice.index] += tokens
    choices = [(c.index, "".join(texts[c.index]), c.finish_reason,
                c.logprobs.section(entries[c.index]) if c.logprobs is not None else None) for c in run.choices]
    return web.json_response(envelope.whole(choices, usage(*token_counts(run.choices))))


async def _stream(request: web.Request, run: ChoiceRun, envelope: Envelope, include_usage: bool
                  ) -> web.StreamResponse:
    """Server-sent events: (chat) each choice's role, then text pieces as they come, each choice's
    finish_reason once, (``include_usage``) the usage, then ``[DONE]``. An error before the first
    piece is the call's HTTP status; after it, an ``{"error": ...}`` event ends the stream."""
    news = await run.next()
    if news is not None and news[0].error is not None:
        raise ApiError.from_mesh(news[0].error, final=news[0].stream.final)
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    if envelope.chat:
        for choice in run.choices:
            await response.write(sse(envelope.role_chunk(choice.index, usage_field=include_usage)))
    failed = False
    while news is not None and not failed:
        choice, text, tokens = news
        failed = choice.error is not None
        if failed:
            await response.write(sse(ApiError.from_mesh(choice.error, final=choice.stream.final).body()))
        else:
            logprobs = choice.logprobs.section(tokens) if choice.logprobs is not None and tokens else None
            await response.write(sse(envelope.chunk(choice.index, text, choice.finish_reason,
                                                    usage_field=include_usage, logprobs=logprobs)))
            news = await run.next()
    if include_usage and not failed:
        await response.write(sse(envelope.usage_chunk(usage(*token_counts(run.choices)))))
    await response.write(SSE_DONE)
    await response.write_eof()
    return response


async def _body(request: web.Request):
    try:
        return json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise bad(f"the request body is not valid JSON: {err}") from None
