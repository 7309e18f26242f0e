"""protobuf <-> domain conversions of everything but tensors. Torch-free: the gateway and the SDK use it.

Each conversion is a pair ``x_to_pb`` / ``x_from_pb``. Decoding a malformed message raises
``ValueError`` naming the bad field, except client input (``generate_request_from_pb``),
which raises ``InvalidArgument`` so the gateway can hand it straight back.

NOTE: the gateway's own messages (GenerateRequest, GenerateResponse, StatusResponse) have no
dataclass in ``stagemesh.serving.types``; ``GenerateInput`` and ``GenerateChunk`` below are
their domain form, and the status document is a plain dict (what ``Client.status()`` returns).
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from array import array
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import Iterable

from google.protobuf.message import Message

from stagemesh.config import layer_bounds
from stagemesh.errors import InvalidArgument, StagemeshError, error_for
from stagemesh.mesh.figures import LOAD_NUMBERS, WorkerLoad
from stagemesh.serving.params import NAMES, PARAMS, SAMPLE_FIELDS, SampleSpec, SamplingParams, spec_from_fields
from stagemesh.serving.types import StepPlan, StepResult, TokenLogprobs, seq_chunk
from stagemesh.v1 import gateway_pb2, sampling_pb2, stage_pb2, tensor_pb2

__all__ = [
    "pack_int64", "unpack_int64", "sampling_to_pb", "sampling_from_pb", "plan_to_pb", "plan_from_pb", "SPEC_NOT_READ",
    "result_to_pb", "result_from_pb", "failed_step_to_pb", "error_to_pb", "error_from_pb",
    "logprobs_to_pb", "logprobs_from_pb",
    "GenerateInput", "generate_request_to_pb", "generate_request_from_pb",
    "GenerateChunk", "chunk_to_pb", "chunk_from_pb", "status_to_pb", "status_from_pb",
]

_DEFAULTS = SamplingParams()


# --- int64 columns as one raw-bytes Tensor -------------------------------------------------


def pack_int64(values: Iterable[int]) -> tensor_pb2.Tensor:
    """A 1-D ``int64`` Tensor of ``values``, packed with ``array('q')`` (no per-element protobuf)."""
    arr = array("q", values)
    if sys.byteorder == "big":  # the wire is little-endian
        arr.byteswap()
    return tensor_pb2.Tensor(data=arr.tobytes(), dtype="int64", shape=[len(arr)])


def unpack_int64(msg: tensor_pb2.Tensor) -> array:
    """The values of a 1-D ``int64`` Tensor as an ``array('q')``."""
    if msg.dtype != "int64" or len(msg.shape) != 1:
        raise ValueError(f"expected a 1-D int64 tensor, got dtype {msg.dtype!r} shape {list(msg.shape)}")
    if len(msg.data) != 8 * msg.shape[0]:
        raise ValueError(f"int64 tensor of shape {list(msg.shape)} needs {8 * msg.shape[0]} bytes, got {len(msg.data)}")
    arr = array("q")
    arr.frombytes(msg.data)
    if sys.byteorder == "big":
        arr.byteswap()
    return arr


# --- SamplingParams ------------------------------------------------------------------------


def sampling_to_pb(params: SamplingParams) -> sampling_pb2.SamplingParams:
    """Every field by its name (a None, i.e. an unset ``seed``, stays unset)."""
    values = {name: getattr(params, name) for name in NAMES}
    return sampling_pb2.SamplingParams(**{name: v for name, v in values.items() if v is not None})


def sampling_from_pb(msg: sampling_pb2.SamplingParams) -> SamplingParams:
    """Unset optional fields take the dataclass defaults (``seed`` stays None)."""
    return SamplingParams(**{f.name: _field_from_pb(msg, f.name, f.default) for f in PARAMS})


def _field_from_pb(msg: Message, name: str, default: object) -> object:
    field = msg.DESCRIPTOR.fields_by_name[name]
    if field.is_repeated:
        return tuple(getattr(msg, name))
    if field.has_presence and not msg.HasField(name):
        return default
    return getattr(msg, name)


# --- StepPlan <-> StageRequest -------------------------------------------------------------

_SAMPLE_COLUMNS = tuple(SAMPLE_FIELDS)
"""The StageRequest column of each SampleSpec field, in its order; read where ``sample`` is set."""
_NO_SAMPLE = SampleSpec(**dict.fromkeys(_SAMPLE_COLUMNS, 0))
"""The zeros written into the sampling columns of a chunk that does not sample."""
_PLAN_COLUMNS = ("starts", "lengths", "sample", *_SAMPLE_COLUMNS)
SPEC_NOT_READ = SampleSpec(seed=0, index=0)
"""A sampling row's ``sample`` on a stage that does not sample (``plan_from_pb(specs=False)``):
the row samples at the last stage; this one only needs to know that it does."""


def plan_to_pb(plan: StepPlan, hidden: tensor_pb2.Tensor | None = None) -> stage_pb2.StageRequest:
    """The columnar StageRequest of one micro-batch; ``hidden`` from ``codec.tensors.tensor_to_pb``."""
    chunks = plan.chunks
    specs = [c.sample or _NO_SAMPLE for c in chunks]
    msg = stage_pb2.StageRequest(
        step_id=plan.step_id,
        seq_ids=[c.seq_id for c in chunks],
        starts=[c.start for c in chunks],
        lengths=[len(c.token_ids) for c in chunks],
        token_ids=pack_int64(itertools.chain.from_iterable(c.token_ids for c in chunks)),
        sample=[c.sample is not None for c in chunks],
        free=plan.free,
        epoch=plan.epoch,
        **{name: [getattr(s, name) for s in specs] for name in _SAMPLE_COLUMNS},
    )
    if hidden is not None:
        msg.hidden.CopyFrom(hidden)
    return msg


def plan_from_pb(msg: stage_pb2.StageRequest, *, specs: bool = True) -> StepPlan:
    """The StepPlan of a StageRequest (its ``hidden`` is left to ``codec.tensors``). Without
    ``specs`` (a stage before the last) each sampling row gets ``SPEC_NOT_READ``.

    NOTE: a row's ``SampleSpec`` is ~40% of decoding it (1.5 of 3.6 µs a row at 128 rows), and
    only the last stage samples: the stages before it skip that."""
    n = len(msg.seq_ids)
    for name in _PLAN_COLUMNS:
        if len(getattr(msg, name)) != n:
            raise ValueError(f"StageRequest column {name!r} has {len(getattr(msg, name))} entries, seq_ids has {n}")
    if any(length < 0 for length in msg.lengths):
        raise ValueError(f"StageRequest lengths must be >= 0, got {list(msg.lengths)}")
    tokens = unpack_int64(msg.token_ids) if msg.HasField("token_ids") else array("q")
    if len(tokens) != sum(msg.lengths):
        raise ValueError(f"StageRequest token_ids has {len(tokens)} ids, lengths add up to {sum(msg.lengths)}")
    ends = itertools.accumulate(msg.lengths)
    if specs:
        columns = zip(*(getattr(msg, name) for name in _SAMPLE_COLUMNS))
        samples = (_spec(spec) if sample else None for sample, spec in zip(msg.sample, columns))
    else:
        samples = (SPEC_NOT_READ if sample else None for sample in msg.sample)
    chunks = tuple(
        seq_chunk(seq, start, tuple(tokens[end - length : end]), sample)
        for seq, start, length, end, sample in zip(msg.seq_ids, msg.starts, msg.lengths, ends, samples)
    )
    return StepPlan(step_id=msg.step_id, chunks=chunks, free=tuple(msg.free), epoch=msg.epoch)


def _spec(values: tuple) -> SampleSpec:
    return spec_from_fields(zip(_SAMPLE_COLUMNS, values))


# --- StepResult <-> StageResponse, errors --------------------------------------------------


def result_to_pb(result: StepResult) -> stage_pb2.StageResponse:
    msg = stage_pb2.StageResponse(
        step_id=result.step_id, seq_ids=list(result.tokens), tokens=list(result.tokens.values())
    )
    for seq_id, lp in result.logprobs.items():
        msg.logprobs[seq_id].CopyFrom(logprobs_to_pb(lp))
    return msg


def result_from_pb(msg: stage_pb2.StageResponse) -> StepResult:
    """The StepResult of a StageResponse; raises the StagemeshError it carries when the step failed."""
    if msg.HasField("error"):
        raise error_from_pb(msg.error)
    if len(msg.seq_ids) != len(msg.tokens):
        raise ValueError(f"StageResponse has {len(msg.seq_ids)} seq_ids but {len(msg.tokens)} tokens")
    tokens = dict(zip(msg.seq_ids, msg.tokens))
    if not set(msg.logprobs) <= set(tokens):
        raise ValueError(f"StageResponse has logprobs for sequences {sorted(set(msg.logprobs) - set(tokens))} "
                         "it sampled no token for")
    return StepResult(msg.step_id, tokens, {seq_id: logprobs_from_pb(lp) for seq_id, lp in msg.logprobs.items()})


# --- TokenLogprobs -------------------------------------------------------------------------


def logprobs_to_pb(lp: TokenLogprobs | None) -> sampling_pb2.TokenLogprobs:
    """None (not known) and an unknown ``logprob`` leave ``logprob`` unset."""
    msg = sampling_pb2.TokenLogprobs()
    if lp is None:
        return msg
    if lp.logprob is not None:
        msg.logprob = lp.logprob
    if lp.top:
        ids, values = zip(*lp.top)
        msg.top_ids.extend(ids)
        msg.top_logprobs.extend(values)
    return msg


def logprobs_from_pb(msg: sampling_pb2.TokenLogprobs) -> TokenLogprobs:
    if len(msg.top_ids) != len(msg.top_logprobs):
        raise ValueError(f"TokenLogprobs has {len(msg.top_ids)} top_ids but {len(msg.top_logprobs)} top_logprobs")
    return TokenLogprobs(msg.logprob if msg.HasField("logprob") else None,
                         tuple(zip(msg.top_ids, msg.top_logprobs)))


def failed_step_to_pb(step_id: int, err: BaseException) -> stage_pb2.StageResponse:
    """The StageResponse of a step that raised ``err``."""
    return stage_pb2.StageResponse(step_id=step_id, error=error_to_pb(err))


def error_to_pb(err: BaseException) -> tensor_pb2.Error:
    """A StagemeshError keeps its code; anything else is ``INTERNAL`` named by its type."""
    if isinstance(err, StagemeshError):
        return tensor_pb2.Error(code=err.code, message=err.message)
    return tensor_pb2.Error(code="INTERNAL", message=f"{type(err).__name__}: {err}")


def error_from_pb(msg: tensor_pb2.Error) -> StagemeshError:
    return error_for(msg.code or "UNKNOWN", msg.message)


# --- Gateway: GenerateRequest / GenerateResponse -------------------------------------------


@dataclass(frozen=True)
class GenerateInput:
    """A client's generate call: exactly one of ``prompt`` / ``token_ids``, and its parameters."""

    prompt: str | None = None
    token_ids: tuple[int, ...] | None = None
    params: SamplingParams = _DEFAULTS
    request_id: str = ""
    """Empty lets the gateway assign one."""
    resume_from: int | None = None
    """Set: take the request up from this token index (``GenerateRequest.resume_from``)."""

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.token_ids is None):
            raise InvalidArgument("give exactly one of prompt (text) or token_ids")
        if self.resume_from is not None and not self.request_id:
            raise InvalidArgument("resume_from needs the request_id of the request to resume")


def generate_request_to_pb(inp: GenerateInput) -> gateway_pb2.GenerateRequest:
    msg = gateway_pb2.GenerateRequest(request_id=inp.request_id, params=sampling_to_pb(inp.params))
    if inp.resume_from is not None:
        msg.resume_from = inp.resume_from
    if inp.prompt is not None:
        msg.prompt = inp.prompt
    else:
        msg.token_ids.ids.extend(inp.token_ids)
    return msg


def generate_request_from_pb(msg: gateway_pb2.GenerateRequest) -> GenerateInput:
    """Raises InvalidArgument when the request has neither a prompt nor token ids."""
    which = msg.WhichOneof("input")
    return GenerateInput(
        prompt=msg.prompt if which == "prompt" else None,
        token_ids=tuple(msg.token_ids.ids) if which == "token_ids" else None,
        params=sampling_from_pb(msg.params),
        request_id=msg.request_id,
        resume_from=msg.resume_from if msg.HasField("resume_from") else None,
    )


@dataclass(frozen=True)
class GenerateChunk:
    """One streamed piece of a request's output (usually one token)."""

    request_id: str
    token_ids: tuple[int, ...]
    index: int
    """Position of token_ids[0] among the request's generated tokens."""
    text: str = ""
    """Text these tokens add, when the model has a tokenizer."""
    finish_reason: str | None = None
    """``stop`` or ``length`` on the last chunk, None while running."""
    logprobs: tuple[TokenLogprobs | None, ...] = ()
    """One per token of ``token_ids`` when the request asked (None: not known); empty otherwise."""


def chunk_to_pb(chunk: GenerateChunk) -> gateway_pb2.GenerateResponse:
    return gateway_pb2.GenerateResponse(
        request_id=chunk.request_id,
        token_ids=chunk.token_ids,
        index=chunk.index,
        text=chunk.text,
        finish_reason=chunk.finish_reason or "",
        logprobs=[logprobs_to_pb(lp) for lp in chunk.logprobs],
    )


def chunk_from_pb(msg: gateway_pb2.GenerateResponse) -> GenerateChunk:
    """ValueError when ``logprobs`` is neither empty nor one per token."""
    if msg.logprobs and len(msg.logprobs) != len(msg.token_ids):
        raise ValueError(f"GenerateResponse has {len(msg.token_ids)} tokens but {len(msg.logprobs)} logprobs")
    return GenerateChunk(
        request_id=msg.request_id,
        token_ids=tuple(msg.token_ids),
        index=msg.index,
        text=msg.text,
        finish_reason=msg.finish_reason or None,
        logprobs=tuple(logprobs_from_pb(lp) for lp in msg.logprobs),
    )


# --- Gateway: StatusResponse <-> status document (dict) ------------------------------------

_CHAIN_KEYS = ("id", "healthy", "num_stages", "requests_served", "requests_running", "requests_waiting")
_WORKER_KEYS = ("id", "role", "chain", "stage", "address", "pid", "device", "healthy", "tp_size", "heartbeat_age_s")
_LOAD_KEYS = tuple(f.name for f in dataclass_fields(WorkerLoad))
"""The load's keys (``stagemesh.mesh.figures.WorkerLoad``), one WorkerLoad proto field each."""


def status_to_pb(doc: dict) -> gateway_pb2.StatusResponse:
    """The StatusResponse of a status document; keys beyond the typed ones go to ``json``.

    A chain or worker dict with a key the proto does not know raises ValueError.
    """
    extra = {k: v for k, v in doc.items() if k not in ("chains", "workers", "model", "version")}
    return gateway_pb2.StatusResponse(
        chains=[gateway_pb2.ChainStatus(**_known(chain, _CHAIN_KEYS, "chain")) for chain in doc.get("chains", ())],
        workers=[_worker_to_pb(w) for w in doc.get("workers", ())],
        model=doc.get("model", ""),
        version=doc.get("version", ""),
        json=json.dumps(extra) if extra else "",
    )


def _worker_to_pb(worker: dict) -> gateway_pb2.WorkerStatus:
    """``experts`` is ``{"<layer>": [expert ids]}``; the load's ``expert_tokens`` (expert
    workers only) is ``{"<layer>:<expert>": rows}``."""
    fields = dict(_known(worker, (*_WORKER_KEYS, "layers", "experts", "load"), "worker"))
    start, end = fields.pop("layers", (0, 0))  # x.5: the boundary cuts layer x (StageSpec.bounds)
    load = gateway_pb2.WorkerLoad(**_known(fields.pop("load", {}), _LOAD_KEYS, "worker load"))
    held = {int(layer): gateway_pb2.ExpertIds(ids=ids) for layer, ids in fields.pop("experts", {}).items()}
    union = sorted({e for ids in held.values() for e in ids.ids})
    return gateway_pb2.WorkerStatus(
        layer_start=math.floor(start), layer_end=math.ceil(end), mlp_only_start=start % 1 != 0,
        attn_only_end=end % 1 != 0, load=load, experts=union, layer_experts=held, **fields
    )


def _known(record: dict, keys: tuple[str, ...], what: str) -> dict:
    unknown = sorted(set(record) - set(keys))
    if unknown:
        raise ValueError(f"{what} status has unknown keys {unknown}; known: {', '.join(keys)}")
    return record


def status_from_pb(msg: gateway_pb2.StatusResponse) -> dict:
    """The status document: ``{"chains": [...], "workers": [...], "model", "version"}`` plus json extras."""
    doc = json.loads(msg.json) if msg.json else {}
    doc.update(
        chains=[{k: getattr(c, k) for k in _CHAIN_KEYS} for c in msg.chains],
        workers=[_worker_from_pb(w) for w in msg.workers],
        model=msg.model,
        version=msg.version,
    )
    return doc


def _worker_from_pb(msg: gateway_pb2.WorkerStatus) -> dict:
    worker = {k: getattr(msg, k) for k in _WORKER_KEYS}
    worker["layers"] = list(layer_bounds(msg.layer_start, msg.layer_end, msg.mlp_only_start, msg.attn_only_end))
    worker["experts"] = {str(layer): list(msg.layer_experts[layer].ids) for layer in sorted(msg.layer_experts)}
    numbers = {k: getattr(msg.load, k) for k in LOAD_NUMBERS}
    worker["load"] = WorkerLoad(**numbers, expert_tokens=dict(msg.load.expert_tokens)).to_json()
    return worker
