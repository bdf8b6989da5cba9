"""Every test process sees 8 simulated CPU devices (set before anything imports jax).

Single-device tests are unaffected: arrays live on the default device unless a test builds a mesh. Multi-process
tests start their own interpreters with their own flags.
"""

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8").strip()

# Test modules share helpers by importing each other (``from test_chat_templates import make_model_dir``).
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
