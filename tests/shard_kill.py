"""Kill a Stage 1 writer between two shards without guessing at timing.

The writer commits each shard (`shard_done`) before it scores the next one's first batch. A child
process wraps its teacher's `score` with `pause_after_first_shard`: the first batch scored once a
shard is done writes a marker file and never returns. The parent waits for the marker and sends
SIGKILL, so the kill always lands after one shard and before the rest, however loaded the machine.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zarr

MARKER_WAIT_S = 300  # the child loads a model and scores a shard first


def shards_done(location: str) -> int:
    """Committed shards of a cache; 0 before the cache exists."""
    try:
        return int(zarr.open_group(location, mode="r")["shard_done"][:].sum())
    except (FileNotFoundError, KeyError):
        return 0


def pause_after_first_shard(score: Callable[..., Any], location: str,
                            marker: str) -> Callable[..., Any]:
    """`score`, except that it blocks for good, marker written, once a shard of `location` is
    done."""
    def paused(*args: Any, **kwargs: Any) -> Any:
        if shards_done(location) >= 1:
            Path(marker).write_text("paused")
            signal.pause()
        return score(*args, **kwargs)

    return paused


def kill_when_paused(child: subprocess.Popen, marker: Path) -> None:
    """SIGKILL `child` once it has paused; fail if it ends or never pauses."""
    deadline = time.monotonic() + MARKER_WAIT_S
    while not marker.exists():
        if child.poll() is not None:
            raise AssertionError(f"the writer ended (rc {child.returncode}) before pausing")
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"the writer did not pause within {MARKER_WAIT_S} s")
        time.sleep(0.05)
    child.kill()
    child.wait()
