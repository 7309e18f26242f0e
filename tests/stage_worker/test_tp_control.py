"""The TP control path on CPU with gloo: rank 0's broadcasts reach rank 1 byte for byte, in
order, and an idle rank waits far longer than a step's collective timeout (idle is not dead)."""

from __future__ import annotations

import time
from datetime import timedelta

import torch.multiprocessing as mp

from stage_worker import tp
from stagemesh.deploy.redis_server import free_port

MESSAGES = [b"step one", bytes(range(256)) * 4096, b""]  # a 1 MiB one (activations), an empty one
IDLE_S = 2.5


def _rank_main(rank: int, port: int, out: dict) -> None:
    tp.STEP_TIMEOUT = timedelta(seconds=1)  # a step's collectives give up after 1 s ...
    group = tp.join_group(rank, 2, f"tcp://127.0.0.1:{port}", "gloo", "cpu")
    try:
        out[f"ints{rank}"] = tp.all_gather_int(100 + rank, group.control)
        if rank == 0:
            time.sleep(IDLE_S)  # ... while rank 1 waits idle for longer than that
            for data in MESSAGES:
                tp.send_step(data, group.control)
            tp.send_stop(group.control)
        else:
            got = []
            while (data := tp.receive_step(group.control)) is not None:
                got.append(data)
            out["got"] = got
    finally:
        tp.leave_group()


def test_steps_reach_the_other_rank_in_order_after_a_long_idle_wait():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_main, args=(free_port(), out), nprocs=2, join=True)
        got = dict(out)
    assert got["got"] == MESSAGES
    assert got["ints0"] == got["ints1"] == [100, 101]


def test_the_backend_follows_the_device_unless_overridden():
    assert tp.tp_backend("cuda:1") == "nccl"
    assert tp.tp_backend("cpu") == "gloo"
    assert tp.tp_backend("cuda:0", "gloo") == "gloo"
