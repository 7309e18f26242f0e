"""`stagemesh generate --stream`: one request's text printed as its tokens come, from a mesh or
from the in-process engine.

Torch-free (the in-process engine hands its tokens in already decoded).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, TextIO

from stagemesh.cli.requests_io import InputLine
from stagemesh.errors import InvalidArgument

if TYPE_CHECKING:
    from stagemesh.client import AsyncClient

Piece = tuple[int | None, str]
"""One streamed token: its id (None on a final event without a token) and the text it adds."""


def one_line(lines: list[InputLine], as_json: bool) -> InputLine:
    """The one request ``--stream`` takes; InvalidArgument for several or for ``--json``."""
    if as_json:
        raise InvalidArgument("--stream prints text as it comes; --json prints whole results: give one of them")
    if len(lines) != 1:
        raise InvalidArgument(f"--stream takes one request (--prompt or --token-ids), but --input has {len(lines)}")
    return lines[0]


async def remote_pieces(client: AsyncClient, line: InputLine) -> AsyncIterator[Piece]:
    """The tokens of ``line`` from the mesh ``client`` is connected to, as they come."""
    async for token in client.stream(line.prompt, line.token_ids, **dataclasses.asdict(line.params)):
        yield token.token_id, token.text


async def print_pieces(pieces: AsyncIterator[Piece], out: TextIO) -> None:
    """Print each piece's text as it comes (flushed), then a newline; a model without a tokenizer
    (no text at all) gets its token ids at the end instead. An error ends the line first."""
    ids, texts = [], False
    try:
        async for token_id, text in pieces:
            if token_id is not None:
                ids.append(token_id)
            if text:
                texts = True
                out.write(text)
                out.flush()
    finally:
        if not texts and ids:
            out.write(" ".join(map(str, ids)))
        out.write("\n")
        out.flush()
