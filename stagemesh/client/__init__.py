"""The stagemesh client SDK (torch-free): ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Prefer importing from ``stagemesh`` itself: ``from stagemesh import Client``.
"""

from stagemesh.client._aio import AsyncClient
from stagemesh.client._sync import Client
from stagemesh.client._types import GeneratedToken, GenerateResult, TokenLogprobs

__all__ = ["AsyncClient", "Client", "GeneratedToken", "GenerateResult", "TokenLogprobs"]
