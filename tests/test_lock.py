"""The writer lock's races: a holder that releases while a waiter reads it, and two waiters that
both judged one lock stale."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from akd_cache.store.lock import CacheLockedError, WriterLock

NAME = "worker-0-of-1"


def dead_pid() -> int:
    """The pid of a process of this host that has exited."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_a_lock_released_while_a_waiter_reads_it_is_taken(tmp_path, monkeypatch):
    location = str(tmp_path / "cache")
    holder = WriterLock(location, NAME).__enter__()  # alive: this process
    waiter = WriterLock(location, NAME, wait_s=60.0)
    real_cat = waiter.fs.cat_file

    def released_in_between(path, *args, **kwargs):
        monkeypatch.setattr(waiter.fs, "cat_file", real_cat)
        holder.__exit__(None, None, None)  # the holder finishes between create and read
        return real_cat(path, *args, **kwargs)

    monkeypatch.setattr(waiter.fs, "cat_file", released_in_between)
    with waiter:
        assert json.loads(Path(waiter.path).read_bytes()) == waiter.owner
    assert not Path(waiter.path).exists()


def test_a_stale_lock_taken_by_another_waiter_is_not_removed(tmp_path, monkeypatch):
    location = str(tmp_path / "cache")
    waiter = WriterLock(location, NAME)
    lock = Path(waiter.path)
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid()}))
    fresh = json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode()
    real_cat = waiter.fs.cat_file

    def other_waiter_takes_over(path, *args, **kwargs):
        """The first read sees the stale lock; then the other waiter replaces it with its own."""
        monkeypatch.setattr(waiter.fs, "cat_file", real_cat)
        stale = real_cat(path, *args, **kwargs)
        lock.unlink()
        lock.write_bytes(fresh)
        return stale

    monkeypatch.setattr(waiter.fs, "cat_file", other_waiter_takes_over)
    with pytest.raises(CacheLockedError, match=f"pid {os.getpid()}"), waiter:
        pass
    assert lock.read_bytes() == fresh
