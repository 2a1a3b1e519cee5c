"""One writer per (cache, worker slot): a lock file that a second writer is refused on.

On a local filesystem the lock is created atomically (O_EXCL) and holds the host and pid, so a
lock left by a killed writer on this host is recognised as stale and taken over: resuming after
kill -9 needs no manual step. On a remote fsspec store there is no atomic create and no way to
see the other process: the lock is best effort, and a stale one is removed with `break_lock`.
"""

from __future__ import annotations

import json
import os
import socket
import time

import fsspec
from fsspec.implementations.local import LocalFileSystem

from akd_cache.errors import LockError

POLL_S = 0.5


class CacheLockedError(LockError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WriterLock:
    def __init__(
        self, location: str, name: str, break_lock: bool = False, wait_s: float = 0.0
    ) -> None:
        self.fs, root = fsspec.core.url_to_fs(location)
        self.path = f"{root.rstrip('/')}/locks/{name}.lock"
        self.break_lock = break_lock
        self.wait_s = wait_s
        self.owner = {"host": socket.gethostname(), "pid": os.getpid()}

    def _stale(self, holder: dict) -> bool:
        local = isinstance(self.fs, LocalFileSystem)
        return local and holder.get("host") == self.owner["host"] and not _alive(holder["pid"])

    def __enter__(self) -> WriterLock:
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        body = json.dumps(self.owner).encode()
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                if isinstance(self.fs, LocalFileSystem):
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                    with os.fdopen(fd, "wb") as f:
                        f.write(body)
                elif self.fs.exists(self.path):
                    raise FileExistsError(self.path)
                else:
                    self.fs.pipe_file(self.path, body)
                return self
            except FileExistsError:
                holder = json.loads(self.fs.cat_file(self.path) or b"{}")
                if not (self.break_lock or self._stale(holder)):
                    if time.monotonic() < deadline:
                        time.sleep(POLL_S)
                        continue
                    raise CacheLockedError(
                        f"{self.path}: another writer holds this cache (host "
                        f"{holder.get('host')}, pid {holder.get('pid')}); if it is gone, "
                        "re-run with --break-lock"
                    ) from None
                self.fs.rm_file(self.path)

    def __exit__(self, *exc: object) -> None:
        if self.fs.exists(self.path):
            self.fs.rm_file(self.path)

