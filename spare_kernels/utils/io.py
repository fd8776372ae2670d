"""Atomic file writes: nothing is ever half-written at the destination."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def _remove_orphans(folder: str, base: str) -> None:
    """Remove temporaries of ``base`` left by writers that died before renaming them. The name is
    ``.<base>.<pid>.<mkstemp's random part>.tmp``; matched in full, so another path's (``base.1``,
    say) never is."""
    rx = re.compile(re.escape(f".{base}.") + r"(\d+)\.[a-z0-9_]+\.tmp")
    for entry in os.listdir(folder):
        hit = rx.fullmatch(entry)
        if hit and not _alive(int(hit.group(1))):
            with contextlib.suppress(OSError):   # another writer may have removed it first
                os.remove(os.path.join(folder, entry))


def _fsync(path: str, folder: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    try:
        os.fsync(fd)
    except OSError as e:
        # Some file systems cannot sync a folder; the file itself was synced.
        if not (folder and e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in ``path``'s folder; on success it is synced to disk and renamed over
    ``path`` (then the folder is synced), on any error it is removed and ``path`` is left as it was.
    Temporaries of ``path`` left by dead writers (killed mid-write) are removed first."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"path: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"path: folder {folder!r} is not writable")
    base = os.path.basename(path)
    _remove_orphans(folder, base)
    # The writer's pid in the name tells a later writer whether this file is an orphan.
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.{os.getpid()}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes the file 0600; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        # Data first, then the rename: else a crash can leave the new name on an empty file.
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    if os.name == "posix":   # the rename itself is durable once the folder is synced
        _fsync(folder, folder=True)


def write_json(path, obj) -> str:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    return os.fspath(path)
