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
    check(prompt=tuple(range(CTX - 1)), max_new_tokens=1000, temperature=0.7, top_k=5, top_p=0.9,
          seed=2**63 - 1, stop_token_ids=(0, 99))


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ((), {}, "prompt is empty"),
        ((1, 100, 2), {}, "token id 100 at position 1 is outside the vocabulary [0, 100)"),
        ((-1,), {}, "token id -1 at position 0"),
        (tuple(range(CTX)), {}, "prompt has 32 tokens but the model's context is 32 tokens; shorten it"),
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
