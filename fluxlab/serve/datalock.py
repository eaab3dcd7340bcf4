"""One server per data folder: an exclusive lock on `serve.lock` inside it, held while the server lives.

flock is dropped by the kernel when its holder dies (kill -9 included), so a crashed server never leaves a stale
lock, unlike a PID file. The file names the holder's PID and port, for the one line a second server gets.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError


def hold(data: Path, port: int) -> int:
    """Lock `data` for this process (the descriptor stays open until the process ends); UserError when another
    process holds it."""
    import fcntl

    path = Path(data) / "serve.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.close(fd)
        pid, where = ([*holder, "?", "?"])[:2]
        raise UserError(f"{data} is in use by another fluxlab serve (PID {pid}, port {where}); stop it, or give "
                        f"this one another --data folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {port}\n".encode(), 0)
    return fd
