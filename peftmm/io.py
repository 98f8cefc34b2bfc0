"""Atomic file output: a reader never sees a half-written file or folder."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from .errors import PeftmmError


def _default_mode(directory: bool) -> int:
    """What a plain open()/mkdir() would give under the current umask (tempfile uses 0600/0700,
    which would leave published bundles unreadable to other users)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, _default_mode(directory=False))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False):
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise PeftmmError("already exists; choose another path or allow overwriting", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, _default_mode(directory=True))
    try:
        yield tmp
        if path.exists():
            if not overwrite:
                raise PeftmmError("appeared while writing; nothing was replaced", str(path))
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fsync_dir(path: str | Path) -> None:
    """Make the renames inside folder ``path`` durable (they survive a power cut).

    Policy: where the system cannot fsync a folder at all (Windows cannot open one; some network
    and FUSE file systems answer EINVAL or ENOTSUP) this does nothing, since the rename itself is
    atomic either way and only its durability is not promised there. Any other failure (EIO: the
    disk) is raised, since then what was written may not be on disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (PermissionError, IsADirectoryError):
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def format_size(n: float) -> str:
    """Bytes for people: ``1.72 MiB`` (binary units; plain bytes under 1 KiB)."""
    unit, scale = next(((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if abs(n) >= s), ("B", 0))
    return f"{n / scale:.2f} {unit}" if scale else f"{int(n)} B"
