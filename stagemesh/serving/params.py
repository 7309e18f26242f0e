"""Sampling parameters, declared once: ``SamplingParams`` and what is derived from its fields.

NOTE: one definition drives every copy (STYLE.md habit 15). Each field of ``SamplingParams``
carries a ``Param`` (its help text, the bounds validation checks, whether it is per-row
sampler state), and everything else iterates the fields:

- the gateway's proto message (``codec.messages.sampling_to_pb``/``sampling_from_pb``);
- ``SampleSpec``, what the last stage samples one row with: the ``row`` fields plus the
  row's seed and token index; the ``StageRequest`` columns and the sampler's
  ``SamplingBatch`` are built from its fields;
- the SDK's keyword arguments (``with_values``), the CLI's flags and the JSONL keys of
  ``stagemesh generate`` (``cli.requests_io``);
- validation (``serving.validate``).

Adding a parameter: a field here, a field in ``sampling.proto`` (and, for a ``row`` field, a
``StageRequest`` column in ``stage.proto``), and the sampler code that reads it.
"""

from __future__ import annotations

import dataclasses
import random
import types
import typing
from dataclasses import Field, dataclass, field, fields, make_dataclass
from typing import Any, Iterable, Mapping

from stagemesh.errors import InvalidArgument

MAX_SEED = 2**63
MAX_TOP_LOGPROBS = 20
"""The most likely tokens a request may ask the log-probabilities of at each position (OpenAI's bound)."""


@dataclass(frozen=True)
class Bounds:
    """The numbers a parameter accepts: from ``low`` to ``high``, each end closed unless ``*_open``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""
    """What a special value means, e.g. "0 turns it off"; validation errors repeat it."""

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below  # nan is in no bounds: every comparison with it is False

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(x: float | None) -> str:
    if isinstance(x, int) and x > 2**32 and x & (x - 1) == 0:
        return f"2**{x.bit_length() - 1}"
    return f"{x:g}" if x is not None else ""


@dataclass(frozen=True)
class Param:
    """What a ``SamplingParams`` field says about itself (its ``Field.metadata["param"]``)."""

    help: str
    """The field's documentation: the SDK's docstrings and the CLI's ``--help`` show it."""
    bounds: Bounds | None = None
    """The values validation accepts (a number's); None: any value of the field's type."""
    row: bool = False
    """Per-row sampler state: a ``SampleSpec`` field, a ``StageRequest`` column, a
    ``SamplingBatch`` tensor on the last stage."""


def param(default: Any, help: str, bounds: Bounds | None = None, *, row: bool = False) -> Any:
    """A ``SamplingParams`` field with its default and its ``Param``."""
    return field(default=default, metadata={"param": Param(help, bounds, row)})


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops (each field's ``Param`` documents it)."""

    max_new_tokens: int = param(
        16, "Tokens to generate at most; prompt + max_new_tokens must fit the model's context.", Bounds(0, low_open=True)
    )
    temperature: float = param(
        0.0, "0 picks the most likely token (greedy); above 0 samples from softmax(logits / T).",
        Bounds(0, note="0 is greedy"), row=True,
    )
    top_k: int = param(
        0, "Sample only among the k most likely tokens; 0 turns it off.", Bounds(0, note="0 turns it off"), row=True
    )
    top_p: float = param(
        1.0, "Sample only among the most likely tokens whose probabilities add up to p; in (0, 1].",
        Bounds(0, 1, low_open=True, note="1 turns it off"), row=True,
    )
    min_p: float = param(
        0.0, "Sample only among tokens whose probability is at least min_p times the most likely one's.",
        Bounds(0, 1, note="0 turns it off"), row=True,
    )
    seed: int | None = param(
        None, "Seed of the request's random stream; the same seed gives the same tokens on any layout.",
        Bounds(0, MAX_SEED, high_open=True),
    )
    stop_token_ids: tuple[int, ...] = param(
        (), "Generation stops after emitting one of these (as well as the model's EOS ids)."
    )
    ignore_eos: bool = param(
        False, "Do not stop at the model's EOS ids (benchmarks use this for fixed output lengths)."
    )
    logprobs: bool = param(
        False, "Return each generated token's log-probability under the model's own distribution (the logits "
        "before temperature, top-k, top-p and min-p, as vLLM does).", row=True,
    )
    top_logprobs: int = param(
        0, f"With logprobs: also the {MAX_TOP_LOGPROBS} or fewer most likely tokens at each position and their "
        "log-probabilities.", Bounds(0, MAX_TOP_LOGPROBS), row=True,
    )


PARAMS: tuple[Field, ...] = fields(SamplingParams)
"""The fields, in declaration order."""
NAMES: tuple[str, ...] = tuple(f.name for f in PARAMS)


def param_of(f: Field) -> Param:
    return f.metadata["param"]


def _kind(hint: Any) -> type:
    """``int | None`` -> int, ``tuple[int, ...]`` -> tuple, ``float`` -> float."""
    if isinstance(hint, types.UnionType):
        (hint,) = [t for t in typing.get_args(hint) if t is not type(None)]
    return typing.get_origin(hint) or hint


KINDS: dict[str, type] = {name: _kind(hint) for name, hint in typing.get_type_hints(SamplingParams).items()}
"""Field name -> int, float, bool or tuple (a tuple field holds ints)."""
ROW_FIELDS: tuple[str, ...] = tuple(f.name for f in PARAMS if param_of(f).row)
DEFAULTS: dict[str, Any] = {f.name: f.default for f in PARAMS}
SAMPLE_FIELDS: dict[str, type] = {"seed": int, "index": int, **{name: KINDS[name] for name in ROW_FIELDS}}
"""``SampleSpec``'s fields and their kinds: what the wire and the sampler carry per row."""

SampleSpec = make_dataclass(
    "SampleSpec",
    [("seed", int), ("index", int), *((name, KINDS[name], field(default=DEFAULTS[name])) for name in ROW_FIELDS)],
    frozen=True,
    kw_only=True,
    namespace={"__module__": __name__, "__doc__": (
        "What the last stage needs to sample one sequence's next token: ``seed`` (the request's, drawn "
        "when it gave none), ``index`` (tokens generated so far: the counter into its seeded random "
        "stream) and every ``row`` field of SamplingParams, which defaults as there."
    )},
)
# NOTE: built from the fields, so a new row parameter needs no edit here; keyword-only, so a
# new field can never shift what a positional call meant.


def sample_spec(params: SamplingParams, seed: int, index: int) -> SampleSpec:
    """What the last stage needs to sample token ``index`` of a request with ``params``."""
    return spec_from_fields(sample_row(params), seed=seed, index=index)


def sample_row(params: SamplingParams) -> dict[str, Any]:
    """The ``row`` fields of ``params``: what every ``SampleSpec`` of its request holds besides
    ``seed`` and ``index`` (the scheduler takes them once per request)."""
    return {name: getattr(params, name) for name in ROW_FIELDS}


def spec_from_fields(fields: Mapping[str, Any] | Iterable[tuple[str, Any]], **more: Any) -> SampleSpec:
    """The ``SampleSpec`` of ``fields`` and ``more``, which together name every one of its fields.

    NOTE: one is built per row per step, on the gateway (its plans) and on every stage (decoding
    them). A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``: 3.8 µs
    per spec, against well under 1 µs to fill the instance's ``__dict__`` (``python
    scripts/step_path_micro.py``). ``SampleSpec`` has no ``__post_init__``, and the values are
    checked where they come from (``validate_request``; a stage's step checks), so nothing is
    skipped but the setattr calls."""
    spec = object.__new__(SampleSpec)
    spec.__dict__.update(fields, **more)
    return spec


def with_values(base: SamplingParams, values: Mapping[str, Any], where: str) -> SamplingParams:
    """``base`` with ``values`` (by field name) in place of its fields; a tuple field takes any
    iterable of integers. InvalidArgument names an unknown name and says ``where`` it came from."""
    unknown = sorted(set(values) - set(NAMES))
    if unknown:
        raise InvalidArgument(f"{where}: unknown sampling parameter {unknown[0]!r}; known: {', '.join(NAMES)}")
    return dataclasses.replace(base, **{name: _coerce(name, value, where) for name, value in values.items()})


def _coerce(name: str, value: Any, where: str) -> Any:
    if KINDS[name] is not tuple:
        return value
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{where}: {name} must be a list of integers, got {value!r}") from None


SEED_RANGE = 2**31
"""Seeds are drawn from [0, SEED_RANGE)."""


def with_seed(params: SamplingParams, rng: random.Random) -> SamplingParams:
    """``params`` with a seed drawn from ``rng`` when they have none: a request that may run
    again (resumed after a break, moved to another chain) must sample the same tokens again."""
    if params.seed is not None:
        return params
    return dataclasses.replace(params, seed=rng.randrange(SEED_RANGE))
