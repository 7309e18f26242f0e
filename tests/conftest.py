"""Fixtures shared by every test package."""

from __future__ import annotations

import pytest

from stagemesh.deploy.redis_server import start_local_redis


@pytest.fixture(scope="session")
def redis_url():
    """URL of a real redis-server started for this test session on a free 127.0.0.1 port.

    Tests share the server; each should use its own deployment name (see ``Store.connect``)
    so their keys never meet.
    """
    with start_local_redis() as server:
        yield server.url
