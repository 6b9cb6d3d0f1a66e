"""Command-line error contract shared by the `python -m d2c.*` entry points.

A user error (bad config value, missing or corrupt dataset / checkpoint / statistics file,
out-of-range labels, a diverged run) prints ONE line `error: <message>` on stderr and exits 2,
without a traceback: the message already names the file or key and the fix.  Anything else is
a bug and keeps its traceback.  D2C_TRACEBACK=1 shows the traceback for user errors too.
"""
from __future__ import annotations

import contextlib
import os
import sys

EXIT_USER_ERROR = 2


def user_error_types() -> tuple:
    # d2c's own error types are ValueError subclasses (CheckpointError, DataError, MetricsError,
    # CacheError, RecordError) and config validation raises plain ValueError; NonFiniteLoss is
    # a FloatingPointError; a path the user gave that does not exist is a FileNotFoundError.
    from d2c.train import NonFiniteLoss
    return (ValueError, NonFiniteLoss, FileNotFoundError, NotADirectoryError, PermissionError)


def one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return " / ".join(lines) if lines else type(e).__name__


@contextlib.contextmanager
def exit_on_user_error():
    """Wrap a main(): user errors -> `error: ...` on stderr and SystemExit(2)."""
    try:
        yield
    except user_error_types() as e:
        if os.environ.get("D2C_TRACEBACK"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
