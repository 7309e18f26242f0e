"""Random mutations of valid protobuf messages, for the fuzz tests of every server's edge.

``mutate(msg, rng)`` changes one to three fields of a copy of ``msg`` (any depth): a number to
an edge value (0, -1, the type's limits, nan, inf), a repeated field grown, shrunk or with an
entry changed, a string or bytes field to random bytes (invalid UTF-8 included: such a message
no longer encodes, so it is returned as raw bytes), a set message cleared. ``garbage(rng)`` is
random bytes. The result is either a message or ``bytes`` to send as they are.
"""

from __future__ import annotations

import math
import random

from google.protobuf.descriptor import FieldDescriptor as F
from google.protobuf.message import Message

N_DEFAULT = 500
"""Fuzzed messages per target in CI; ``STAGEMESH_FUZZ_N`` sets another (the issue's figure: 10,000)."""

_INTS = {
    F.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    F.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    F.CPPTYPE_UINT32: (0, 2**32 - 1),
    F.CPPTYPE_UINT64: (0, 2**64 - 1),
}


def _int(rng: random.Random, cpp: int, current: int = 0) -> int:
    low, high = _INTS[cpp]
    picks = [0, 1, -1, 2, low, high, current + 1, current - 1, rng.randint(low, high), rng.randint(-1000, 1000),
             320, 319, 256, 255, 64]
    return min(high, max(low, rng.choice(picks)))


def _float(rng: random.Random) -> float:
    return rng.choice([0.0, -1.0, 1.0, 0.5, 2.0, math.nan, math.inf, -math.inf, 1e300, -1e-300, rng.uniform(-10, 10)])


def _scalar(rng: random.Random, field, current=None):
    cpp = field.cpp_type
    if cpp in _INTS:
        return _int(rng, cpp, current if isinstance(current, int) else 0)
    if cpp in (F.CPPTYPE_FLOAT, F.CPPTYPE_DOUBLE):
        return _float(rng)
    if cpp == F.CPPTYPE_BOOL:
        return rng.random() < 0.5
    if cpp == F.CPPTYPE_ENUM:
        return rng.choice([v.number for v in field.enum_type.values])
    if cpp == F.CPPTYPE_STRING:
        if field.type == F.TYPE_BYTES:
            return rng.randbytes(rng.choice([0, 1, 7, 8, 16, 63, 64, 256, 4096]))
        return rng.choice(["", "x", "int64", "float32", "bfloat16", "\u00e9\u4e2d", "a" * 1000, "-1"])
    raise AssertionError(field)


def _fields(msg: Message) -> list[tuple[Message, object]]:
    """Every (message, field) pair in ``msg`` and its set sub-messages."""
    out = []
    for field in msg.DESCRIPTOR.fields:
        out.append((msg, field))
        if field.cpp_type == F.CPPTYPE_MESSAGE:
            if field.is_repeated:
                if not field.message_type.GetOptions().map_entry:
                    for sub in getattr(msg, field.name):
                        out.extend(_fields(sub))
            elif msg.HasField(field.name):
                out.extend(_fields(getattr(msg, field.name)))
    return out


def _mutate_field(msg: Message, field, rng: random.Random) -> None:
    name = field.name
    if field.cpp_type == F.CPPTYPE_MESSAGE:
        if field.is_repeated:
            if field.message_type.GetOptions().map_entry:
                getattr(msg, name).clear()
            elif rng.random() < 0.5 and len(getattr(msg, name)):
                del getattr(msg, name)[-1]
            else:
                getattr(msg, name).add()
        else:
            msg.ClearField(name) if msg.HasField(name) else getattr(msg, name).SetInParent()
        return
    if field.is_repeated:
        values = getattr(msg, name)
        choice = rng.random()
        if choice < 0.3 and len(values):
            del values[rng.randrange(len(values))]
        elif choice < 0.6:
            values.append(_scalar(rng, field))
        elif len(values):
            i = rng.randrange(len(values))
            values[i] = _scalar(rng, field, values[i])
        return
    setattr(msg, name, _scalar(rng, field, getattr(msg, name)))


def mutate(msg: Message, rng: random.Random) -> Message | bytes:
    """A copy of ``msg`` with one to three fields changed (module docstring), or raw bytes."""
    out = type(msg)()
    out.CopyFrom(msg)
    for _ in range(rng.randint(1, 3)):
        target, field = rng.choice(_fields(out))
        _mutate_field(target, field, rng)
    if rng.random() < 0.05:  # invalid UTF-8 in the first string field, if any: undecodable
        data = out.SerializeToString()
        return data + bytes([(1 << 3) | 2, 2, 0xFF, 0xFE]) if rng.random() < 0.5 else data[: rng.randrange(len(data) + 1)]
    return out


def garbage(rng: random.Random) -> bytes:
    """Random bytes: mostly no valid message at all."""
    return rng.randbytes(rng.choice([1, 2, 5, 16, 100, 1000]))


def fuzzed(template: Message, rng: random.Random) -> Message | bytes:
    """One fuzzed request: a mutation of ``template`` (nine in ten) or random bytes."""
    return garbage(rng) if rng.random() < 0.1 else mutate(template, rng)
