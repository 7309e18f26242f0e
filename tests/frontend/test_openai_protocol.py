"""OpenAI request bodies -> typed requests, and every refusal a 400 that names the problem."""

from __future__ import annotations

import asyncio
import random

import pytest

from frontend.openai_choices import start_choices
from frontend.openai_protocol import (
    COMPLETION_MAX_TOKENS,
    ApiError,
    max_new_tokens,
    parse_chat,
    parse_completion,
)
from frontend.stream import RequestStream
from stagemesh.config import ModelConfig
from stagemesh.errors import InvalidArgument, ResourceExhausted, Unavailable

CONFIG = ModelConfig.from_dict({
    "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 8, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 16, "max_position_embeddings": 64,
})


class Link:
    """Records submissions; nothing comes back."""

    def __init__(self):
        self.submitted: list[RequestStream] = []

    def submit(self, request_id, prompt, params, resume_from=None):
        self.submitted.append(RequestStream(len(self.submitted) + 1, request_id, prompt, params))
        return self.submitted[-1]


def refusal(parse, body) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse(body)
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize("prompt, expected", [
    ("hi", ("hi",)),
    (["a", "b"], ("a", "b")),
    ([1, 2, 3], ((1, 2, 3),)),
    ([[1, 2], [3]], ((1, 2), (3,))),
    (["a", [3]], ("a", (3,))),
])
def test_a_prompt_is_text_token_ids_or_a_list_of_either(prompt, expected):
    assert parse_completion({"prompt": prompt}).prompts == expected


@pytest.mark.parametrize("prompt", [None, [], ["a", 1], [[1], 2], [True, 2], [[]], [[1, "a"]], 5])
def test_other_prompts_are_refused_naming_the_field(prompt):
    err = refusal(parse_completion, {"prompt": prompt})
    assert err.param == "prompt" and "prompt must be" in err.message


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "x", "logprobs": 21}, "logprobs", "logprobs=21 must be an integer in [0, 20]"),
    ({"prompt": "x", "logprobs": True}, "logprobs", "must be an integer in [0, 20]"),
    ({"prompt": "x", "echo": True}, "echo", "echo is not supported"),
    ({"prompt": "x", "suffix": "y"}, "suffix", "suffix is not supported"),
    ({"prompt": "x", "best_of": 3}, "best_of", "best_of is not supported"),
    ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty", "not supported yet"),
    ({"prompt": "x", "logit_bias": {"5": 1}}, "logit_bias", "not supported yet"),
    ({"prompt": "x", "n": 0}, "n", "n=0 must be an integer in [1, 128]"),
    ({"prompt": "x", "n": "2"}, "n", "must be an integer"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens=0 must be an integer >= 1"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens", "must be an integer"),
    ({"prompt": "x", "stream": "yes"}, "stream", "stream='yes' must be true or false"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream=true"),
    ({"prompt": "x", "stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options",
     "must be an object like"),
    ({"prompt": "x", "stop": ""}, "stop", "non-empty string"),
    ({"prompt": "x", "stop": [1]}, "stop", "non-empty string"),
    ({"prompt": "x", "stop": ["a"] * 17}, "stop", "at most 16"),
    ({"prompt": "x", "stop_token_ids": [1.5]}, "stop_token_ids", "list of integers"),
    ({"prompt": "x", "model": 3}, "model", "model must be a string"),
    ({"prompt": "x", "temprature": 1}, "temprature", "unrecognized request argument 'temprature'"),
])
def test_completion_refusals_name_the_field_and_what_to_do(body, param, words):
    err = refusal(parse_completion, body)
    assert err.param == param and words in err.message, err.message
    assert err.body() == {"error": {"message": err.message, "type": "invalid_request_error", "param": param,
                                    "code": None}}


def test_sampling_fields_keep_their_names_and_defaults_stay():
    req = parse_completion({"prompt": "x", "temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "seed": 3,
                            "stop_token_ids": [7], "ignore_eos": True, "n": 2, "stop": "end", "stream": True,
                            "stream_options": {"include_usage": True}, "frequency_penalty": 0, "user": "me"})
    p, o = req.options.params, req.options
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed, p.stop_token_ids, p.ignore_eos) == (
        0.7, 0.9, 5, 0.1, 3, (7,), True)
    assert (o.n, o.stops, o.stream, o.include_usage, o.max_tokens) == (2, ("end",), True, True, None)
    default = parse_completion({"prompt": "x", "stop": None, "n": None, "temperature": None}).options
    assert default.stops == () and default.n == 1
    assert default.params.temperature == 1.0  # OpenAI's default, where the gRPC API's is greedy
    greedy = parse_chat({"messages": [{"role": "user", "content": "x"}], "temperature": 0}).options
    assert greedy.params.temperature == 0


def test_logprobs_become_sampling_parameters():
    def params(parse, **body):
        base = {"prompt": "x"} if parse is parse_completion else {"messages": [{"role": "user", "content": "x"}]}
        p = parse({**base, **body}).options.params
        return p.logprobs, p.top_logprobs

    assert params(parse_completion) == (False, 0)
    assert params(parse_completion, logprobs=None) == (False, 0)
    assert params(parse_completion, logprobs=0) == (True, 0)  # the generated token's own only
    assert params(parse_completion, logprobs=20) == (True, 20)
    assert params(parse_chat, logprobs=False) == (False, 0)
    assert params(parse_chat, logprobs=True) == (True, 0)
    assert params(parse_chat, logprobs=True, top_logprobs=5) == (True, 5)
    assert params(parse_chat, logprobs=False, top_logprobs=0) == (False, 0)


def test_max_tokens_past_the_context_is_a_400_that_says_so_and_defaults_fit():
    opts = parse_completion({"prompt": "x", "max_tokens": 20}).options
    assert max_new_tokens(opts, 44, 64) == 20
    with pytest.raises(ApiError) as caught:
        max_new_tokens(opts, 45, 64)
    err = caught.value
    assert (err.status, err.param, err.code) == (400, "max_tokens", "context_length_exceeded")
    assert "context is 64 tokens, but 65 were asked for (45 in the prompt, max_tokens=20" in err.message
    default = parse_completion({"prompt": "x"}).options
    assert max_new_tokens(default, 10, 64) == COMPLETION_MAX_TOKENS
    assert max_new_tokens(default, 60, 64) == 4  # OpenAI's default of 16, cut where the context ends
    chat = parse_chat({"messages": [{"role": "user", "content": "x"}]}).options
    assert max_new_tokens(chat, 10, 64) == 54  # chat: the rest of the context


def test_chat_messages_as_a_template_reads_them():
    req = parse_chat({"messages": [
        {"role": "system", "content": "be brief", "name": None},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ], "max_completion_tokens": 5, "max_tokens": 9, "chat_template_kwargs": {"enable_thinking": False}})
    assert req.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]
    assert req.options.max_tokens == 5 and req.template_kwargs == {"enable_thinking": False}


@pytest.mark.parametrize("body, param, words", [
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": [{"content": "x"}]}, "messages", "messages[0] must be an object with a string role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages",
     "'image_url' content part"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages", "content must be a string"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": 3}, "logprobs", "must be true or false"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs", "needs logprobs=true"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs",
     "top_logprobs=21 must be an integer in [0, 20]: the mesh returns the log-probabilities of at most 20"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools", "tools are not"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
     "response_format", "not supported yet"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}, "max_completion_tokens",
     "max_completion_tokens=-1 must be an integer >= 1"),
    ({"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo", "unrecognized request argument"),
])
def test_chat_refusals_name_the_field(body, param, words):
    err = refusal(parse_chat, body)
    assert err.param == param and words in err.message, err.message


def test_mesh_statuses_become_http_statuses():
    assert ApiError.from_mesh(InvalidArgument("x")).status == 400
    err = ApiError.from_mesh(ResourceExhausted("queue full"))
    assert err.status == 429 and err.body()["error"] == {"message": "queue full", "type": "rate_limit_error",
                                                         "param": None, "code": "resource_exhausted"}
    assert err.headers == {"Retry-After": "1"}  # the gRPC API's pushback: a full queue has room soon
    verdict, own = ApiError.from_mesh(Unavailable("no chain")), ApiError.from_mesh(Unavailable("x"), final=False)
    assert verdict.status == own.status == 503
    assert verdict.headers == {"x-should-retry": "false"} and own.headers == {}  # another frontend may serve


def test_each_sequence_gets_its_seed_and_a_bad_prompt_submits_nothing():
    async def main():
        link = Link()
        opts = parse_completion({"prompt": "x", "n": 3, "seed": 7, "max_tokens": 4}).options
        choices = start_choices(link, None, CONFIG, [(1, 2), (3,)], opts, random.Random(0))
        seeds = [s.params.seed for s in link.submitted]
        drawn = parse_completion({"prompt": "x", "n": 3}).options
        start_choices(link, None, CONFIG, [(1,)], drawn, random.Random(0))
        bad = parse_completion({"prompt": "x", "temperature": -1}).options
        before = len(link.submitted)
        with pytest.raises(InvalidArgument, match="temperature=-1 must be a finite number >= 0"):
            start_choices(link, None, CONFIG, [(1,)], bad, random.Random(0))
        with pytest.raises(InvalidArgument, match="prompt token id 100"):
            start_choices(link, None, CONFIG, [(1,), (100,)], opts, random.Random(0))
        return choices, seeds, link.submitted[6:], before, len(link.submitted)

    choices, seeds, drawn, before, after = asyncio.run(main())
    assert seeds == [7, 8, 9, 7, 8, 9] and [c.index for c in choices] == list(range(6))
    assert [c.prompt_index for c in choices] == [0, 0, 0, 1, 1, 1]
    assert all(s.params.max_new_tokens == COMPLETION_MAX_TOKENS for s in drawn)
    assert len({s.params.seed for s in drawn}) == 3 and all(s.params.seed is not None for s in drawn)
    assert before == after  # refused before anything went to the gateway
