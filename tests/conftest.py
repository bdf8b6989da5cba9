"""Every test process sees 8 simulated CPU devices (set before anything imports jax).

Single-device tests are unaffected: arrays live on the default device unless a test builds a mesh. Multi-process
tests start their own interpreters with their own flags. Everything compiles at XLA:CPU optimisation level 0 and
shares one persistent compilation cache (both below).
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


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):  # the process that made it (not an xdist worker)
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
