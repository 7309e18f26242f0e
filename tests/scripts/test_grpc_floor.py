"""scripts/grpc_floor.py's bare server: the streams, messages and tokens it is asked for, over real gRPC."""

import grpc_floor
import uvloop

from stagemesh.runtime.net import free_port


def test_the_bare_server_sends_each_stream_its_messages_of_the_asked_size():
    with grpc_floor.BareServer(free_port(), messages=5, tokens=3, gap_s=0.001) as bare:
        messages, tokens, wall = uvloop.run(grpc_floor._bare_load(bare.addr, 4))
        assert grpc_floor._cpu_s([bare.pid]) >= 0
    assert (messages, tokens) == (4 * 5, 4 * 5 * 3)
    assert wall > 0
