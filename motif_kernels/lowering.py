"""What a lowered program (StableHLO text) contains, without compiling it: custom calls, their operand and result
types, cuDNN mask types and the largest tensors. The memory planner reports these for programs lowered for a
platform this host cannot compile for (CUDA from a CPU machine), and the tests use them to prove properties of
the GPU program (no [T, T] attention operand, a causal mask type, no interpret-mode kernel).

Shapes are those of the lowered module before SPMD partitioning: global shapes outside ``shard_map`` bodies,
per-device shapes inside them. This module imports nothing but the standard library.
"""

from __future__ import annotations

import collections
import math
import re
from typing import NamedTuple

__all__ = ["CustomCall", "Tensor", "custom_calls", "largest_tensors", "tensors"]

_BYTES = {"f64": 8, "f32": 4, "f16": 2, "bf16": 2, "i64": 8, "ui64": 8, "i32": 4, "ui32": 4, "i16": 2, "ui16": 2,
          "i8": 1, "ui8": 1, "i1": 1, "f8E4M3FN": 1, "f8E5M2": 1, "i4": 1, "ui4": 1, "complex<f32>": 8}
_TENSOR = re.compile(r"tensor<((?:\d+x)*)([a-zA-Z][a-zA-Z0-9]*(?:<f32>)?)>")
_CALL = re.compile(r"stablehlo\.custom_call @([^\s(]+)\(")


class Tensor(NamedTuple):
    shape: tuple[int, ...]
    dtype: str

    @property
    def bytes(self) -> int:
        return math.prod(self.shape) * _BYTES.get(self.dtype, 4)

    def as_dict(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "bytes": self.bytes}


class CustomCall(NamedTuple):
    target: str  # e.g. "__cudnn$fmhaSoftmax", "__gpu$xla.gpu.triton", "tpu_custom_call"
    operands: tuple[Tensor, ...]
    results: tuple[Tensor, ...]
    backend_config: str  # the raw attribute text (JSON for cuDNN, with \22 for quotes)

    @property
    def mask_type(self) -> str | None:
        """cuDNN fMHA mask type (CAUSAL, PADDING_CAUSAL, NO_MASK, ...) from the backend config, else None."""
        m = re.search(r"mask_type\\22:\s*\\22(\w+)", self.backend_config) or re.search(
            r'"mask_type":\s*"(\w+)"', self.backend_config)
        return m.group(1) if m else None


def tensors(text: str) -> list[Tensor]:
    """Every ranked tensor type written in the module text (with repeats)."""
    out = []
    for dims, dtype in _TENSOR.findall(text):
        shape = tuple(int(d) for d in dims.split("x") if d)
        out.append(Tensor(shape, dtype))
    return out


def largest_tensors(text: str, n: int = 10) -> list[Tensor]:
    """The ``n`` largest distinct (shape, dtype) tensor types of the module, largest first."""
    return sorted(set(tensors(text)), key=lambda t: (-t.bytes, t.shape))[:n]


def _signature(line: str) -> tuple[str, str]:
    """(operand types, result types) text of an op line: ``... : (A, B) -> (C, D)`` or ``: (A) -> C``."""
    at = line.rfind(" : (")
    if at < 0:
        return "", ""
    sig = line[at + 3:]
    depth = 0
    for i, ch in enumerate(sig):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return sig[: i + 1], sig[i + 1:]
    return sig, ""


def custom_calls(text: str) -> list[CustomCall]:
    """Every custom call of the module text, in order."""
    calls = []
    for line in text.splitlines():
        m = _CALL.search(line)
        if not m:
            continue
        operands, results = _signature(line)
        config = re.search(r"backend_config\s*=\s*(\"(?:[^\"\\]|\\.)*\"|\{.*?\})", line)
        calls.append(CustomCall(m.group(1), tuple(tensors(operands)), tuple(tensors(results)),
                                config.group(1) if config else ""))
    return calls


def count_targets(calls: list[CustomCall]) -> dict[str, int]:
    return dict(collections.Counter(c.target for c in calls))
