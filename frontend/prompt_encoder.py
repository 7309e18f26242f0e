"""Prompt text -> token ids for the frontend's APIs (gRPC and HTTP), without stalling its event loop.

Short prompts are tokenized inline (microseconds); long ones on a thread at a lower priority.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from stagemesh.errors import InvalidArgument
from stagemesh.tokenizer import Tokenizer, encode_prompt

INLINE_PROMPT_CHARS = 4096
"""Prompts up to this long are tokenized on the event loop (microseconds); longer ones on a
thread, which ``Tokenizer.encode`` lets run without the GIL, so other streams never stall."""
TOKENIZER_NICE = 10
"""NOTE: the tokenizer thread runs at a lower priority: a 3 MB prompt keeps a core busy for
seconds, and on a small host that core is one a stage worker's OpenMP team computes on."""


def encode_chat(tokenizer: Tokenizer, text: str, max_model_len: int | None = None) -> tuple[int, ...]:
    """Token ids of a rendered chat prompt, without special tokens added (the template has its own)."""
    plain = copy.copy(tokenizer)  # shares the backend; ``add_bos_token=False`` encodes without special tokens
    plain.add_bos_token = False
    return encode_prompt(plain, text, max_model_len)


def _lower_priority() -> None:
    with contextlib.suppress(OSError):  # not allowed, or not Linux: run at the normal priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), TOKENIZER_NICE)


class PromptEncoder:
    """Encodes completion prompts (with the tokenizer's BOS rule) and rendered chat prompts
    (without added special tokens); InvalidArgument when a prompt is empty or past the context."""

    def __init__(self, tokenizer: Tokenizer | None, max_model_len: int):
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="tokenize", initializer=_lower_priority)

    async def encode(self, text: str, *, chat: bool = False) -> tuple[int, ...]:
        if self.tokenizer is None:
            raise InvalidArgument("this model has no tokenizer.json, so it cannot take text: "
                                  "send token ids (the gRPC API's token_ids, or a list of ids as the prompt)")
        encode = encode_chat if chat else encode_prompt
        if len(text) <= INLINE_PROMPT_CHARS:
            return encode(self.tokenizer, text, self.max_model_len)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, encode, self.tokenizer, text, self.max_model_len)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
