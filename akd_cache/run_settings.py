"""Resumable outputs are resumed only under the settings that started them.

A folder records the settings it was made with; when they differ, what a run would otherwise
resume (checkpoints, generated samples) is removed first, so a changed setting never silently
continues an old run.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path


def discard_if_changed(folder: Path, marker: str, settings: dict, stale: Iterable[Path]) -> None:
    """One process's job: under torchrun the main one calls it, the others wait for it."""
    path = folder / marker
    current = json.dumps(settings, sort_keys=True)
    if path.exists() and path.read_text() == current:
        return
    for item in stale:
        if item.is_dir():
            shutil.rmtree(item)
        else:
            item.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(current)
