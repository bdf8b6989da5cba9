"""Orbax checkpoints holding everything a run needs to continue exactly: train state, data iterator, extras.

One ``CheckpointManager`` step directory holds up to three items:
- ``state``: a pytree of arrays (train state, RL buffer arrays), saved asynchronously, restored straight into the
  shardings of an abstract target (``jax.ShapeDtypeStruct`` leaves with ``.sharding``), onto any mesh;
- ``data``: the Grain iterator state, one JSON file per process (Grain's own Orbax handler), captured at save time
  so a background save never sees a later position;
- ``extra``: small JSON (RL pass-rate tables, policy version, stage index...).
A step directory only counts once Orbax has finalised it, so a run killed during an asynchronous save restarts
from the previous complete step.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import grain
import jax
import orbax.checkpoint as ocp

from motif_jax.config import ModelConfig
from motif_jax.convert.mapping import config_from_hf
from motif_jax.convert.pretrained import check_same_architecture, is_hf_dir, load_config, load_params, save_params
from motif_jax.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from motif_jax.train.config import CheckpointConfig


class CheckpointNotFoundError(FileNotFoundError):
    pass


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used or written; the message says which step and what to do."""


TMP_MARKER = ".orbax-checkpoint-tmp"


def _one_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (Orbax and TensorStore errors run to many lines)."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"{type(e).__name__}: {text[:limit]}"


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


class _CapturedIteratorState:
    """Grain's handler calls ``get_state()`` when it writes; hand it the state as it was when save() was called."""

    def __init__(self, iterator: Any):
        state = iterator.get_state()
        self._bytes = state if isinstance(state, bytes) else json.dumps(state).encode()

    def get_state(self) -> bytes:
        return self._bytes


class Checkpointer:
    """An Orbax ``CheckpointManager`` of one run directory that fails in one line and falls back on bad steps.

    At start-up, leftover temporary directories of saves that never finished (a run killed while saving) are
    reported and removed. :meth:`restore_newest` restores the newest step that reads back completely; a step that
    does not (a truncated or zeroed chunk, missing or garbage metadata, a bad iterator or JSON item, an emptied
    directory) is renamed ``<step>.unreadable`` with one warning line naming it and why, and the previous step is
    tried. A save that fails (disk full, permissions) raises :class:`CheckpointError` naming the step.
    """

    def __init__(self, directory: str | Path, cfg: CheckpointConfig = CheckpointConfig()):
        self.directory = Path(directory).absolute()
        self.cfg = cfg
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory} exists and is not a directory; move it away or choose another "
                                  "--run-dir")
        self._remove_unfinished()
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                               create=True)
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                item_handlers={
                    "state": ocp.StandardCheckpointHandler(),
                    "data": grain.checkpoint.CheckpointHandler(),
                    "extra": ocp.JsonCheckpointHandler(),
                },
            )
        except OSError as e:
            raise CheckpointError(f"cannot use {self.directory} for checkpoints ({_one_line(e)}); choose another "
                                  "--run-dir") from None
        self._pending_step: int | None = None

    def _remove_unfinished(self) -> None:
        if not self.directory.is_dir():
            return
        leftovers = sorted(p for p in self.directory.iterdir() if TMP_MARKER in p.name)
        if not leftovers:
            return
        _warn(f"{self.directory}: removing {len(leftovers)} unfinished checkpoint write(s) of an earlier run "
              f"({', '.join(p.name for p in leftovers)}); they never completed")
        if jax.process_index() == 0:
            for p in leftovers:
                shutil.rmtree(p, ignore_errors=True)

    def should_save(self, step: int) -> bool:
        return self.cfg.save_every > 0 and step % self.cfg.save_every == 0

    def save(self, step: int, state: Any, data_iterator: Any = None, extra: dict | None = None,
             force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_CapturedIteratorState(data_iterator))
        if extra is not None:
            items["extra"] = ocp.args.JsonSave(extra)
        with self._failures(step):  # an earlier asynchronous save's failure surfaces here
            self._pending_step = step
            return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    @contextlib.contextmanager
    def _failures(self, step: int | None) -> Iterator[None]:
        try:
            yield
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - Orbax / TensorStore raise many types; all mean "not saved"
            which = self._pending_step if self._pending_step is not None else step
            raise CheckpointError(f"saving checkpoint step {which} to {self.directory} failed ({_one_line(e)}); "
                                  "free disk space or fix the directory, then re-run to resume from the last "
                                  f"complete step {self._manager_latest()}") from None

    def _manager_latest(self) -> int | None:
        try:
            return self._manager.latest_step()
        except Exception:  # noqa: BLE001
            return None

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def restore(self, abstract_state: Any, data_iterator: Any = None, step: int | None = None,
                with_extra: bool = False) -> tuple[Any, dict | None]:
        """Restores ``step`` (default: newest complete) into the shardings of ``abstract_state``.

        ``data_iterator`` (if given) is moved to the saved position in place. Returns (state, extra or None).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointNotFoundError(f"no complete checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise CheckpointNotFoundError(f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        if with_extra:
            items["extra"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], (restored["extra"] if with_extra else None)

    def read_extra(self, step: int) -> dict[str, Any]:
        """The ``extra`` item of ``step`` alone (it can size the other items before their restore)."""
        out = self._manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
        return dict(out["extra"])

    def restore_newest(self, targets: Callable[[dict[str, Any]], Any],
                       data_iterator: Any = None) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, restored state item, extra) of the newest step that reads back completely, or None if there is
        no step. ``targets(extra)`` gives the abstract state item of a step from its extra JSON. Unreadable steps
        are set aside (see the class docstring); if no step reads back, CheckpointError names the newest one."""
        failures = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                extra = self.read_extra(step)
                state, _ = self.restore(targets(extra), data_iterator=data_iterator, step=step)
            except Exception as e:  # noqa: BLE001 - any unreadable part of a step: fall back to the previous one
                failures.append(f"step {step}: {_one_line(e)}")
                self._set_aside(step, _one_line(e))
                continue
            return step, state, extra
        if failures:
            raise CheckpointError(f"no checkpoint in {self.directory} reads back ({'; '.join(failures)}); move the "
                                  "directory away to start fresh")
        return None

    def _set_aside(self, step: int, reason: str) -> None:
        target = self.directory / f"{step}.unreadable"
        _warn(f"checkpoint step {step} in {self.directory} is unreadable ({reason}); moved it to {target.name} and "
              "trying the previous step")
        if jax.process_index() == 0:
            shutil.rmtree(target, ignore_errors=True)
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint step {step} set aside")
        self._manager.reload()

    def wait(self) -> None:
        with self._failures(None):
            self._manager.wait_until_finished()
        self._pending_step = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()


class PreemptionFlag:
    """Set by SIGTERM (and SIGINT when asked): the loop saves, then exits cleanly at the next unit boundary.

    A stop must happen in bounded time even when the run is stuck (a hung save, a collective that never returns):
    a second signal, or ``grace_s`` seconds after the first without the run having ended, exits the process at
    once (status 128 + signal) with one line saying so.
    """

    def __init__(self, catch_sigint: bool = False, grace_s: float = 300.0):
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        self._grace_s = grace_s
        self._timer: threading.Timer | None = None
        if threading.current_thread() is threading.main_thread():
            signals = [signal.SIGTERM] + ([signal.SIGINT] if catch_sigint else [])
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self._event.is_set():
            self._exit(signum, "a second stop signal")
        self._event.set()
        self._timer = threading.Timer(self._grace_s, self._exit, (signum, f"{self._grace_s:.0f} s after the signal"))
        self._timer.daemon = True
        self._timer.start()

    @staticmethod
    def _exit(signum: int, why: str) -> None:
        print(f"stop requested: exiting now ({why}; the newest complete checkpoint is kept)", file=sys.stderr,
              flush=True)
        os._exit(128 + signum)

    @property
    def requested(self) -> bool:
        """True on every process once any process has been asked to stop (agreed by an all-gather)."""
        local = self._event.is_set()
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        return bool(multihost_utils.process_allgather(int(local)).max())

    def restore_handlers(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------------------------
# Policy directories: the hand-over format between stages (SFT -> RL, HF import -> SFT, scoring): the
# ``--init-from`` layout of motif_jax.convert.pretrained (model.yaml, params/, tokenizer files) plus policy.json
# ({"tokenizer": "byte" | "tokenizer.json", "source": ...}). ``--init-from`` accepts such a directory, a run
# directory whose ``final/`` is one, or a Hugging Face model directory (imported on the fly).
# ---------------------------------------------------------------------------------------------------------------------


def save_policy(directory: str | Path, model_cfg: Any, params: Any, tokenizer: Tokenizer | str = "byte",
                source: str = "") -> Path:
    """Writes a policy directory, replacing one that exists (collective: every process calls it).

    The layout is the ``--init-from`` one of :mod:`motif_jax.convert.pretrained` (model.yaml, params/) plus the
    tokenizer as it was used (vocabulary, special tokens, chat template and stop tokens, so every later stage and
    the Hugging Face export render and stop the same way) and policy.json naming the tokenizer and the source.
    ``tokenizer``: the run's Tokenizer, or a spec for :func:`load_tokenizer`.
    """
    tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    directory = save_params(directory, model_cfg, params, overwrite=True)
    if jax.process_index() == 0:
        tokenizer.save(directory)
        tok_entry = "byte" if isinstance(tokenizer, ByteTokenizer) else "tokenizer.json"
        (directory / "policy.json").write_text(json.dumps({"tokenizer": tok_entry, "source": source}) + "\n")
    return directory


def resolve_policy_dir(path: str | Path) -> Path:
    """The policy directory behind ``path``: itself, its ``final/``, or a Hugging Face model directory."""
    path = Path(path).absolute()
    for candidate in (path, path / "final"):
        if ((candidate / "model.yaml").is_file() and (candidate / "params").is_dir()) or is_hf_dir(candidate):
            return candidate
    raise CheckpointNotFoundError(
        f"--init-from {path}: not a policy directory (needs model.yaml and params/, or a Hugging Face config.json "
        "with safetensors) and has no final/ one; give an SFT/RL run directory that finished, a directory written "
        "by scripts/convert_hf.py import, or a Hugging Face model directory"
    )


def policy_model_config(directory: Path) -> tuple[ModelConfig, str]:
    """(the ModelConfig saved in a resolved policy directory, its tokenizer spec), reading no parameters."""
    if is_hf_dir(directory):
        model_cfg, _ = config_from_hf(json.loads((directory / "config.json").read_text()))
    else:
        model_cfg = load_config(directory)
    meta = json.loads((directory / "policy.json").read_text()) if (directory / "policy.json").is_file() else {}
    tok = meta.get("tokenizer") or ("tokenizer.json" if (directory / "tokenizer.json").is_file() else "byte")
    return model_cfg, tok if tok == "byte" else str(directory / tok)


def load_policy_params(directory: Path, model_cfg: ModelConfig, shardings: Any = None) -> Any:
    """The parameters of a resolved policy directory, restored straight into ``shardings`` (a State of
    NamedShardings; no host copy of the whole model). ``model_cfg`` must have the policy's architecture."""
    loaded_cfg, params = load_params(directory, shardings=shardings)
    check_same_architecture(loaded_cfg, model_cfg)
    return params


def load_policy(path: str | Path, shardings: Any = None) -> tuple[ModelConfig, Any, str]:
    """-> (ModelConfig, parameter nnx.State, tokenizer spec) from a policy, run or Hugging Face directory."""
    directory = resolve_policy_dir(path)
    model_cfg, tok = policy_model_config(directory)
    return model_cfg, load_policy_params(directory, model_cfg, shardings), tok
