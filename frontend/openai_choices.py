"""The choices of one OpenAI request: each a request of its own on the mesh, its tokens turned
into text (stop strings cut), and all of them merged into one flow of news for the HTTP writer.

NOTE: with stop strings, tokens are detokenized one at a time, so the count of tokens up to the
stop (the usage) is the same however the gateway's messages split them (4.4 µs a token with one
stop string against 2.2 µs, measured on the 2-core dev host); without, a message's tokens are
detokenized in one go. A choice that reaches a stop string is cancelled on the
gateway at once (its KV cache freed); one whose client left is cancelled by ``ChoiceRun.close``.
With logprobs, each piece of news carries the log-probabilities of the tokens it consumed (up to
the one that completed a stop string), so its tokens and their text go out together.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from array import array
from collections.abc import Sequence

from frontend.link import GatewayLink
from frontend.openai_logprobs import Entry, LogprobsWriter
from frontend.openai_protocol import Options, max_new_tokens
from frontend.stop_strings import StopMatcher
from frontend.stream import RequestStream
from stagemesh.config import ModelConfig
from stagemesh.errors import StagemeshError
from stagemesh.serving.params import MAX_SEED, SamplingParams, with_seed
from stagemesh.serving.validate import validate_request
from stagemesh.tokenizer import IncrementalDecoder, Tokenizer


class Choice:
    """One sequence: its stream from the gateway, its text decoder and stop matcher, its end."""

    def __init__(self, index: int, prompt_index: int, stream: RequestStream, tokenizer: Tokenizer,
                 stops: Sequence[str], *, chat: bool = False):
        self.index = index
        """Its place in the answer's ``choices``: prompt number × n + sequence number."""
        self.prompt_index = prompt_index
        self.stream = stream
        self.completion_tokens = 0
        """Tokens generated, up to the one that completed a stop string."""
        self.finish_reason: str | None = None
        self.error: StagemeshError | None = None
        self._decoder = IncrementalDecoder(tokenizer)
        self._matcher = StopMatcher(stops)
        self.logprobs = LogprobsWriter(tokenizer, chat=chat) if stream.logprobs is not None else None
        """Its ``logprobs`` sections, when the request asked for them."""

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def take(self, tokens: list[int], ended: bool) -> str:
        """The text these tokens add that may go out; ``ended``: the stream's end came with them."""
        text = self._text(tokens)
        if self._matcher.stopped:
            self.finish_reason = "stop"
        elif ended and self.stream.error is not None:
            self.error = self.stream.error
        elif ended:
            text += self._matcher.push(self._decoder.flush())
            text += self._matcher.flush()
            self.finish_reason = "stop" if self._matcher.stopped else self.stream.finish_reason
        return text

    def _text(self, tokens: list[int]) -> str:
        if not self._matcher.stops:
            self.completion_tokens += len(tokens)
            return self._decoder.push_many(tokens) if tokens else ""
        out = []
        for token in tokens:
            self.completion_tokens += 1
            out.append(self._matcher.push(self._decoder.push(token)))
            if self._matcher.stopped:
                break
        return "".join(out)


def start_choices(link: GatewayLink, tokenizer: Tokenizer, config: ModelConfig, prompts: Sequence[Sequence[int]],
                  options: Options, rng: random.Random, *, chat: bool = False) -> list[Choice]:
    """Submit ``options.n`` sequences of each prompt; InvalidArgument (before anything is
    submitted) when a prompt or the parameters are wrong."""
    context = config.max_position_embeddings
    params = []
    for ids in prompts:
        p = dataclasses.replace(options.params, max_new_tokens=max_new_tokens(options, len(ids), context))
        validate_request(ids, p, vocab_size=config.vocab_size, max_model_len=context)
        params.append(p)
    choices = []
    for i, (ids, p) in enumerate(zip(prompts, params)):
        prompt = array("q", ids)
        for j in range(options.n):
            stream = link.submit(uuid.uuid4().hex, prompt, _seeded(p, j, rng))
            choices.append(Choice(i * options.n + j, i, stream, tokenizer, options.stops, chat=chat))
    return choices


def token_counts(choices: Sequence[Choice]) -> tuple[int, int]:
    """(prompt tokens, each prompt counted once as its n sequences share it; generated tokens)."""
    prompts = {c.prompt_index: len(c.stream.prompt) for c in choices}
    return sum(prompts.values()), sum(c.completion_tokens for c in choices)


def _seeded(params: SamplingParams, j: int, rng: random.Random) -> SamplingParams:
    """Sequence ``j``'s parameters: the request's seed + j (modulo the seed range), or a seed drawn."""
    if params.seed is None:
        return with_seed(params, rng)
    return dataclasses.replace(params, seed=(params.seed + j) % MAX_SEED)


class ChoiceRun:
    """Reads every choice's stream and hands out (choice, new text, its tokens' logprobs) as news
    comes, a choice's end once; ``close`` cancels on the gateway what has not ended (the client left)."""

    def __init__(self, link: GatewayLink, choices: list[Choice]):
        self.link, self.choices = link, choices
        self._news: asyncio.Queue[tuple[Choice, str, list[Entry]]] = asyncio.Queue()
        self._open = len(choices)
        self._tasks = [asyncio.create_task(self._pump(c), name=f"choice-{c.index}") for c in choices]

    async def next(self) -> tuple[Choice, str, list[Entry]] | None:
        """The next (choice, text, entries) — ``choice.done`` on its last —, or None once every
        choice ended. ``entries``: (token, its logprobs) of the tokens this text came from, when
        the request asked for logprobs; [] otherwise."""
        if self._open == 0:
            return None
        choice, text, entries = await self._news.get()
        self._open -= choice.done
        return choice, text, entries

    async def _pump(self, choice: Choice) -> None:
        stream = choice.stream
        while not choice.done:
            index, tokens = await stream.next_tokens()
            before = choice.completion_tokens
            text = choice.take(tokens, stream.ended)
            entries = []
            if choice.logprobs is not None:  # the tokens consumed: up to a stop string's last
                used = choice.completion_tokens - before
                entries = list(zip(tokens[:used], stream.logprobs_of(index, used)))
            if text or entries or choice.done:
                self._news.put_nowait((choice, text, entries))
        if not choice.stream.ended:  # stopped by a stop string: the gateway stops it now
            self.link.cancel(choice.stream)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for choice in self.choices:
            if not choice.done:  # a done one ended on the gateway, or its pump stopped it there
                self.link.cancel(choice.stream)
