"""Filesystem primitives the publishers need and the standard library lacks.

`exchange` swaps two paths atomically (Linux renameat2 RENAME_EXCHANGE), so replacing an export
never leaves its path missing. Leftover names carry their owner's host and pid, so a later build
or `cache gc` can tell a dead builder's staging dir from a running one's.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
HOST = socket.gethostname().replace(".", "_")
# A leftover from another host cannot be checked for a live owner: only its age tells.
FOREIGN_LEFTOVER_AGE_S = 3600.0


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _libc()


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap `a` and `b` (both must exist). False where the kernel/filesystem cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def owned_name(prefix: str) -> str:
    """`prefix`-host.pid.random: the owner of a leftover is readable from its name."""
    return f"{prefix}-{HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def owner_gone(name: str, path: Path) -> bool:
    """Whether the process that made `name` (an owned_name) has ended."""
    try:
        host, pid, _ = name.rsplit(".", 2)
        if host == HOST or host.endswith("-" + HOST):
            return not pid_alive(int(pid))
    except ValueError:
        pass
    try:
        return time.time() - path.lstat().st_mtime > FOREIGN_LEFTOVER_AGE_S
    except OSError:
        return False


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
