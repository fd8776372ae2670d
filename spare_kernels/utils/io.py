"""Atomic file writes: nothing is ever half-written at the destination."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile


def as_path(path, name: str = "path") -> str:
    """``path`` (a str, bytes or os.PathLike of either) as a str, or a ``TypeError`` / ``ValueError``
    naming ``name``. Bytes are decoded as the OS would (``os.fsdecode``), so any valid path works."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"{name}: expected a str or os.PathLike (or bytes), got {type(path).__name__}")
    path = os.fsdecode(os.fspath(path))
    if not path:
        raise ValueError(f"{name}: expected a file path, got an empty one")
    return path


def ends_with_sep(path: str) -> bool:
    return path.endswith(tuple(s for s in (os.sep, os.altsep) if s))


def file_path(path, name: str = "path", expected: str = "a file path") -> str:
    """:func:`as_path`, and a ``ValueError`` naming ``name`` when it names a folder (a trailing separator,
    or an existing folder) rather than ``expected``."""
    path = as_path(path, name)
    if ends_with_sep(path):
        raise ValueError(f"{name}: {path!r} ends with {path[-1]!r}, so it names a folder; expected {expected} "
                         f"(drop the trailing {path[-1]!r})")
    if os.path.isdir(path):
        raise ValueError(f"{name}: {path!r} is a folder; expected {expected}")
    return path


def _name_max(folder: str) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, ValueError, OSError):   # no pathconf (Windows) or no answer: the common limit
        return 255


_PID_DIGITS = 7


def _tmp_tag(base: str, limit: int) -> str:
    """The part of a temporary's name that stands for ``base``: ``base`` itself, or where
    ``.<base>.<pid>.<random>.tmp`` would pass the file system's name limit (``limit`` bytes for the tag),
    a prefix of it plus a hash of the whole (distinct names keep distinct tags)."""
    raw = os.fsencode(base)
    if len(raw) <= limit:
        return base
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return os.fsdecode(raw[:max(0, limit - len(digest) - 1)]) + "~" + digest


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def _remove_orphans(folder: str, base: str) -> None:
    """Remove temporaries of ``base`` (a file name, or its :func:`_tmp_tag`) left by writers that died
    before renaming them. The name is ``.<base>.<pid>.<mkstemp's random part>.tmp``; matched in full,
    so another path's (``base.1``, say) never is."""
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
    Temporaries of ``path`` left by dead writers (killed mid-write) are removed first. ``path``: a str,
    bytes or os.PathLike naming a file (a trailing separator or an existing folder is a ``ValueError``);
    a file name near the file system's limit gets a temporary name shortened to fit."""
    path = file_path(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"path: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"path: folder {folder!r} is not writable")
    base = os.path.basename(path)
    name_max, pid = _name_max(folder), str(os.getpid())
    if len(os.fsencode(base)) > name_max:
        raise ValueError(f"path: file name {base[:40]!r}... is {len(os.fsencode(base))} bytes; the file system "
                         f"takes at most {name_max}")
    # '.' tag '.' pid '.' + mkstemp's 8 random characters + '.tmp'. The pid is budgeted at its widest
    # (Linux's pid_max is at most 2^22: 7 digits), so every writer of this path makes the same tag and
    # finds the others' orphans, whatever the length of its own pid.
    tag = _tmp_tag(base, name_max - _PID_DIGITS - 15)
    _remove_orphans(folder, tag)
    # The writer's pid in the name tells a later writer whether this file is an orphan.
    fd, tmp = tempfile.mkstemp(prefix=f".{tag}.{pid}.", suffix=".tmp", dir=folder)
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
    return as_path(path)
