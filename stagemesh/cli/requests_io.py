"""What `stagemesh generate` reads and writes: input lines in, one outcome per line out.

Torch-free: the same parsing and output serve the in-process engine and a remote mesh.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from stagemesh.errors import InvalidArgument, StagemeshError
from stagemesh.serving.params import KINDS, NAMES, PARAMS, SamplingParams, param_of, with_values
from stagemesh.serving.types import TokenLogprobs


@dataclass(frozen=True)
class InputLine:
    """One request as the user wrote it: text or token ids, and its sampling parameters."""

    prompt: str | None
    token_ids: tuple[int, ...] | None
    params: SamplingParams


@dataclass
class Outcome:
    """What one input line produced: generated ids and text, or the error that stopped it."""

    token_ids: list[int]
    text: str | None = None
    finish_reason: str | None = None
    error: StagemeshError | None = None
    logprobs: list[TokenLogprobs | None] | None = None
    """With ``--logprobs``: one per generated token."""

    def to_json(self) -> dict:
        """``logprobs`` (with ``--logprobs``): per token ``{"logprob", "top_logprobs": [[id, logprob], ...]}``."""
        if self.error is not None:
            return {"error": {"code": self.error.code, "message": self.error.message}}
        doc = {"token_ids": self.token_ids, "text": self.text, "finish_reason": self.finish_reason}
        if self.logprobs is not None:
            doc["logprobs"] = [_logprobs_json(lp) for lp in self.logprobs]
        return doc


def _logprobs_json(lp: TokenLogprobs | None) -> dict:
    if lp is None:
        return {"logprob": None, "top_logprobs": []}
    return {"logprob": lp.logprob, "top_logprobs": [list(pair) for pair in lp.top]}


def id_list(text: str) -> tuple[int, ...]:
    """Comma-separated integers, e.g. ``1,2,3``; ValueError names none (argparse's message does)."""
    return tuple(int(t) for t in text.split(",") if t.strip())


def parse_token_ids(text: str) -> tuple[int, ...]:
    try:
        return id_list(text)
    except ValueError:
        raise InvalidArgument(f"--token-ids must be comma-separated integers, got {text!r}") from None


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """One flag per ``SamplingParams`` field (``--top-p`` for ``top_p``), with its default and help."""
    for f in PARAMS:
        flag, help = "--" + f.name.replace("_", "-"), param_of(f).help.replace("%", "%%")
        kind = KINDS[f.name]
        if kind is bool:
            p.add_argument(flag, action="store_true", help=help)
        elif kind is tuple:
            p.add_argument(flag, type=id_list, default=f.default, metavar="IDS", help=f"comma-separated: {help}")
        else:
            p.add_argument(flag, type=kind, default=f.default, help=f"{help} (default: {f.default})")


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    """The ``SamplingParams`` the flags of ``add_sampling_flags`` give."""
    return SamplingParams(**{name: getattr(args, name) for name in NAMES})


def read_inputs(prompt: str | None, token_ids: str | None, input_file: str | None, defaults: SamplingParams) -> list[InputLine]:
    """The requests of one `generate` call: ``--prompt``, ``--token-ids`` or a JSONL file."""
    if sum(x is not None for x in (prompt, token_ids, input_file)) != 1:
        raise InvalidArgument("give exactly one of --prompt, --token-ids or --input")
    if prompt is not None:
        return [InputLine(prompt, None, defaults)]
    if token_ids is not None:
        return [InputLine(None, parse_token_ids(token_ids), defaults)]
    return _read_jsonl(Path(input_file), defaults)


def _read_jsonl(path: Path, defaults: SamplingParams) -> list[InputLine]:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise InvalidArgument(f"cannot read --input {path}: {e.strerror}") from None
    out = [_parse_line(n, line, defaults) for n, line in enumerate(lines, 1) if line.strip()]
    if not out:
        raise InvalidArgument(f"--input {path} has no requests (one JSON object per line)")
    return out


def _parse_line(n: int, line: str, defaults: SamplingParams) -> InputLine:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"line {n} of --input is not JSON: {e.msg}") from None
    if not isinstance(obj, dict) or ("prompt" in obj) == ("token_ids" in obj):
        raise InvalidArgument(f'line {n} of --input must be an object with exactly one of "prompt" or "token_ids"')
    sampling = {k: v for k, v in obj.items() if k not in ("prompt", "token_ids")}
    params = with_values(defaults, sampling, f"line {n} of --input")
    try:
        token_ids = None if "token_ids" not in obj else tuple(int(t) for t in obj["token_ids"])
    except (TypeError, ValueError):
        raise InvalidArgument(f"line {n} of --input: token_ids must be a list of integers") from None
    return InputLine(obj.get("prompt"), token_ids, params)


def write_outcomes(outcomes: list[Outcome], as_json: bool, out, err) -> int:
    """Print one result per input line (stdout) and one line per failure (stderr); the exit code."""
    failed = 0
    for n, o in enumerate(outcomes, 1):
        if o.error is not None:
            failed += 1
            where = f"request {n}: " if len(outcomes) > 1 else ""
            print(f"error: {where}{o.error.code}: {o.error.message}", file=err)
        if as_json:
            print(json.dumps(o.to_json()), file=out)
        elif o.error is None:
            print(o.text if o.text is not None else " ".join(map(str, o.token_ids)), file=out)
    return 1 if failed else 0
