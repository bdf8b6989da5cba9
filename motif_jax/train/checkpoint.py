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

import json
import signal
import threading
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from motif_jax.config import ModelConfig
from motif_jax.convert.mapping import config_from_hf
from motif_jax.convert.pretrained import check_same_architecture, is_hf_dir, load_config, load_params, save_params
from motif_jax.train.config import CheckpointConfig


class CheckpointNotFoundError(FileNotFoundError):
    pass


class _CapturedIteratorState:
    """Grain's handler calls ``get_state()`` when it writes; hand it the state as it was when save() was called."""

    def __init__(self, iterator: Any):
        state = iterator.get_state()
        self._bytes = state if isinstance(state, bytes) else json.dumps(state).encode()

    def get_state(self) -> bytes:
        return self._bytes


class Checkpointer:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig = CheckpointConfig()):
        self.directory = Path(directory).absolute()
        self.cfg = cfg
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "extra": ocp.JsonCheckpointHandler(),
            },
        )

    def should_save(self, step: int) -> bool:
        return self.cfg.save_every > 0 and step % self.cfg.save_every == 0

    def save(self, step: int, state: Any, data_iterator: Any = None, extra: dict | None = None,
             force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_CapturedIteratorState(data_iterator))
        if extra is not None:
            items["extra"] = ocp.args.JsonSave(extra)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

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

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


class PreemptionFlag:
    """Set by SIGTERM (and SIGINT when asked): the loop saves, then exits cleanly at the next step boundary."""

    def __init__(self, catch_sigint: bool = False):
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            signals = [signal.SIGTERM] + ([signal.SIGINT] if catch_sigint else [])
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self._event.set()

    @property
    def requested(self) -> bool:
        """True on every process once any process has been asked to stop (agreed by an all-gather)."""
        local = self._event.is_set()
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        return bool(multihost_utils.process_allgather(int(local)).max())

    def restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------------------------
# Policy directories: the hand-over format between stages (SFT -> RL, HF import -> SFT, scoring): the
# ``--init-from`` layout of motif_jax.convert.pretrained (model.yaml, params/, tokenizer files) plus policy.json
# ({"tokenizer": "byte" | "tokenizer.json", "source": ...}). ``--init-from`` accepts such a directory, a run
# directory whose ``final/`` is one, or a Hugging Face model directory (imported on the fly).
# ---------------------------------------------------------------------------------------------------------------------


def save_policy(directory: str | Path, model_cfg: Any, params: Any, tokenizer: str = "byte",
                source: str = "") -> Path:
    """Writes a policy directory, replacing one that exists (collective: every process calls it).

    The layout is the ``--init-from`` one of :mod:`motif_jax.convert.pretrained` (model.yaml, params/, tokenizer
    files) plus policy.json naming the tokenizer and where the policy came from.
    """
    tok_dir = None
    if tokenizer != "byte":
        tok_dir = Path(tokenizer) if Path(tokenizer).is_dir() else Path(tokenizer).parent
    directory = save_params(directory, model_cfg, params, tokenizer_dir=tok_dir, overwrite=True)
    if jax.process_index() == 0:
        tok_entry = "byte" if tokenizer == "byte" else "tokenizer.json"
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
