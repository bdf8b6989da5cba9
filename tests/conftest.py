"""Every test process sees 8 simulated CPU devices (set before anything imports jax).

Single-device tests are unaffected: arrays live on the default device unless a test builds a mesh. Multi-process
tests start their own interpreters with their own flags. Everything compiles at XLA:CPU optimisation level 0 (below).
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


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for a module's runs, so runs of the same program compile it once: set in this
    process; the returned environment variables give it to subprocesses."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    cache = tmp_path_factory.mktemp("xla_cache")
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    for n, v in zip(names, (str(cache), 0.0, -1)):
        jax.config.update(n, v)
    cc.reset_cache()
    yield {"JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    for n, v in old.items():
        jax.config.update(n, v)
    cc.reset_cache()
