"""The platform a program is lowered for: one explicit answer shared by every backend choice.

Which attention kernel, which LM-head backend and whether a Pallas kernel runs in interpret mode depend on the
platform the program will run on, which is not always the host's: the memory planner lowers the train step for
CUDA or compiles it for TPU from a CPU machine. Every such choice reads :func:`current_target`, which answers, in
order of precedence:

1. an explicit target set with :func:`lowering_target` (the planner's ``--lower-for`` / ``--topology``, tests);
2. the devices of the active mesh (``jax.set_mesh``; e.g. compile-only TPU devices from a topology);
3. the devices this process runs on (``jax.devices()[0]``), i.e. the program is run where it is traced.

Never ``jax.default_backend()`` alone: with an explicit target or a mesh of another platform it is the wrong answer.
This module imports jax only.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from typing import Iterator

import jax

__all__ = [
    "DEFAULT_GPU_KIND",
    "DEFAULT_TPU_KIND",
    "PLATFORMS",
    "Target",
    "abstract_device",
    "current_target",
    "lowering_target",
]

PLATFORMS = ("cpu", "gpu", "tpu")
# What "lower for cuda" means when no device kind is given: the GPU this project is sized for.
DEFAULT_GPU_KIND = "NVIDIA H100 80GB HBM3"
DEFAULT_TPU_KIND = "TPU v5p"

# (device-kind pattern, compute capability) for the NVIDIA parts a plan may target; first match wins.
_CAPABILITIES = (
    (r"\bGB?200\b|\bB200\b|\bB100\b", (10, 0)),
    (r"\bGH200\b|\bH100\b|\bH200\b|\bH800\b|\bH20\b", (9, 0)),
    (r"\bL4\b|\bL40S?\b|\bRTX 40", (8, 9)),
    (r"\bA100\b|\bA800\b|\bA30\b", (8, 0)),
    (r"\bA10G?\b|\bA40\b|\bRTX 30", (8, 6)),
    (r"\bV100\b", (7, 0)),
)

_TARGET: contextvars.ContextVar["Target | None"] = contextvars.ContextVar("kernels_lowering_target", default=None)


def _normalise(platform: str) -> str:
    platform = platform.lower()
    if platform in ("cuda", "rocm", "gpu"):
        return "gpu"
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; choose one of cpu, gpu (cuda), tpu")
    return platform


@dataclasses.dataclass(frozen=True)
class Target:
    """A platform (``cpu`` | ``gpu`` | ``tpu``) and, where known, the device kind (``NVIDIA H100 80GB HBM3``)."""

    platform: str
    device_kind: str | None = None
    explicit: bool = False  # set by lowering_target (the program may not run in this process)

    @property
    def lowering_platforms(self) -> tuple[str, ...]:
        """The value for ``Traced.lower(lowering_platforms=...)``: cuda for NVIDIA GPUs."""
        if self.platform == "gpu":
            return ("rocm",) if (self.device_kind or "").startswith(("AMD", "gfx")) else ("cuda",)
        return (self.platform,)

    @property
    def compute_capability(self) -> tuple[int, int] | None:
        """(major, minor) of an NVIDIA target, from its device kind (or the local GPU); None otherwise."""
        if self.platform != "gpu":
            return None
        kind = self.device_kind or ""
        for pattern, cap in _CAPABILITIES:
            if re.search(pattern, kind):
                return cap
        if not self.explicit:  # the program runs on this process's GPU: ask it
            cap = getattr(jax.devices()[0], "compute_capability", None)
            if cap:
                major, _, minor = str(cap).partition(".")
                return int(major), int(minor or 0)
        return None

    @property
    def interpret(self) -> bool:
        """Pallas kernels run in interpret mode only when the program runs on a CPU."""
        return self.platform == "cpu"


@contextlib.contextmanager
def lowering_target(platform: str, device_kind: str | None = None) -> Iterator[Target]:
    """Backend choices made while tracing inside this context are those of ``platform`` (``cpu``, ``cuda``/``gpu``,
    ``tpu``); ``device_kind`` defaults to an H100 for GPUs and a v5p for TPUs."""
    platform = _normalise(platform)
    if device_kind is None:
        device_kind = {"gpu": DEFAULT_GPU_KIND, "tpu": DEFAULT_TPU_KIND}.get(platform)
    target = Target(platform, device_kind, explicit=True)
    token = _TARGET.set(target)
    try:
        yield target
    finally:
        _TARGET.reset(token)


def current_target() -> Target:
    """The target of the program being traced: explicit, else the active mesh's devices, else this process's."""
    explicit = _TARGET.get()
    if explicit is not None:
        return explicit
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
    if device is not None and getattr(device, "platform", None):
        return Target(_normalise(device.platform), device.device_kind)
    local = jax.devices()[0]
    return Target(_normalise(local.platform), local.device_kind)


def abstract_device(target: Target) -> jax.sharding.AbstractDevice:
    """The ``AbstractDevice`` JAX's own GPU lowerings (Pallas Triton) read the target architecture from."""
    return jax.sharding.AbstractDevice(device_kind=target.device_kind or "", num_cores=None,
                                       platform=target.platform)
