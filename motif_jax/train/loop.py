"""The loop skeleton SFT and RL share: restore-or-init, periodic hooks, checkpoints, evaluation, the summary.

A trainer subclasses :class:`Trainer` and supplies what is its own: ``run_unit(index)`` (one SFT step, one RL
round) and, where it has any, checkpoint items beyond the train state (the RL buffer arrays) and summary fields.
The skeleton owns everything else, once:

- restore-or-init (:meth:`Trainer.restore_or_init`): the newest complete checkpoint of the run directory restored
  straight into the target shardings, else ``--init-from`` or a random init (``motif_jax.train.state``);
- the run (:meth:`Trainer.run`): optional evaluation before the first unit, metrics every ``--log-every`` units
  (read one unit late, so the device never waits for Python), a progress line with an ETA, evaluation every
  ``--eval.every`` units (``--eval.stop-at-accuracy`` finishes early), checkpoints every ``--checkpoint.save-every`` units, ``--stop-after-steps`` and SIGTERM
  (save, exit, resume later), ``--max-minutes`` (finish early), the non-finite guard (``--max-bad-steps``), a
  final checkpoint, evaluation and policy directory, and ``summary.json``.

A unit's metrics may be device arrays; they are converted to floats when consumed. A ``skipped`` metric counts
for the non-finite guard (RL, whose unit holds several optimizer steps, reports each step to the guard itself).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import optax
import yaml
from flax import nnx

from motif_jax.config import ModelConfig, to_dict
from motif_jax.data.tokenizer import Tokenizer
from motif_jax.parallel import mesh as mesh_lib
from motif_jax.train.checkpoint import Checkpointer, PreemptionFlag, save_policy
from motif_jax.train.config import RunConfig
from motif_jax.train.evaluate import Checker, default_checker, exact_match
from motif_jax.train.metrics import MetricsWriter, to_python, write_json
from motif_jax.train.state import TrainState, abstract_train_state, init_train_state

__all__ = ["NonFiniteError", "NonFiniteGuard", "Trainer"]


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Counts skipped (non-finite) optimizer steps; ``max_in_row`` in a row raise :class:`NonFiniteError`."""

    def __init__(self, max_in_row: int):
        self.max_in_row = max_in_row
        self.total = 0
        self.in_row = 0

    def observe(self, skipped: bool, step: int) -> None:
        self.total += int(skipped)
        self.in_row = self.in_row + 1 if skipped else 0
        if self.in_row >= self.max_in_row:
            raise NonFiniteError(
                f"{self.in_row} optimizer steps in a row had a non-finite loss or gradient (last at step {step}); "
                "lower --optim.lr, check the data, or raise --max-bad-steps")

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "in_row": self.in_row}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.total, self.in_row = int(state["total"]), int(state["in_row"])


class Trainer:
    """Everything a run has besides its unit of work; see the module docstring for the hooks."""

    unit = "step"  # what run_unit does once: "step" (SFT) or "round" (RL)
    evaluate_before = False  # evaluate the starting policy (RL reports its gain)
    metrics_prefix = "train"  # the split of the per-unit metrics in metrics.jsonl / TensorBoard
    progress_keys: tuple[str, ...] = ("loss", "grad_norm", "learning_rate")

    # Set by the subclass before restore_or_init / run.
    model_cfg: ModelConfig
    tokenizer: Tokenizer
    tokenizer_spec: str
    graphdef: nnx.GraphDef
    shardings: TrainState
    state: TrainState
    policy_source: str = ""
    data_iterator: Any = None

    def __init__(self, cfg: RunConfig, total_units: int):
        self.cfg = cfg
        self.eval_records: list[dict[str, Any]] = []  # the subclass loads them
        self.checker: Checker = default_checker
        self.total = total_units
        self.run_dir = Path(cfg.run_dir).absolute()
        self.is_main = jax.process_index() == 0
        self.mesh = mesh_lib.make_mesh(cfg.mesh)
        self.index = 0  # units done
        self.resumed = False
        self.guard = NonFiniteGuard(cfg.max_bad_steps)
        self.accuracy_before: float | None = None
        self.eval_history: list[dict[str, Any]] = []
        self._wall_before = 0.0  # wall time of earlier invocations of this run directory
        self._t_start = time.time()
        self.ckpt = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint)
        # console lines every --log-every units (that is the rate limit)
        self.writer = MetricsWriter(self.run_dir, total_steps=total_units, print_every_s=0.0, unit=self.unit)

    # -- hooks ----------------------------------------------------------------------------------------------------------
    def run_unit(self, index: int) -> Mapping[str, Any]:
        """Runs unit ``index`` (0-based); returns its metrics (device arrays allowed)."""
        raise NotImplementedError

    def log_values(self, values: dict[str, float], index: int) -> dict[str, float]:
        """Derived metrics of a logged unit (rates, means); ``values`` are the unit's metrics as floats."""
        return values

    def checkpoint_items(self) -> dict[str, Any]:
        """Arrays saved beside the train state (restored into :meth:`abstract_checkpoint_items`)."""
        return {}

    def abstract_checkpoint_items(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def checkpoint_extra(self) -> dict[str, Any]:
        """Small JSON saved with each checkpoint (read back by :meth:`load_checkpoint`)."""
        return {}

    def load_checkpoint(self, items: Mapping[str, Any], extra: Mapping[str, Any]) -> None:
        pass

    def extra_eval(self) -> dict[str, float]:
        """Evaluation results beside exact-match accuracy (SFT: held-out loss)."""
        return {}

    def eval_context(self) -> dict[str, float]:
        """Counters recorded with each evaluation (RL: rollouts so far)."""
        return {}

    def should_stop(self) -> str:
        """A reason to finish before ``total`` units (RL: the rollout budget), or ''."""
        return ""

    def summary_extra(self) -> dict[str, Any]:
        return {}

    # -- helpers --------------------------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def elapsed(self) -> float:
        """Wall time of this run directory, earlier invocations included (what --max-minutes limits)."""
        return self._wall_before + time.time() - self._t_start

    def model(self) -> Any:
        return nnx.merge(self.graphdef, self.state.params)

    def close(self) -> None:
        """Waits for checkpoint writes and closes the writers (run() does it; call it for a trainer never run)."""
        self.ckpt.close()
        self.writer.close()

    def restore_or_init(self, tx: optax.GradientTransformation, policy_dir: Path | None) -> TrainState:
        """The train state: the newest complete checkpoint of the run directory (with every other item and the
        loop's counters), else the ``--init-from`` policy, else a random init; always built in its shardings."""
        rules = self.cfg.mesh.logical_rules
        abstract, self.graphdef, self.shardings = abstract_train_state(self.model_cfg, tx, self.mesh, rules)
        found = self.ckpt.restore_newest(lambda extra: {"train": abstract, **self.abstract_checkpoint_items(extra)},
                                         data_iterator=self.data_iterator)
        if found is None:
            state, _, _ = init_train_state(self.model_cfg, tx, self.mesh, rules, seed=self.cfg.seed,
                                           policy_dir=policy_dir)
            return state
        step, restored, extra = found
        self.index = int(extra["index"])
        self._wall_before = float(extra["wall_s"])
        self.guard.load_state_dict(extra["guard"])
        self.accuracy_before = extra.get("accuracy_before")
        self.eval_history = list(extra.get("eval_history", []))
        self.load_checkpoint(restored, extra)
        self.resumed = True
        self.log(f"resumed from {self.unit} {self.index} ({self.ckpt.directory})")
        return restored["train"]

    def save(self, force: bool = False) -> None:
        items = {"train": self.state, **self.checkpoint_items()}
        extra = {"index": self.index, "wall_s": self.elapsed(), "guard": self.guard.state_dict(),
                 "accuracy_before": self.accuracy_before, "eval_history": self.eval_history,
                 **self.checkpoint_extra()}
        self.ckpt.save(self.index, items, data_iterator=self.data_iterator, extra=extra, force=force)

    def evaluate(self) -> dict[str, Any]:
        """Greedy exact match on the held-out records (+ :meth:`extra_eval`), logged and kept in the history."""
        if not self.eval_records:
            return {}
        with mesh_lib.activate(self.mesh, self.cfg.mesh):
            result = exact_match(self.model(), self.tokenizer, self.eval_records,
                                 max_new_tokens=self.cfg.eval.max_new_tokens, batch_size=self.cfg.eval.batch_size,
                                 checker=self.checker)
        result.update(self.extra_eval())
        shown = {k: float(v) for k, v in result.items() if k in ("accuracy", "loss", "truncated_fraction")}
        entry = {self.unit: self.index, **shown, **self.eval_context(), "wall_s": self.elapsed()}
        self.eval_history.append(entry)
        self.writer.write(self.index, {k: v for k, v in entry.items() if k != self.unit}, prefix="eval")
        self.log(f"[eval {self.unit} {self.index}] " + " ".join(f"{k}={v:.4g}" for k, v in shown.items()))
        return result

    # -- the run --------------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        if self.evaluate_before and not self.resumed and self.eval_records:
            self.accuracy_before = float(self.evaluate()["accuracy"])
        preempt = PreemptionFlag()
        status, start = "finished", self.index
        last_saved = self.index if self.resumed else None
        pending: Callable[[], None] | None = None  # the host side of the last unit, not consumed yet
        last_eval: tuple[int, dict[str, Any]] = (-1, {})

        def flush() -> None:
            nonlocal pending
            if pending is not None:
                pending, consume = None, pending
                consume()
        try:
            while self.index < self.total:
                if cfg.max_minutes and self.elapsed() > cfg.max_minutes * 60:
                    status = "max_minutes"
                    break
                reason = self.should_stop()
                if reason:
                    status = reason
                    break
                metrics = self.run_unit(self.index)
                self.index += 1
                flush()
                pending = self._consumer(metrics, self.index)
                if cfg.eval.every and self.index % cfg.eval.every == 0 and self.index < self.total:
                    flush()
                    last_eval = (self.index, self.evaluate())
                    if cfg.eval.stop_at_accuracy and last_eval[1].get("accuracy", 0.0) >= cfg.eval.stop_at_accuracy:
                        status = "target_accuracy"
                        break
                preempted = preempt.requested  # one collective per unit (agreed by all processes)
                stop = preempted or (cfg.stop_after_steps > 0 and self.index - start >= cfg.stop_after_steps
                                     and self.index < self.total)
                if self.ckpt.should_save(self.index) or stop:
                    flush()  # the guard's counters go into the checkpoint
                    self.save(force=stop)
                    last_saved = self.index
                if stop:
                    status = "preempted" if preempted else "stopped"
                    break
            flush()
            if last_saved != self.index:
                self.save(force=True)
            self.ckpt.wait()
            if status in ("preempted", "stopped"):
                why = "stop requested" if status == "preempted" else f"--stop-after-steps {cfg.stop_after_steps}"
                self.log(f"{why}: saved {self.unit} {self.index}, exiting (re-run to resume)")
                return {"status": status, self.unit + "s": self.index}
            final = last_eval[1] if last_eval[0] == self.index else (self.evaluate() if self.eval_records else {})
            policy = save_policy(self.run_dir / "final", self.model_cfg, self.state.params, self.tokenizer,
                                 source=f"{self.unit} {self.index} of {self.run_dir}")
        finally:
            preempt.restore_handlers()
            self.close()
        summary = {
            "status": status,
            self.unit + "s": self.index,
            "wall_time_s": self.elapsed(),
            "skipped_steps": self.guard.total,
            "accuracy_before": self.accuracy_before,
            "accuracy_after": final.get("accuracy"),
            "final_eval": {k: v for k, v in final.items() if k != "examples"},
            "eval_examples": final.get("examples", []),
            "eval_history": self.eval_history,
            "final_policy": str(policy),
            "policy": self.policy_source,
            **self.summary_extra(),
        }
        write_json(self.run_dir / "summary.json", summary)
        return summary

    def _consumer(self, metrics: Mapping[str, Any], index: int) -> Callable[[], None]:
        """The host side of a finished unit, run one unit later (or now, before an evaluation or a save)."""

        def consume() -> None:
            values = to_python(metrics)
            if "skipped" in values:
                self.guard.observe(values["skipped"] > 0, index)
            if index % self.cfg.log_every == 0 or index == self.total:
                values = self.writer.write(index, {**self.log_values(values, index),
                                                   "skipped_total": self.guard.total}, prefix=self.metrics_prefix)
                self.writer.progress(index, values, keys=self.progress_keys)

        return consume
