"""OpenAI's answer documents: whole completions, streamed chunks, usage, and their framing as
server-sent events (``data: {json}`` and a blank line each, ``data: [DONE]`` last)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

SSE_DONE = b"data: [DONE]\n\n"


def sse(document: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``document``."""
    return b"data: " + json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True)
class Envelope:
    """What every document of one answer shares, and how each kind is shaped (completion or chat)."""

    model: str
    chat: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        if not self.id:
            object.__setattr__(self, "id", f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}")

    def whole(self, choices: list[tuple[int, str, str, dict | None]], used: dict[str, int]) -> dict[str, Any]:
        """The non-streamed answer: ``choices`` as (index, text, finish_reason, logprobs section or
        None), in index order."""
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [self._whole_choice(*c) for c in choices], "usage": used}

    def chunk(self, index: int, text: str, finish_reason: str | None, *, usage_field: bool = False,
              logprobs: dict | None = None) -> dict[str, Any]:
        """A streamed piece of choice ``index``: new text, and its finish_reason on its last piece.
        ``usage_field``: with ``"usage": null``, as OpenAI sends when the last chunk will carry it.
        ``logprobs``: the section of this piece's tokens (``frontend.openai_logprobs``)."""
        if self.chat:
            piece = {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                     "finish_reason": finish_reason}
        else:
            piece = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._chunk([piece], usage_field)

    def role_chunk(self, index: int, *, usage_field: bool = False) -> dict[str, Any]:
        """A chat choice's first streamed piece: the assistant's role (and no text yet)."""
        piece = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}
        return self._chunk([piece], usage_field)

    def usage_chunk(self, used: dict[str, int]) -> dict[str, Any]:
        """The last chunk with ``stream_options.include_usage``: the usage, no choices."""
        return {**self._chunk([]), "usage": used}

    def _chunk(self, pieces: list[dict[str, Any]], usage_field: bool = False) -> dict[str, Any]:
        doc = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": pieces}
        if usage_field:
            doc["usage"] = None
        return doc

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _whole_choice(self, index: int, text: str, finish_reason: str, logprobs: dict | None) -> dict[str, Any]:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
