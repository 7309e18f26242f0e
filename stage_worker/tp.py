"""torch.distributed plumbing shared by every tensor-parallel rank of one stage.

NOTE: how a step reaches every rank. Rank 0 (the process that serves gRPC) broadcasts each
received ``StageRequest``, serialized, over a gloo *control* group: first its length (one
int64), then its bytes (a uint8 tensor; the hidden activations travel inside them as raw
bytes). gloo works on CPU and next to NCCL, so the control path is the same whatever the
model's backend. Every rank then decodes the same bytes and runs ``runner.step``, so the
collectives inside the model (the all-reduces of the row-parallel and vocab-parallel layers)
meet in the same order on every rank. A length of ``STOP`` ends the ranks' loop.

Idle ranks wait inside the control broadcast for as long as no step comes, so the control
group's timeout is very long (``CONTROL_TIMEOUT``): idle must never read as dead. A dead rank
is found by rank 0 watching its processes (``stage_worker.tp_stage.RankProcesses``), not by
a timeout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from stagemesh.model.parallel import TPGroup

STOP = -1
"""The length rank 0 broadcasts to end the other ranks' step loop."""
CONTROL_TIMEOUT = timedelta(days=365)
"""How long an idle rank waits for the next step. NOTE: gloo counts it in nanoseconds from
now, so it must stay far below 292 years; 'forever' is not an option."""
STEP_TIMEOUT = timedelta(minutes=10)
"""The rendezvous, and under gloo one collective inside a step, give up after this long."""


@dataclass(frozen=True)
class RankGroup:
    """One rank's membership: the model's TP group and the gloo control group."""

    tp: TPGroup
    control: Any
    """The gloo process group steps are broadcast on."""


def tp_backend(device: str, override: str | None = None) -> str:
    """nccl for CUDA devices, gloo for CPU, unless ``override`` names one."""
    if override:
        if override not in ("nccl", "gloo"):
            raise ValueError(f"tp_backend={override!r}: use nccl or gloo")
        return override
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def check_devices(devices: tuple[str, ...]) -> None:
    """Every CUDA device named is visible here, and no two ranks share one (NCCL cannot)."""
    cuda = [torch.device(d) for d in devices if torch.device(d).type == "cuda"]
    if not cuda:
        return
    have = torch.cuda.device_count()
    missing = [str(d) for d in cuda if (d.index or 0) >= have]
    if missing:
        raise ValueError(f"devices {missing} are not visible: this host shows {have} GPU(s)")
    if len({d.index or 0 for d in cuda}) != len(cuda):
        raise ValueError(f"TP ranks need a GPU each, got devices {list(devices)}")


def join_group(rank: int, size: int, init_method: str, backend: str, device: str) -> RankGroup:
    """Join the stage's TP group (blocks until all ``size`` ranks have joined)."""
    # NOTE: the ranks of one stage share a host, so gloo talks over loopback.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=STEP_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return RankGroup(TPGroup(rank, size, dist.group.WORLD), control)


def send_step(data: bytes, control: Any) -> None:
    """Rank 0: give every rank one serialized StageRequest."""
    _send_length(len(data), control)
    if data:  # an all-default StageRequest serializes to b""
        dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), src=0, group=control)


def send_stop(control: Any) -> None:
    """Rank 0: end the other ranks' step loop."""
    _send_length(STOP, control)


def receive_step(control: Any) -> bytes | None:
    """Ranks > 0: the next serialized StageRequest, or None when rank 0 says stop."""
    length = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(length, src=0, group=control)
    if int(length) == STOP:
        return None
    if int(length) == 0:
        return b""
    data = torch.empty(int(length), dtype=torch.uint8)
    dist.broadcast(data, src=0, group=control)
    return data.numpy().tobytes()


def _send_length(n: int, control: Any) -> None:
    dist.broadcast(torch.tensor([n], dtype=torch.int64), src=0, group=control)


def all_gather_int(value: int, control: Any) -> list[int]:
    """Every rank's ``value``, rank 0's first (e.g. each rank's weight bytes, once at startup)."""
    mine = torch.tensor([value], dtype=torch.int64)
    parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size(control))]
    dist.all_gather(parts, mine, group=control)
    return [int(p) for p in parts]


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
