"""What every command line in ``scripts/`` shares: a user's mistake ends in one line and exit status 2.

``run(main)`` calls ``main`` and turns every exception a user can cause (a bad flag or preset, a missing or
unreadable file or checkpoint, a malformed trace, a tokenizer that does not fit, a backend this machine cannot run,
a run that diverged) into ``error: <message>`` on stderr, the message naming the flag, file or step to change.
Anything else is a bug and keeps its traceback.

The user errors are named, not imported: most live in modules that import JAX, and a script's ``--help`` or a bad
flag should answer before JAX loads (a class whose module was never imported cannot have been raised).
"""

from __future__ import annotations

import sys
from typing import Callable

__all__ = ["USER_ERRORS", "is_user_error", "run"]

# "module:class" of each exception a user can cause (tests/test_cli_help.py checks that each one exists)
USER_ERRORS: tuple[str, ...] = (
    "motif_jax.config:ConfigError", "motif_jax.convert.mapping:ConversionError",
    "motif_jax.data.records:TraceFormatError", "motif_jax.data.tokenizer:TokenizerError",
    "motif_jax.data.chat_template:TemplateError", "motif_jax.train.checkpoint:CheckpointError",
    "motif_jax.train.checkpoint:CheckpointNotFoundError", "motif_jax.train.loop:NonFiniteError",
    "motif_kernels.lm_head:BackendUnavailableError", "motif_jax.model.attention:AttentionBackendError",
    "builtins:FileNotFoundError",
)


def is_user_error(e: BaseException) -> bool:
    """``e`` is an instance of one of :data:`USER_ERRORS` (or of a subclass)."""
    return any(f"{c.__module__}:{c.__qualname__}" in USER_ERRORS for c in type(e).__mro__)


def run(main: Callable[[], int | None]) -> int:
    """``main()``'s exit status (None counts as 0), or 2 after one ``error:`` line for a user's mistake."""
    try:
        return main() or 0
    except Exception as e:
        if not is_user_error(e):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
