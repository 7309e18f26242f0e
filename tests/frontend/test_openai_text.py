"""Stop strings across token and message boundaries, a choice's text however its tokens come,
and the server-sent-event framing of the answers."""

from __future__ import annotations

import json
import random

import pytest

from frontend.openai_choices import Choice
from frontend.openai_responses import SSE_DONE, Envelope, sse
from frontend.prompt_encoder import encode_chat
from frontend.stop_strings import StopMatcher
from frontend.stream import RequestStream
from stagemesh.cli.demo import write_tokenizer
from stagemesh.tokenizer import Tokenizer

TEXT = "The cat sat on the mat. ünïcode ✓ then STOP here, and more after STOP."


def feed(matcher: StopMatcher, pieces: list[str]) -> str:
    return "".join(matcher.push(p) for p in pieces) + matcher.flush()


def splits(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 12)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("stops", [["STOP"], ["mat.", "cat"], ["then STOP here"], ["nowhere"], ["✓ t"], ["T"]])
def test_the_text_is_cut_before_the_first_stop_however_it_is_split(stops):
    first = min((i for i in (TEXT.find(s) for s in stops) if i >= 0), default=len(TEXT))
    rng = random.Random(0)
    for _ in range(200):
        matcher = StopMatcher(stops)
        assert feed(matcher, splits(TEXT, rng)) == TEXT[:first]
        assert matcher.stopped == (first < len(TEXT))


def test_held_text_is_only_what_could_start_a_stop_string():
    matcher = StopMatcher(["STOP"])
    assert matcher.push("abcST") == "abc"  # "ST" could be the start of "STOP"
    assert matcher.push("x") == "STx"
    assert matcher.push("S") == ""
    assert matcher.push("TO") == ""
    assert matcher.push("P and more") == ""
    assert matcher.stopped and matcher.push("later") == "" and matcher.flush() == ""
    assert StopMatcher([]).push("all at once") == "all at once"
    with pytest.raises(ValueError):
        StopMatcher([""])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    root = tmp_path_factory.mktemp("tok")
    write_tokenizer(root, vocab_size=320, model_max_length=256)
    return Tokenizer.from_dir(root)


def run_choice(tokenizer, tokens: list[int], stops: list[str], batches: list[int], reason: str = "length"):
    """Feed ``tokens`` to a choice in batches of the given sizes; (text, finish_reason, tokens counted)."""
    stream = RequestStream(1, "r")
    choice = Choice(0, 0, stream, tokenizer, stops)
    out, i = [], 0
    for size in batches:
        batch, i = tokens[i:i + size], i + size
        if i >= len(tokens):
            stream.finish(reason)
        out.append(choice.take(batch, stream.ended))
        if choice.done:
            break
    return "".join(out), choice.finish_reason, choice.completion_tokens


def test_a_choice_gives_the_same_text_and_usage_however_its_tokens_are_batched(tokenizer):
    tokens = list(encode_chat(tokenizer, TEXT))  # byte-level BPE: ü and ✓ span several tokens
    whole = tokenizer.decode(tokens)
    assert whole == TEXT
    rng = random.Random(1)
    for stops, cut, reason in ((["STOP"], TEXT.index("STOP"), "stop"), (["✓"], TEXT.index("✓"), "stop"),
                               ([], len(TEXT), "length"), (["absent"], len(TEXT), "length")):
        results = set()
        for _ in range(30):
            sizes = [rng.randint(1, 6) for _ in range(len(tokens))]
            results.add(run_choice(tokenizer, tokens, stops, sizes))
        assert len(results) == 1, results
        text, finish, counted = results.pop()
        assert (text, finish) == (TEXT[:cut], reason)
        # usage counts the tokens up to the one that completed the stop string
        upto = [n for n in range(1, len(tokens) + 1) if any(s in tokenizer.decode(tokens[:n]) for s in stops)]
        assert counted == (upto[0] if reason == "stop" else len(tokens))


def test_a_stop_string_in_the_last_held_text_still_stops(tokenizer):
    tokens = list(encode_chat(tokenizer, "abc END"))
    assert run_choice(tokenizer, tokens, ["END"], [len(tokens)], "length") == ("abc ", "stop", len(tokens))


def test_server_sent_events_frame_each_document_and_end_with_done():
    env = Envelope("m", chat=True, id="chatcmpl-1", created=5)
    frames = [sse(env.role_chunk(0)), sse(env.chunk(0, "héllo", None)), sse(env.chunk(0, "", "stop")),
              sse(env.usage_chunk({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})), SSE_DONE]
    body = b"".join(frames).decode()
    events = body.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    docs = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    assert docs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert docs[1]["choices"][0]["delta"] == {"content": "héllo"} and docs[1]["object"] == "chat.completion.chunk"
    assert docs[2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert docs[3]["choices"] == [] and docs[3]["usage"]["total_tokens"] == 3
    assert {d["id"] for d in docs} == {"chatcmpl-1"}
    completion = Envelope("m", chat=False)
    assert completion.id.startswith("cmpl-") and completion.chunk(1, "x", None, usage_field=True) == {
        "id": completion.id, "object": "text_completion", "created": completion.created, "model": "m",
        "choices": [{"index": 1, "text": "x", "logprobs": None, "finish_reason": None}], "usage": None}
