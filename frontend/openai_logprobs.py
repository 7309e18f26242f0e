"""OpenAI's ``logprobs`` sections, from the log-probabilities the mesh's last stage returns.

Two shapes, as OpenAI (and vLLM) answer them:

- ``/v1/completions`` (``logprobs: K``, the legacy format): per choice ``{"tokens": [...],
  "token_logprobs": [...], "top_logprobs": [{token: logprob}, ...], "text_offset": [...]}``;
  each ``top_logprobs`` dict holds the K most likely tokens and the generated one (so up to
  K + 1 entries; fewer when two tokens decode to the same text, which keeps the likelier one's),
  and ``text_offset`` is where each token's text starts in the completion;
- ``/v1/chat/completions`` (``logprobs: true``, ``top_logprobs: K``): per choice
  ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
  "refusal": null}``.

The log-probabilities are those of the model's own distribution (the logits before
temperature, top-k, top-p and min-p), as vLLM returns by default. A token's text is its id
decoded alone (special tokens shown); ``bytes`` are that text's UTF-8 bytes. A token whose
log-probability is not known (generated before a gateway restart: the journal keeps token ids
only) gets ``null`` for it and no top entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stagemesh.serving.types import TokenLogprobs
from stagemesh.tokenizer import Tokenizer

LOWEST = -9999.0
"""A log-probability of -inf (a token the model rules out) goes out as this: JSON has no infinity (vLLM's choice)."""

Entry = tuple[int, TokenLogprobs | None]
"""A generated token and its log-probabilities (None: not known)."""


class LogprobsWriter:
    """One choice's ``logprobs`` sections, piece by piece (streamed) or all at once: the legacy
    format's ``text_offset`` goes on from one piece to the next."""

    def __init__(self, tokenizer: Tokenizer, *, chat: bool):
        self.tokenizer, self.chat = tokenizer, chat
        self._offset = 0
        self._texts: dict[int, str] = {}

    def section(self, entries: Sequence[Entry]) -> dict[str, Any]:
        """The ``logprobs`` value of a choice (or of a streamed piece) with these tokens."""
        return self._chat(entries) if self.chat else self._legacy(entries)

    def _chat(self, entries: Sequence[Entry]) -> dict[str, Any]:
        content = []
        for token, lp in entries:
            top = lp.top if lp is not None else ()
            content.append({**self._token(token, lp.logprob if lp is not None else None),
                            "top_logprobs": [self._token(t, value) for t, value in top]})
        return {"content": content, "refusal": None}

    def _token(self, token: int, logprob: float | None) -> dict[str, Any]:
        text = self._text(token)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

    def _legacy(self, entries: Sequence[Entry]) -> dict[str, Any]:
        tokens, logprobs, tops, offsets = [], [], [], []
        for token, lp in entries:
            text = self._text(token)
            tokens.append(text)
            offsets.append(self._offset)
            self._offset += len(text)
            if lp is None or lp.logprob is None:
                logprobs.append(None)
                tops.append(None)
                continue
            logprobs.append(_finite(lp.logprob))
            top: dict[str, float] = {}
            for t, value in (*lp.top, (token, lp.logprob)):  # most likely first: a text two tokens share keeps its best
                top.setdefault(self._text(t), _finite(value))
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}

    def _text(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text


def _finite(logprob: float | None) -> float | None:
    return None if logprob is None else max(logprob, LOWEST)
