"""Atomic file writes for every file the app writes (checkpoints, adapter folders, bundles, run files).

The bottom layer: it imports nothing of the package but ``errors``, so that ``adapters`` and ``models`` both use it
without one importing the other.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from tcurlora_seg.errors import UserError

__all__ = ["atomic_write"]

_RERUN = "choose another hydra.run.dir, then rerun (trainer.resume=true continues a run from its last.pt)"


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any], *, what: str = "checkpoint",
                 fix: str = _RERUN) -> Path:
    """``write(f)`` into a file that replaces ``path`` only once complete; returns the path.

    The bytes go to a temporary file in the same folder, are flushed to disk, and only then replace ``path`` with
    ``os.replace``: a crash or an error mid-write leaves the previous file intact and no temporary file behind (a
    SIGKILL or power loss can leave one, ``.NAME.*.tmp``, which nothing reads). A failed write (disk full, folder
    not writable) raises UserError naming ``what`` and the path, and ending in ``fix``.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        # BaseException too: a Ctrl-C mid-write must not leave a stray temporary file.
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = _os_error(err)
        if cause is not None:
            raise _write_error(path, cause, what, fix) from err
        raise
    return path


def _os_error(err: BaseException | None) -> OSError | None:
    """The OSError behind ``err``: torch.save reports a failed write as a RuntimeError whose context is the OSError."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    return err


def _write_error(path: Path, err: OSError, what: str, then: str) -> UserError:
    """One line for a file that could not be written: why, what is left on disk, the fix."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        why, fix = "no space left on the device (disk full or quota)", f"free space on the disk of {path.parent}"
    elif err.errno == errno.EFBIG:
        why, fix = "file too large for the file system or the size limit (ulimit -f)", "raise the limit or free space"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why, fix = f"{path.parent} is not writable", f"make {path.parent} writable"
    else:
        why, fix = err.strerror or str(err) or type(err).__name__, f"check {path.parent}"
    left = "the previous file is unchanged" if path.is_file() else "nothing was written"
    return UserError(f"{what} {path}: cannot write it ({why}); {left}; {fix} or {then}")
