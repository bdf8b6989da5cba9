"""Every test process sees 8 simulated CPU devices (set before anything imports jax).

Single-device tests are unaffected: arrays live on the default device unless a test builds a mesh. Multi-process
tests start their own interpreters with their own flags. Everything compiles at XLA:CPU optimisation level 0 and
shares one persistent compilation cache, and the longest modules are dispatched first (all below).
"""

import os

# The suite is bound by XLA:CPU compilation of tiny programs, not by running them: LLVM's optimisation level 0
# compiles them about 20-30% faster (test_model.py's blockwise and prefill tests 43 -> 33 s, test_findings.py 87 ->
# 61 s). It changes the machine code LLVM emits for the same HLO, not the HLO nor the float semantics (no fast-math
# at either level). Subprocesses inherit both flags; a test that sets XLA_FLAGS itself keeps its own.
_FLAGS = {"--xla_force_host_platform_device_count": "8", "--xla_backend_optimization_level": "0"}
for _flag, _value in _FLAGS.items():
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_flag}={_value}").strip()

# Test modules share helpers by importing each other (``from test_chat_templates import make_model_dir``).
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# One persistent compilation cache for the whole run: the controlling pytest process picks the directory, xdist
# workers and every subprocess (scripts, two-process runs) inherit it through the environment, so the tests and
# scripts that build the same program (the tiny SFT and RL recipes run by many modules) compile it once. A hit
# loads the executable XLA compiled for the same HLO, flags and devices, so results do not change.
_CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile  # noqa: E402

    _OWN_CACHE = tempfile.mkdtemp(prefix="motif_jax_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ.update(_CACHE_ENV)


# The modules that take longest on this 2-core machine (seconds per module in `make test`'s durations), longest first.
# Under `--dist loadfile` a worker takes the next module when it is free; starting the long ones first lets the two
# workers finish together instead of one running a long module alone at the end. Order only: no test depends on it.
# test_rl_vllm.py (the longest) comes right after test_findings.py (one test) on the same worker, so that the vLLM
# environment builds in the background meanwhile instead of keeping that worker waiting.
LONGEST_FIRST = ("test_sft.py", "test_findings.py", "test_rl_vllm.py", "test_tpu_plan.py", "test_rl_loop.py",
                 "test_walkthrough.py", "test_model.py", "test_rl_multihost.py", "test_parallel_memory.py",
                 "test_data_scoring.py", "test_parallel_train.py", "test_attention_splash.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist would reorder modules by their number of tests
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0" and any("vllm_python" in i.fixturenames for i in items):
        _build_vllm_venv_in_background()


_VLLM_BUILD = None


def _build_vllm_venv_in_background():
    """Starts building .venv-vllm (about a minute from an empty cache, mostly downloads) when it is missing, so that
    the vLLM tests find it ready. Their fixture calls the same builder, which waits on the build's lock, then finds
    the environment ready (or, if this build failed, builds it itself and reports why)."""
    global _VLLM_BUILD
    from motif_jax.rl.engines import vllm_venv

    if vllm_venv.is_ready(vllm_venv.default_venv()):
        return
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile("w", prefix="motif_jax_vllm_venv_build_", suffix=".log", delete=False) as log:
        # the build writes through its own copy of the descriptor; this worker keeps none open
        _VLLM_BUILD = log.name, subprocess.Popen([sys.executable, "-m", "motif_jax.rl.engines.vllm_venv"], stdout=log,
                                                 stderr=subprocess.STDOUT,
                                                 cwd=os.path.dirname(os.path.dirname(__file__)))


def pytest_unconfigure(config):
    if _VLLM_BUILD is not None:  # no build outlives the run; its log is kept if it failed
        log, proc = _VLLM_BUILD
        if proc.wait() == 0:
            os.remove(log)
    if _OWN_CACHE and not hasattr(config, "workerinput"):  # the process that made it (not an xdist worker)
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
