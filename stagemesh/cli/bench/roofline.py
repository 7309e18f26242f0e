"""How much work a benchmark's requests need, and how much this machine can do: the roofline.

NOTE: the formulas.

- **FLOPs needed** (CPU figure). A request with a ``P``-token prompt and ``O`` output tokens
  runs ``T = P + O - 1`` positions through the decoder layers (the last sampled token is
  never fed back). Per position a matmul weight costs 2 FLOPs per parameter, and the
  attention of a position that sees ``c`` keys (itself and the ``c - 1`` before it) costs
  ``2 * q_size * c`` for ``Q @ K^T`` plus as much for ``P @ V``, in every layer. The
  ``lm_head`` runs once per sampled token. So, with ``N`` the decoder-layer parameters
  (projections, MLP, norms; only the ``top_k / num_experts`` share of MoE experts that a
  token uses) and ``V * H`` the ``lm_head``::

      FLOPs = 2 * N * T  +  2 * V * H * O  +  4 * layers * q_size * T * (T + 1) / 2

  summed over requests. The embedding lookup is a gather, not a matmul: no FLOPs. Sliding
  windows are ignored (the figure is then an upper bound on the attention work).
  Fraction of roofline = (FLOPs / wall time) / the best float32 GEMM rate measured on this
  machine at startup with the same thread count (the faster of MKL's ``torch.mm`` and the
  packed oneDNN GEMM the model runs, ``stagemesh.model.packed_gemm``).
- **Weight bytes** (the CUDA roofline; also given on CPU as ``bandwidth_fraction``). A step (one micro-batch through the whole model) reads
  every decoder-layer weight and the ``lm_head`` once; KV-cache reads are left out, so the
  figure is conservative. Fraction = (weight bytes * steps / wall time) / the measured
  device-to-device copy bandwidth (bytes read + bytes written per second).

The parameter counts come from the safetensors headers (no torch, no weights read).
"""

from __future__ import annotations

import json
import statistics
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from stagemesh.cli.bench.workload import BenchRequest
from stagemesh.config import ModelConfig

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}
CALIBRATION_N = 2048
"""Side of the square float32 matrices of the CPU matmul calibration."""


@dataclass(frozen=True)
class ModelCost:
    """A checkpoint's sizes, as the roofline needs them."""

    layer_params: int
    """Decoder-layer and final-norm parameters (all experts)."""
    active_layer_params: int
    """The same with each MoE layer's experts counted at ``top_k / num_experts``: what one token uses."""
    embed_params: int
    lm_head_params: int
    """``vocab * hidden``, tied to the embedding or not."""
    weight_bytes: int
    """Bytes one step reads: decoder layers, final norm and ``lm_head`` (the embedding when tied)."""
    num_layers: int
    q_size: int
    tied: bool
    """The ``lm_head`` is the embedding matrix (not stored twice)."""

    def to_json(self) -> dict:
        total = self.layer_params + self.embed_params + (0 if self.tied else self.lm_head_params)
        return {
            "params_total": total,
            "params_non_embedding": self.layer_params,
            "params_active_per_token": self.active_layer_params,
            "lm_head_params": self.lm_head_params,
            "weight_bytes_per_step": self.weight_bytes,
            "num_layers": self.num_layers,
            "q_size": self.q_size,
        }


def model_cost(model_dir: str | Path) -> ModelCost:
    """The sizes of the checkpoint in ``model_dir``, from its config and safetensors headers."""
    config = ModelConfig.from_dir(model_dir)
    tensors = _headers(Path(model_dir))
    layer = active = embed = embed_bytes = head_bytes = body_bytes = 0
    expert_share = config.num_experts_per_tok / config.num_experts if config.is_moe else 1.0
    for name, (numel, nbytes) in tensors.items():
        if "embed_tokens" in name:
            embed, embed_bytes = embed + numel, embed_bytes + nbytes
        elif name.startswith("lm_head"):
            head_bytes += nbytes
        else:
            layer += numel
            active += numel * expert_share if ".experts." in name else numel
            body_bytes += nbytes
    tied = head_bytes == 0
    return ModelCost(
        layer_params=layer,
        active_layer_params=round(active),
        embed_params=embed,
        lm_head_params=config.vocab_size * config.hidden_size,
        weight_bytes=body_bytes + (embed_bytes if tied else head_bytes),
        num_layers=config.num_hidden_layers,
        q_size=config.q_size,
        tied=tied,
    )


def _headers(model_dir: Path) -> dict[str, tuple[int, int]]:
    """tensor name -> (elements, bytes), over every ``*.safetensors`` file of the checkpoint."""
    out = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} has no *.safetensors files")
    for path in files:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for dim in info["shape"]:
                numel *= dim
            out[name] = (numel, numel * _DTYPE_BYTES.get(info["dtype"], 4))
    return out


def flops_needed(cost: ModelCost, requests: list[BenchRequest]) -> float:
    """The FLOPs of every request's prompt and output (formula in the module NOTE)."""
    total = 0.0
    for r in requests:
        t = len(r.token_ids) + r.output_len - 1
        total += 2.0 * cost.active_layer_params * t + 2.0 * cost.lm_head_params * r.output_len
        total += 4.0 * cost.num_layers * cost.q_size * t * (t + 1) / 2
    return total


def measure_machine(device: str, seconds: float) -> dict:
    """The roofline of this machine: on CPU a matmul rate (and the copy bandwidth, for the
    weight-bytes figure beside it); on CUDA the device's copy bandwidth."""
    if device == "cuda":
        return measure_copy_bandwidth("cuda", seconds)
    bandwidth = measure_copy_bandwidth("cpu", seconds / 3)
    return {**measure_matmul_rate(seconds), **{k: v for k, v in bandwidth.items() if k.endswith("bytes_per_s")},
            "bandwidth_calibration": bandwidth["calibration"]}


def measure_matmul_rate(seconds: float, n: int = CALIBRATION_N) -> dict:
    """Float32 ``n x n`` GEMMs repeated for about ``seconds``, through each GEMM this build of
    torch has on CPU (MKL's ``torch.mm``; oneDNN with a packed weight, which the model's
    linear layers use): the best rate of either is the machine's FLOP/s."""
    import torch

    from stagemesh.model import packed_gemm

    a, b = torch.randn(n, n), torch.randn(n, n)
    gemms = {"torch.mm": lambda: torch.mm(a, b)}
    if packed_gemm.can_pack(b):
        packed = packed_gemm.pack(b)
        gemms["oneDNN packed"] = lambda: packed_gemm.linear(a, packed)
    rates: dict[str, list[float]] = {name: [] for name in gemms}
    for gemm in gemms.values():
        gemm()  # warm-up: thread pool, caches
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or min(map(len, rates.values())) < 3:
        for name, gemm in gemms.items():
            t0 = time.perf_counter()
            gemm()
            rates[name].append(2.0 * n**3 / (time.perf_counter() - t0))
    best = max(rates, key=lambda name: max(rates[name]))
    runs = sum(map(len, rates.values()))
    return {
        "kind": "cpu",
        "peak_flops_per_s": max(rates[best]),
        "median_flops_per_s": statistics.median(rates[best]),
        "peak_flops_per_s_by_gemm": {name: max(r) for name, r in rates.items()},
        "threads": torch.get_num_threads(),
        "calibration": f"float32 {n}x{n} @ {n}x{n} GEMM, best of {' and '.join(gemms)} ({runs} runs): {best}",
    }


def measure_copy_bandwidth(device: str, seconds: float, nbytes: int = 1 << 28) -> dict:
    """Copies of ``nbytes`` on ``device`` (far larger than any cache): (read + write) bytes/s."""
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: page faults, allocator
    rates = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        rates.append(2.0 * nbytes / _timed_copy(dst, src))
    doc = {
        "kind": device,
        "peak_bytes_per_s": max(rates),
        "median_bytes_per_s": statistics.median(rates),
        "calibration": f"{device} tensor copy of {nbytes >> 20} MiB, {len(rates)} runs, best taken",
    }
    if device == "cuda":
        doc["device_name"] = torch.cuda.get_device_name()
    return doc


def _timed_copy(dst, src) -> float:
    """Seconds of one ``dst.copy_(src)``: CUDA events on a GPU, the wall clock on CPU."""
    import torch

    if dst.device.type != "cuda":
        t0 = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    dst.copy_(src)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0


def roofline_figures(wall_s: float, steps: int | None, flops: float, cost: ModelCost, machine: dict) -> dict:
    """One system's achieved rates and its fraction of the machine's roofline: FLOPs on CPU,
    weight bytes on CUDA (``bandwidth_fraction`` is the weight-bytes figure on either)."""
    achieved = flops / wall_s
    out: dict = {"achieved_flops_per_s": achieved}
    if machine["kind"] == "cpu":
        out["roofline_fraction"] = achieved / machine["peak_flops_per_s"]
    bandwidth = cost.weight_bytes * steps / wall_s if steps else None
    out["weight_bytes_per_s"] = bandwidth
    out["bandwidth_fraction"] = None if bandwidth is None else bandwidth / machine["peak_bytes_per_s"]
    if machine["kind"] == "cuda":
        out["roofline_fraction"] = out["bandwidth_fraction"]
    return out
