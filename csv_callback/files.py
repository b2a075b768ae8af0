"""Files of csv-callback: atomic writes, safetensors reads, and the checks every reader makes.

Probes, salience vectors and loss stores are each one .safetensors file (a store, one per checkpoint) plus
JSON metadata. Every write goes through a temporary file next to the target and ``os.replace``, so a crash
or a full disk leaves the old file (or none), never part of a new one; :func:`remove_stale_temps` deletes
what killed writers left behind. Every read opens regular files only (a FIFO would block) and turns a
malformed file into one ValueError that names it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

NAME_MAX = 255  # bytes in a file name on the usual filesystems (ext4, xfs, btrfs, tmpfs, NFS)
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_TEMP = re.compile(r"^\.(?P<target>.+)\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)$")
_FOREIGN_TEMP_AGE = 86400.0  # seconds; no write of a csv-callback file takes this long


def atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | os.PathLike) -> None:
    """Save ``tensors`` with string ``metadata`` as one .safetensors file at ``path``, atomically (see
    :func:`atomic_write`, which also says what a failed write raises)."""
    atomic_write(save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata), path)


def atomic_write(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` through a temporary file next to it and ``os.replace``: a crash or a full disk
    leaves the old file (or none), never a part of the new one.

    The file gets the permissions an ordinary new file gets (0666 less the umask: 0644 under umask 0022), so
    teammates can read probes, vectors and stores. A failed write removes its temporary file and raises an
    OSError (of the subclass its errno gives) naming ``path``, that starts with "disk full" when the
    filesystem or quota is full.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; pass a file path, e.g. {path / 'name.safetensors'}.")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: no such directory; create it first.")
    tmp = path.with_name(_temp_name(path.name))
    try:
        tmp.unlink(missing_ok=True)  # a leftover of a dead process that had our PID; O_EXCL below never follows a link
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise OSError(e.errno, f"disk full: cannot write {path} ({e.strerror}); nothing of it was written and an "
                                   "earlier version of it, if any, is intact. Free space on that filesystem (or raise "
                                   "the quota) and write it again.") from e
        raise OSError(e.errno, f"cannot write {path} ({e.strerror or e}); nothing of it was written and an earlier "
                               "version of it, if any, is intact.") from e
    finally:
        tmp.unlink(missing_ok=True)


def _temp_name(name: str) -> str:
    """The temporary file :func:`atomic_write` writes ``name`` through: ``.<name>.tmp-<host>-<pid>``, or
    ``.<hash of name>.tmp-<host>-<pid>`` where that would be longer than a file name may be."""
    tail = f".tmp-{socket.gethostname()}-{os.getpid()}"
    full = f".{name}{tail}"
    if len(os.fsencode(full)) <= NAME_MAX:
        return full
    return f".{hashlib.sha256(os.fsencode(name)).hexdigest()[:16]}{tail}"


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writers killed between writing and renaming them left in ``directory``
    (``.<name>.tmp-<host>-<pid>``, or ``.<name>.tmp-<pid>`` as written before the host was recorded); return
    them.

    A temporary file is stale when its writer ran on this host and its process is gone. A writer on another
    host (a shared filesystem) cannot be asked, so its temporary file is deleted only once it is a day old. A
    file that cannot be deleted (a read-only store) is left: readers need no write access.
    """
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows instead of probing it
        return []
    host, removed = socket.gethostname(), []
    try:
        entries = list(os.scandir(directory))
    except OSError:  # no such directory, or not readable: nothing to clean
        return []
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if m["host"] in (None, host):
                stale = not _alive(int(m["pid"]))
            else:
                stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > _FOREIGN_TEMP_AGE
            if stale:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # deleted by another reader meanwhile, or no write access
            continue
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (signal 0 only checks that it could be signalled)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):  # no process can have such a PID
        return False
    return True


def require_regular_file(path: str | os.PathLike) -> Path:
    """``path``, if it is a regular file (or a symlink to one); found by ``stat``, without opening it, because
    opening a FIFO blocks until something writes to it.

    Raises FileNotFoundError if nothing is there and ValueError naming ``path`` for a FIFO, a directory, a
    device or a socket.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file.") from None
    if not stat.S_ISREG(mode):
        kind = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFDIR: "a directory", stat.S_IFSOCK: "a socket",
                stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}.get(stat.S_IFMT(mode), "not a file")
        raise ValueError(f"{path} is {kind}, not a regular file, so it was not read; replace it with the file it "
                         "stands for, or remove it.")
    return path


def read_safetensors(
    path: str | os.PathLike, fmt: str, keys: Sequence[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors ``keys`` and the metadata of a csv-callback safetensors file of format ``fmt`` (a regular
    file: see :func:`require_regular_file`)."""
    path = require_regular_file(path)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{path} is not a readable .safetensors file ({e}); it may be truncated or of another format."
        ) from e
    if meta.get("format") != fmt:
        raise ValueError(f"{path} is a safetensors file but not a {fmt!r} file (format={meta.get('format')!r}).")
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}; the file is corrupt or was written by another tool.")
    return tensors, meta


@contextmanager
def malformed_file(path: str | os.PathLike, kind: str, fix: str) -> Iterator[None]:
    """Turn an error raised while building an object from ``path``'s contents into one ValueError that names
    the file, says it is not a valid ``kind`` file and gives the ``fix``."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a valid csv_callback {kind} file: {str(e).rstrip('.')}; {fix}.") from e
