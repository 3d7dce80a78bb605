"""Output locations: checked writable before work, one writer at a time, files written whole or not at all.

Every stage that writes a folder (`prep`, `flow`, `teach`, `distill`, `evaluate`, `export`)
* checks it can write there before any work (`check_writable`), so a read-only location fails in a
  second, not after an epoch;
* holds `output_lock(out)` while it works: a second process writing the same folder is refused with
  the first one's pid and command instead of racing it. The lock is a `filelock.FileLock` (flock) on
  `.<name>.lock` beside the folder (not inside it, so it never becomes part of a DVC output); the
  kernel releases it when its process dies, even by SIGKILL;
* writes files atomically (a temporary file beside the target, then `os.replace`), removing the
  temporary file on any failure, and reports a failed write (full disk, file-size limit, read-only)
  in one line naming the file (`write_failure`).
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vidistill.errors import OutputError, OutputInUseError

_MiB = 1 << 20


def _reason(exc: BaseException, directory: Path) -> str:
    """Why a write failed, in words (from the errno, or from free space and limits when there is none)."""
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC or code == errno.EDQUOT:
        return f"no space left on the device ({_free(directory)} free)"
    if code == errno.EFBIG:
        return f"the file-size limit was reached ({_fsize_limit()})"
    if code == errno.EROFS:
        return "the file system is read-only"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    # torch.save reports a failed write as RuntimeError ("unexpected pos ...", "file write failed"): find the cause
    free = shutil.disk_usage(directory).free if directory.exists() else None
    if free is not None and free < 64 * _MiB:
        return f"the write stopped part-way and the disk is full ({_free(directory)} free)"
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        return f"the write stopped part-way: the file-size limit was probably reached ({_fsize_limit()})"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"the write stopped part-way ({first[:160]}; is the disk full?)"


def _free(directory: Path) -> str:
    try:
        return f"{shutil.disk_usage(directory).free / _MiB:.1f} MiB"
    except OSError:
        return "unknown"


def _fsize_limit() -> str:
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return "none" if soft == resource.RLIM_INFINITY else f"ulimit -f: {soft} bytes"


def write_failure(path: str | Path, exc: BaseException, *, advice: str = "") -> OutputError:
    """The one-line error for a failed write of `path`: the file, why, and what to do."""
    path = Path(path)
    what = advice or "Free some space or choose another output location, then rerun"
    return OutputError(f"could not write {path}: {_reason(exc, path.parent)}; nothing partial was kept. {what}")


def atomic_write(path: str | Path, write: Callable[[Path], Any], *, advice: str = "") -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it to `path`.

    The temporary file is removed when `write` fails (a full disk, a file-size limit, an interrupt),
    so a failed write leaves neither half a file nor a stray temporary.

    Raises:
        OutputError: the write failed (one line naming `path` and the cause).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_failure(path, exc, advice=advice) from None
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        raise write_failure(path, exc, advice=advice) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`Path.write_text`, atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def check_writable(path: str | Path, *, key: str = "output folder", create: bool = True) -> Path:
    """Make sure files can be created in folder `path` (created if missing and `create`), before any work.

    Raises:
        OutputError: the folder cannot be created or written (read-only, permission, not a folder),
            one line naming it and `key` (the setting that chose it).
    """
    path = Path(path)
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        elif not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder")
        fd, probe = tempfile.mkstemp(dir=path, prefix=".vidistill-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to {path} ({key}): {_reason(exc, path)}; choose another location or make it "
                          "writable, then rerun") from None
    return path


def lock_path(out: str | Path) -> Path:
    """The lock file of output folder `out`: `.<name>.lock` beside it."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.lock"


@contextmanager
def output_lock(out: str | Path, *, key: str = "--out") -> Iterator[Path]:
    """Hold the lock of output folder `out` for the duration; refuse at once when another process holds it.

    The lock file records its holder (pid, host, command, start time) so the refusal can name it.

    Raises:
        OutputInUseError: another process is writing `out`.
        OutputError: the lock file cannot be created (the parent folder is not writable).
    """
    from filelock import FileLock, Timeout

    path = lock_path(out)
    check_writable(path.parent, key=key)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputInUseError(f"{out} is being written by another process ({_holder(path)}); wait for it to finish "
                               f"or choose another {key}") from None
    try:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        with open(path, "r+") as fh:  # filelock never truncates a held lock file: the record stays readable
            fh.truncate(0)
            fh.write(json.dumps(record))
        yield path
    finally:
        lock.release()


def _holder(path: Path) -> str:
    try:
        record = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        record = {}
    if not record:
        return f"lock {path}"
    return f"pid {record.get('pid')} on {record.get('host')}, since {record.get('started')}: `{record.get('command')}`"
