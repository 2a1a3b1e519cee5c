"""One writer per (cache, worker slot): a lock file that a second writer is refused on.

The lock is created atomically and holds the host and pid of its writer, so a lock left by a
killed writer on this host is recognised as stale and taken over: resuming after kill -9 needs
no manual step. A lock of a writer on another host cannot be checked; if that writer is gone,
`break_lock` removes it.

Atomic create: on a local filesystem `O_EXCL`; on an object store, which has no atomic rename,
a conditional write (`fs.pipe_file(..., mode="create")`). s3fs sends that as a PUT with
`If-None-Match: *`, which S3 (since 2024-08) and moto answer with 412 when the object exists,
so of two writers racing for one lock exactly one gets it (tests/test_s3_cache.py checks this
against moto). Filesystems without conditional writes fall back to fsspec's check-then-write,
which a race between two writers starting at the same instant can slip through.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Self

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
        return holder.get("host") == self.owner["host"] and not _alive(holder["pid"])

    def __enter__(self) -> Self:
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        body = json.dumps(self.owner).encode()
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                if isinstance(self.fs, LocalFileSystem):
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                    with os.fdopen(fd, "wb") as f:
                        f.write(body)
                else:
                    self.fs.pipe_file(self.path, body, mode="create")
                return self
            except FileExistsError:
                try:
                    held = self.fs.cat_file(self.path)
                except FileNotFoundError:
                    continue  # its holder released it since: try to take it again now
                holder = json.loads(held or b"{}")
                if not (self.break_lock or self._stale(holder)):
                    if time.monotonic() < deadline:
                        time.sleep(POLL_S)
                        continue
                    raise CacheLockedError(
                        f"{self.path}: another writer holds this cache (host "
                        f"{holder.get('host')}, pid {holder.get('pid')}); if it is gone, "
                        "re-run with --break-lock"
                    ) from None
                self._remove_if_unchanged(held)

    def _remove_if_unchanged(self, held: bytes) -> None:
        """Remove the lock judged stale or broken only if it still holds what was judged: another
        waiter that judged it too may have removed it and taken the lock since, and its fresh
        lock must stand (this narrows the race to the gap between this read and the remove)."""
        try:
            if self.fs.cat_file(self.path) == held:
                self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass  # another waiter removed it first; the next create decides who takes it

    def __exit__(self, *exc: object) -> None:
        if self.fs.exists(self.path):
            self.fs.rm_file(self.path)

