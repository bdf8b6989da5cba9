"""Run logging: tensorboardX events and ``metrics.jsonl`` from process 0 only, plus a console progress line.

Shared by the SFT and RL loops. Values are converted to Python floats here (one device-to-host transfer per logged
step, never per micro-step).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np


def to_python(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in jax.device_get(dict(metrics)).items():
        arr = np.asarray(value)
        if arr.size == 1:
            out[key] = float(arr.reshape(()))
    return out


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch where torch is installed but not loaded: tensorboardX
    imports torch at import time (2 of a run's 5 s of imports here) only to accept torch tensors as values, and the
    values logged here are Python floats. Where torch is already loaded it is used as it is."""
    import sys

    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX treats as "no torch"
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    def __init__(self, run_dir: str | Path, total_steps: int | None = None, enabled: bool | None = None,
                 print_every_s: float = 5.0, unit: str = "step"):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.print_every_s = print_every_s
        self.unit = unit
        self._last_print = 0.0
        self._start = time.time()
        self._first_step: int | None = None
        self._tb = None
        self._jsonl = None

    def _open(self) -> None:
        """Files are opened at the first write (a run that fails at start-up leaves no writer threads behind)."""
        SummaryWriter = _summary_writer_class()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "train") -> dict[str, float]:
        values = to_python(metrics)
        if self.enabled:
            if self._tb is None:
                self._open()
            for key, value in values.items():
                if math.isfinite(value):
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)
            self._jsonl.write(json.dumps({"step": step, "split": prefix, **values}) + "\n")
            self._jsonl.flush()
        return values

    def progress(self, step: int, values: Mapping[str, float], force: bool = False, keys: tuple[str, ...] = ()) -> None:
        """One console line (rate-limited) with the chosen values and an ETA, from process 0 only."""
        if not self.enabled:
            return
        now = time.time()
        if self._first_step is None:
            self._first_step, self._start = step, now
        if not force and now - self._last_print < self.print_every_s:
            return
        self._last_print = now
        shown = " ".join(f"{k}={values[k]:.4g}" for k in (keys or tuple(values)) if k in values)
        eta = ""
        if self.total_steps and step > self._first_step:
            rate = (now - self._start) / (step - self._first_step)
            eta = f" eta={_fmt_seconds(rate * (self.total_steps - step))}"
        total = f"/{self.total_steps}" if self.total_steps else ""
        print(f"[{self.unit} {step}{total}] {shown}{eta}", flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


def _fmt_seconds(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def write_json(path: str | Path, data: Mapping[str, Any]) -> None:
    """Writes a JSON file from process 0 (summary.json and friends)."""
    if jax.process_index() != 0:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
