"""What every command line in ``scripts/`` shares: a user's mistake ends in one line and exit status 2.

``run(main)`` calls ``main`` and turns every exception a user can cause (a bad flag or preset, a missing or
unreadable file or checkpoint, a malformed trace, a tokenizer that does not fit, a backend this machine cannot run,
a run that diverged) into ``error: <message>`` on stderr, the message naming the flag, file or step to change.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable

from motif_kernels import BackendUnavailableError
from motif_jax.config import ConfigError
from motif_jax.convert.mapping import ConversionError
from motif_jax.data.chat_template import TemplateError
from motif_jax.data.records import TraceFormatError
from motif_jax.data.tokenizer import TokenizerError
from motif_jax.model.attention import AttentionBackendError
from motif_jax.train.checkpoint import CheckpointError, CheckpointNotFoundError
from motif_jax.train.loop import NonFiniteError

__all__ = ["USER_ERRORS", "run"]

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, ConversionError, TraceFormatError, TokenizerError, TemplateError, CheckpointError, CheckpointNotFoundError,
    NonFiniteError, BackendUnavailableError, AttentionBackendError, FileNotFoundError,
)


def run(main: Callable[[], int | None]) -> int:
    """``main()``'s exit status (None counts as 0), or 2 after one ``error:`` line for a user's mistake."""
    try:
        return main() or 0
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
