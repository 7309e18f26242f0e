"""Request validation: each bad input names the value and the constraint."""

from __future__ import annotations

import math

import pytest

from stagemesh.errors import InvalidArgument
from stagemesh.serving.types import SamplingParams
from stagemesh.serving.validate import validate_request

V, CTX = 100, 32


def check(prompt=(1, 2, 3), **params):
    validate_request(prompt, SamplingParams(**params), vocab_size=V, max_model_len=CTX)


def test_good_request_passes():
    check()
    check(prompt=tuple(range(CTX - 1)), max_new_tokens=1, temperature=0.7, top_k=5, top_p=0.9,
          seed=2**63 - 1, stop_token_ids=(0, 99))
    check(prompt=(1, 2, 3), max_new_tokens=CTX - 3)  # exactly the context: allowed


def test_prompt_and_max_new_tokens_past_the_context_are_refused_not_cut():
    with pytest.raises(InvalidArgument) as info:
        check(prompt=(1, 2, 3), max_new_tokens=10**6)
    assert info.value.message == (
        "max_new_tokens=1000000 after a 3-token prompt asks for 1000003 tokens, but the model's context is 32; "
        "lower max_new_tokens to at most 29 (or shorten the prompt)")
    with pytest.raises(InvalidArgument, match="at most 29"):
        check(prompt=(1, 2, 3), max_new_tokens=CTX - 2)


def test_a_prompt_as_long_as_the_context_must_leave_room_for_one_token():
    with pytest.raises(InvalidArgument) as info:
        check(prompt=tuple(range(CTX)))
    assert info.value.message == ("prompt has 32 tokens and the model's context is 32 tokens; the prompt must leave "
                                  "room for at least one new token: shorten it to at most 31 tokens")


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ((), {}, "prompt is empty"),
        ((1, 100, 2), {}, "token id 100 at position 1 is outside the vocabulary [0, 100)"),
        ((-1,), {}, "token id -1 at position 0"),
        (tuple(range(CTX + 5)), {}, "prompt has 37 tokens and the model's context is 32 tokens"),
        ((1,), {"max_new_tokens": 0}, "max_new_tokens=0 must be > 0"),
        ((1,), {"temperature": -0.1}, "temperature=-0.1"),
        ((1,), {"temperature": math.inf}, "temperature=inf must be a finite number"),
        ((1,), {"temperature": math.nan}, "temperature=nan"),
        ((1,), {"top_k": -1}, "top_k=-1 must be >= 0"),
        ((1,), {"top_p": 0.0}, "top_p=0.0 must be in (0, 1]"),
        ((1,), {"top_p": 1.5}, "top_p=1.5"),
        ((1,), {"top_p": math.nan}, "top_p=nan"),
        ((1,), {"min_p": 1.5}, "min_p=1.5 must be in [0, 1] (0 turns it off)"),
        ((1,), {"min_p": "0.1"}, "min_p='0.1' must be a number"),
        ((1,), {"ignore_eos": 1}, "ignore_eos=1 must be true or false"),
        ((1,), {"seed": -1}, "seed=-1 must be in [0, 2**63)"),
        ((1,), {"seed": 2**63}, f"seed={2**63}"),
        ((1,), {"stop_token_ids": (5, 100)}, "stop token id 100 is outside the vocabulary"),
    ],
)
def test_bad_input_says_what_to_fix(prompt, params, message):
    with pytest.raises(InvalidArgument) as info:
        check(prompt=prompt, **params)
    assert message in info.value.message
    assert info.value.code == "INVALID_ARGUMENT"
