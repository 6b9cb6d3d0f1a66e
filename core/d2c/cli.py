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

from d2c.errors import MissingExtra, NonFiniteLoss

EXIT_USER_ERROR = 2
# d2c's own error types are ValueError subclasses (CheckpointError, DataError, MetricsError,
# CacheError, RecordError) and config validation raises plain ValueError; NonFiniteLoss is a
# FloatingPointError; a path the user gave that does not exist is a FileNotFoundError; a missing
# optional package is MissingExtra (an ImportError), naming the extra to install.
USER_ERROR_TYPES = (ValueError, NonFiniteLoss, MissingExtra, FileNotFoundError, NotADirectoryError, PermissionError)


def one_line(e: BaseException, with_type: bool = False) -> str:
    """The exception's message on one line (its lines joined by " / "), prefixed by its type
    name when `with_type` (records, bad-image warnings: where the type is not implied)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    return f"{type(e).__name__}: {' / '.join(lines)}" if with_type else " / ".join(lines)


@contextlib.contextmanager
def exit_on_user_error():
    """Wrap a main(): user errors -> `error: ...` on stderr and SystemExit(2)."""
    try:
        yield
    except USER_ERROR_TYPES as e:
        if os.environ.get("D2C_TRACEBACK"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
