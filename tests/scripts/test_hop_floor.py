"""scripts/hop_floor.py: a real chain of gRPC processes, each step answered back through every stage."""

import hop_floor
import uvloop

from stagemesh.runtime.net import free_port


def test_a_token_takes_every_stage_s_step_and_the_hops_between():
    work_s, ports = 0.002, [free_port(), free_port()]
    with hop_floor.chain(ports, work_s):  # stages 1 and 2 of three; the driver is stage 0
        tokens, works = uvloop.run(hop_floor._drive(f"127.0.0.1:{ports[0]}", work_s, 20, 64))
    assert len(tokens) == 19 and len(works) == 20
    assert min(works) >= work_s
    assert min(tokens) >= 3 * work_s  # the driver's step, then the two others' before the answer comes back
