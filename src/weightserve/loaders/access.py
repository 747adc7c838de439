"""Files of a model that the server may not read: one error, named by base name.

A permission problem is the operator's to fix (ownership, mode bits, a security
label), so it is a PreconditionError (FAILED_PRECONDITION): not DATA_LOSS, which would
say the bytes are bad, nor INTERNAL, which clients retry. The message names the file
by its base name only, since it reaches clients, who have no business learning the
server's directory layout; the server's log has the full path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from weightserve.errors import PreconditionError, WeightserveError

logger = logging.getLogger(__name__)


def unreadable(path: Path | str) -> PreconditionError:
    """The error for a file (or directory) the server's user may not read."""
    name = Path(path).name
    return PreconditionError(
        f"{name}: the server may not read this file (permission denied); make it readable by the server's user"
    )


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn a PermissionError raised inside the block into `unreadable(...)`.

    The error names the file the OS refused when it says which (a directory entry
    under `path`, say), else `path`. Our own errors pass through untouched, including
    PermissionDeniedError, which is a PermissionError too.
    """
    try:
        yield
    except PermissionError as e:
        if isinstance(e, WeightserveError):
            raise
        named = isinstance(e.filename, (str, bytes, os.PathLike))
        denied = Path(os.fsdecode(e.filename)) if named else path
        logger.warning("permission denied reading %s", denied)
        raise unreadable(denied) from None


def without_dirs(text: str, path: Path) -> str:
    """`text` (a library's error message) with `path` shown by its base name only."""
    return text.replace(str(path), path.name).replace(str(path.parent) + os.sep, "")


def read_text(path: Path) -> str:
    """`path.read_text()`, with a permission problem reported as `unreadable(path)`."""
    with reading(path):
        return path.read_text()
