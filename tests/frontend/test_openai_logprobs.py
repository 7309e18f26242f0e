"""``logprobs`` through the OpenAI API, driven by the real ``openai`` client over a stand-in link
(tests/frontend/test_openai_http.py): the legacy completions format and the chat format, streamed
and not, cut at a stop string like the text, and a token whose log-probability is not known."""

from __future__ import annotations

import asyncio

from frontend.prompt_encoder import encode_chat
from stagemesh.serving.types import TokenLogprobs
from tests.frontend.test_openai_http import client, model_dir, serving  # noqa: F401 (model_dir: a fixture)

TEXT = "Hello there, and then STOP and the rest."
UNKNOWN_AT = 3
"""The token the script sends without log-probabilities (as after a gateway restart)."""


def logprobs_of(i: int, token: int, top: int) -> TokenLogprobs:
    """Made-up log-probabilities of the i-th token: exact in float32, its own among the top."""
    own = -0.25 * (i % 4)
    return TokenLogprobs(own, tuple([(token, own), (token + 1, own - 1.0), (token + 2, own - 2.0)][:top]))


def speaking_with_logprobs(link, stream):
    async def script():
        tokens = list(encode_chat(link.tokenizer, TEXT))
        for i, token in enumerate(tokens):
            lp = None if i == UNKNOWN_AT else logprobs_of(i, token, stream.params.top_logprobs)
            stream.add(token, lp if stream.params.logprobs else None)
            stream.wake.set()
            await asyncio.sleep(0.001)
        stream.finish("length")
    return script()


def test_completions_logprobs_in_the_legacy_format_streamed_and_not(model_dir):  # noqa: F811
    async def main():
        async with serving(model_dir, speaking_with_logprobs) as (link, url):
            oa = client(url)
            args = dict(model="tiny", prompt="x", max_tokens=100, logprobs=2)
            whole = await oa.completions.create(**args)
            streamed = [c async for c in await oa.completions.create(**args, stream=True)]
            stopped = await oa.completions.create(**args, stop="STOP")
            plain = await oa.completions.create(model="tiny", prompt="x", max_tokens=100)
            return whole, streamed, stopped, plain, list(encode_chat(link.tokenizer, TEXT)), link.tokenizer

    whole, streamed, stopped, plain, tokens, tokenizer = asyncio.run(main())
    lp = whole.choices[0].logprobs
    texts = [tokenizer.decode([t], skip_special_tokens=False) for t in tokens]
    assert lp.tokens == texts and "".join(lp.tokens) == whole.choices[0].text == TEXT
    assert lp.text_offset == [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    for i, (token, text) in enumerate(zip(tokens, texts)):
        if i == UNKNOWN_AT:  # not known: null, and the answer still parses
            assert lp.token_logprobs[i] is None and lp.top_logprobs[i] is None
            continue
        assert lp.token_logprobs[i] == logprobs_of(i, token, 2).logprob
        # the two most likely, and the generated token (it is among them here)
        expected = {tokenizer.decode([t], skip_special_tokens=False): v for t, v in logprobs_of(i, token, 2).top}
        assert lp.top_logprobs[i] == expected
    pieces = [c.choices[0].logprobs for c in streamed if c.choices[0].logprobs is not None]
    assert [t for p in pieces for t in p.tokens] == lp.tokens
    assert [v for p in pieces for v in p.token_logprobs] == lp.token_logprobs
    assert [o for p in pieces for o in p.text_offset] == lp.text_offset  # offsets go on across chunks
    cut = stopped.choices[0]
    assert cut.text == TEXT[:TEXT.index("STOP")] and cut.logprobs.tokens == texts[:stopped.usage.completion_tokens]
    assert plain.choices[0].logprobs is None


def test_chat_logprobs_with_top_logprobs_streamed_and_not(model_dir):  # noqa: F811
    async def main():
        async with serving(model_dir, speaking_with_logprobs) as (link, url):
            oa = client(url)
            args = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=100, logprobs=True,
                        top_logprobs=3)
            whole = await oa.chat.completions.create(**args)
            streamed = [c async for c in await oa.chat.completions.create(**args, stream=True)]
            own_only = await oa.chat.completions.create(**{**args, "top_logprobs": None})
            return whole, streamed, own_only, list(encode_chat(link.tokenizer, TEXT)), link.tokenizer

    whole, streamed, own_only, tokens, tokenizer = asyncio.run(main())
    content = whole.choices[0].logprobs.content
    assert len(content) == len(tokens) and whole.choices[0].message.content == TEXT
    for i, (token, entry) in enumerate(zip(tokens, content)):
        text = tokenizer.decode([token], skip_special_tokens=False)
        assert entry.token == text and entry.bytes == list(text.encode())
        if i == UNKNOWN_AT:
            assert entry.logprob is None and entry.top_logprobs == []
            continue
        expected = logprobs_of(i, token, 3)
        assert entry.logprob == expected.logprob
        assert [(t.token, t.logprob) for t in entry.top_logprobs] == [
            (tokenizer.decode([t], skip_special_tokens=False), v) for t, v in expected.top]
    pieces = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in pieces] == [e.model_dump() for e in content]
    assert all(e.top_logprobs == [] for e in own_only.choices[0].logprobs.content)
