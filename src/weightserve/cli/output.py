"""Where the client commands write: --out checked before any work, and write failures in one line."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from weightserve.errors import InvalidRequestError


def check_out_dir(out: Path) -> Path:
    """`out` as a directory to write into, made if missing, checked before a fetch is spent on it.

    Raises:
        InvalidRequestError: `out` is not a directory, cannot be made, or cannot be written
            (one line naming --out; the command exits 2).
    """
    if out.exists() and not out.is_dir():
        raise InvalidRequestError(f"--out {out}: is a file, not a directory; give a directory to write into")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidRequestError(f"--out {out}: cannot make the directory ({e.strerror or e})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise InvalidRequestError(f"--out {out}: the directory is not writable; give another")
    return out


def write_failure(error: OSError, out: Path, nbytes: int) -> str:
    """One line saying why writing `out` failed and what to do (nothing partial was published)."""
    if error.errno == errno.ENOSPC:
        return (
            f"no space left on the device of {out} ({nbytes:,} tensor bytes to write); free space or give "
            "another --out, and remove what the interrupted run left there"
        )
    reason = error.strerror or str(error)
    return f"cannot write {out}: {reason}; give another --out, and remove what the interrupted run left there"
