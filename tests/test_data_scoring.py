"""Trace-alignment scoring: after a short SFT on one trace style, the model's NLL separates that style from the
teacher style on held-out problems; the filter keeps the aligned traces; scripts/score_traces.py runs end to end.

One tiny model (2 layers) is trained once per module (30 steps, single device) and shared by the tests.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from motif_jax.config import ModelConfig, load_yaml
from motif_jax.data.config import DataConfig, SourceConfig
from motif_jax.data.pipeline import make_data_iterator
from motif_jax.data.records import read_records, write_jsonl
from motif_jax.data.scoring import (
    filter_by_score,
    roc_auc,
    score_records,
    select_traces,
    style_aucs,
    summarize,
)
from motif_jax.data.synthetic import synthetic_records
from motif_jax.data.tokenizer import load_tokenizer
from motif_jax.model.transformer import create_model
from motif_jax.train.checkpoint import load_policy, save_policy
from motif_jax.train.config import OptimConfig
from motif_jax.train.optim import make_optimizer
from motif_jax.train.state import TrainState
from motif_jax.train.step import BATCH_KEYS, lm_loss, make_train_step

ROOT = Path(__file__).resolve().parents[1]
DIGITS = "min_digits=3&max_digits=4"
TRAIN_STEPS = 30
N_HELDOUT = 48


def _spec(style: str, n: int, split: str) -> str:
    return f"synthetic:addition?style={style}&n={n}&split={split}&{DIGITS}"


def _load_script():
    spec = importlib.util.spec_from_file_location("score_traces", ROOT / "scripts" / "score_traces.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("score_traces", mod)  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------------------------------------
# Pure functions (no model)
# ---------------------------------------------------------------------------------------------------------------------


def test_roc_auc_hand_computed():
    # pairs (pos > neg): 0.9 beats 3, 0.8 beats 3, 0.4 beats 0.1 and ties 0.4 (half) -> 7.5 / 9
    assert roc_auc([0.9, 0.8, 0.4], [0.5, 0.4, 0.1]) == pytest.approx(7.5 / 9)
    assert roc_auc([3, 2], [1, 0]) == 1.0
    assert roc_auc([0], [1, 2]) == 0.0
    assert roc_auc([1, 1], [1]) == 0.5
    assert np.isnan(roc_auc([], [1.0]))
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 6, 70).astype(float), rng.integers(0, 6, 50).astype(float)
    brute = ((a[:, None] > b[None]).sum() + 0.5 * (a[:, None] == b[None]).sum()) / (a.size * b.size)
    assert roc_auc(a, b) == pytest.approx(brute)


def _fake(nll, style="aligned", task="addition", answer=True, correct=True, steps=3):
    return {"nll": nll, "style": style, "task": task, "source": "t", "has_answer_line": answer,
            "answer_correct": correct, "steps": steps, "trained_tokens": 10}


def test_select_traces_reasons_and_quantile_per_task():
    scores = [_fake(0.5), _fake(0.7), _fake(0.9), _fake(2.0), _fake(0.1, answer=False), _fake(0.2, correct=False),
              _fake(0.3, correct=None, steps=0), _fake(3.0, task="linear"), _fake(4.0, task="linear")]
    r = select_traces(scores, keep_quantile=0.5, quantile_by="task", min_steps=1)
    assert r[4] == "no_answer_line" and r[5] == "wrong_answer" and r[6] == "too_few_steps"
    # addition's well-formed NLLs 0.5 0.7 0.9 2.0 -> median 0.8; linear's 3.0 4.0 -> median 3.5
    assert r[:4] == [None, None, "nll_above_quantile", "nll_above_quantile"]
    assert r[7:] == [None, "nll_above_quantile"]
    # over all traces the cut falls in addition's range and drops linear wholesale
    r_all = select_traces(scores, keep_quantile=0.5, min_steps=1)
    assert r_all[7:] == ["nll_above_quantile"] * 2
    r_max = select_traces(scores, max_nll=0.8, require_answer_line=False, require_correct=False)
    assert [x is None for x in r_max] == [True, True, False, False, True, True, True, False, False]
    assert [s["nll"] for s in filter_by_score(scores, max_nll=0.6)] == [0.5, 0.1, 0.2, 0.3]
    with pytest.raises(ValueError):
        filter_by_score(scores)
    rows = style_aucs([_fake(0.5), _fake(0.6), _fake(1.0, style="teacher"), _fake(0.55, style="teacher")])
    assert rows == [{"task": "addition", "positive": "aligned", "negative": "teacher", "auc": 0.75,
                     "n_positive": 2, "n_negative": 2}]
    table = summarize(scores, by=("task",))
    assert [(t["task"], t["count"]) for t in table] == [("addition", 7), ("linear", 2)]


# ---------------------------------------------------------------------------------------------------------------------
# A briefly trained model
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny model (2 layers) after TRAIN_STEPS SFT steps on aligned addition traces, saved as a policy dir;
    plus the untrained initialisation (a control)."""
    model_cfg = dataclasses.replace(load_yaml(ModelConfig, ROOT / "configs/model/tiny.yaml"), num_layers=2)
    model = create_model(model_cfg, seed=0)
    graphdef, params = nnx.split(model)
    # committed to the device like the restored policy's arrays, so scoring it reuses the same compiled function
    init_params = jax.device_put(jax.tree.map(jnp.copy, params), jax.devices()[0])
    ocfg = OptimConfig(lr=3e-3, warmup_steps=10, decay="cosine", min_lr_ratio=0.05, b2=0.98, weight_decay=0.01)
    tx = make_optimizer(ocfg, TRAIN_STEPS)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    step = jax.jit(make_train_step(lm_loss(graphdef), tx), donate_argnums=0)
    data = make_data_iterator(DataConfig(seq_len=128, batch_size=8, sources=(SourceConfig(_spec("aligned", 2000,
                                                                                                  "train")),)))
    losses, t0 = [], time.time()
    for _ in range(TRAIN_STEPS):
        batch = next(data)
        state, metrics = step(state, {k: jnp.asarray(batch[k]) for k in BATCH_KEYS})
        losses.append(float(metrics["loss"]))
    data.close()
    print(f"\ntrained {TRAIN_STEPS} steps in {time.time() - t0:.1f}s (compile included): loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f}")
    assert losses[-1] < losses[0] - 2.0, losses
    policy = save_policy(tmp_path_factory.mktemp("scoring") / "policy", model_cfg, state.params, "byte",
                         source=f"test: {TRAIN_STEPS} SFT steps on aligned addition")
    return {"policy": policy, "graphdef": graphdef, "init_params": init_params}


def _heldout(style: str) -> list[dict]:
    return synthetic_records(_spec(style, N_HELDOUT, "test"))


def test_scorer_separates_trained_style_from_teacher(trained):
    model_cfg, params, tok_spec = load_policy(trained["policy"])
    tok = load_tokenizer(tok_spec)
    aligned, teacher = _heldout("aligned"), _heldout("teacher")
    # the same held-out problems in both styles
    assert [r["meta"]["problem"] for r in aligned] == [r["meta"]["problem"] for r in teacher]
    t0 = time.time()
    scores = score_records(nnx.merge(trained["graphdef"], params), tok, aligned + teacher)
    t_score = time.time() - t0
    nll_a = [s["nll"] for s in scores[:N_HELDOUT]]
    nll_t = [s["nll"] for s in scores[N_HELDOUT:]]
    auc = roc_auc([-x for x in nll_a], [-x for x in nll_t])
    control = score_records(nnx.merge(trained["graphdef"], trained["init_params"]), tok, aligned + teacher)
    auc_init = roc_auc([-s["nll"] for s in control[:N_HELDOUT]], [-s["nll"] for s in control[N_HELDOUT:]])
    print(f"\nheld-out addition, {N_HELDOUT} problems: mean NLL aligned {np.mean(nll_a):.3f}, teacher "
          f"{np.mean(nll_t):.3f}, AUC {auc:.3f}; untrained model: aligned "
          f"{np.mean([s['nll'] for s in control[:N_HELDOUT]]):.3f}, teacher "
          f"{np.mean([s['nll'] for s in control[N_HELDOUT:]]):.3f}, AUC {auc_init:.3f}; scoring {t_score:.1f}s, "
          f"control {time.time() - t0 - t_score:.1f}s")
    assert auc >= 0.9
    assert np.mean(nll_a) < np.mean(nll_t)
    assert auc_init < 0.9  # the separation comes from the training, not from the traces alone
    assert all(s["has_answer_line"] and s["answer_correct"] for s in scores)
    assert all(s["steps"] >= 3 for s in scores[:N_HELDOUT])  # one line per digit column

    # the filter keeps (mostly) the aligned traces
    reasons = select_traces(scores, keep_quantile=0.5)
    kept_styles = [s["style"] for s, r in zip(scores, reasons) if r is None]
    assert len(kept_styles) >= N_HELDOUT * 0.9
    assert kept_styles.count("aligned") / len(kept_styles) >= 0.9


def test_score_traces_script_end_to_end(trained, tmp_path, capsys):
    script = _load_script()
    teacher_file = tmp_path / "teacher.jsonl"
    write_jsonl(_heldout("teacher")[:24], teacher_file)
    out = tmp_path / "out" / "kept.jsonl"
    rc = script.main(["--policy", str(trained["policy"]), "--traces", _spec("aligned", 24, "test"), str(teacher_file),
                      _spec("none", 8, "test"), "--out", str(out), "--keep-quantile", "0.5", "--min-steps", "1",
                      "--positive-style", "aligned"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    final = json.loads(printed.strip().splitlines()[-1])
    assert final["scored"] == 56
    assert final["dropped"]["too_few_steps"] == 8  # the answer-only traces fail the format check
    auc = {a["negative"]: a["auc"] for a in final["auc"]}
    assert auc["teacher"] >= 0.9
    assert "ROC AUC addition: aligned vs teacher" in printed

    scores = [json.loads(line) for line in (tmp_path / "out" / "kept.scores.jsonl").read_text().splitlines()]
    assert len(scores) == 56 and {s["input"] for s in scores} == {str(teacher_file), _spec("aligned", 24, "test"),
                                                                  _spec("none", 8, "test")}
    kept = read_records(out)  # valid schema records
    assert len(kept) == sum(s["kept"] for s in scores) == final["kept"]
    assert all("nll" in r["scores"] for r in kept)
    assert sum(r["provenance"]["style"] == "aligned" for r in kept) / len(kept) >= 0.9
    assert (tmp_path / "out" / "kept.jsonl.summary.json").is_file()


def test_score_traces_script_errors(trained, tmp_path, capsys):
    script = _load_script()
    rc = script.main(["--policy", str(tmp_path / "nowhere"), "--traces", _spec("aligned", 4, "test"),
                      "--out", str(tmp_path / "k.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and "--policy" in err and "not a policy directory" in err

    bad = tmp_path / "bad.jsonl"
    good = json.dumps(_heldout("aligned")[0])
    bad.write_text(good + "\n" + good.replace('"assistant"', '"bot"') + "\n")
    rc = script.main(["--policy", str(trained["policy"]), "--traces", str(bad), "--out", str(tmp_path / "k.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad}:line 2" in err and "messages[" in err

    rc = script.main(["--policy", str(trained["policy"]), "--traces", str(bad), "--on-error", "skip",
                      "--out", str(tmp_path / "k.jsonl")])
    captured = capsys.readouterr()
    assert rc == 0 and json.loads(captured.out.strip().splitlines()[-1])["scored"] == 1
