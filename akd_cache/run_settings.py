"""Resumable outputs are resumed only under the settings that started them.

A folder records the settings it was made with; when one that changes the outputs differs, what
a run would otherwise resume (checkpoints, generated samples) is removed first, and the removal
is logged with the settings that changed, so a changed setting never silently continues an old
run and nothing is removed without a word.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

MODEL_DIR = "model"  # a finished training run's weights and tokenizer
METRICS_FILE = "metrics.json"  # a finished run's summary (training or evaluation)
"""A run's final outputs: when its settings change they go with its checkpoints or samples, so
a failed run under the new settings never leaves the old run's results looking like its own."""

_ABSENT = object()  # a setting one side has and the other has not


def _flat(settings: dict, prefix: str = "") -> dict[str, object]:
    """Nested settings by dotted key (`train.save_steps`), the name a change is reported by."""
    flat: dict[str, object] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _discard_reason(path: Path, settings: dict, ignored: frozenset[str]) -> str | None:
    """Why the outputs beside the record at `path` cannot be resumed under `settings`; None when
    they can. Compared key by key, so a record written before a key was ignored still matches."""
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        recorded = None
    if not isinstance(recorded, dict):
        return f"no readable record of the settings it was made with ({path.name})"
    old, new = _flat(recorded), _flat(settings)
    changed = sorted(key for key in old.keys() | new.keys()
                     if key not in ignored and old.get(key, _ABSENT) != new.get(key, _ABSENT))
    return f"made under other settings ({', '.join(changed)} changed)" if changed else None


def discard_if_changed(folder: Path, marker: str, settings: dict, stale: Iterable[Path],
                       ignored: frozenset[str] = frozenset()) -> None:
    """One process's job: under torchrun the main one calls it, the others wait for it.

    `ignored` names the settings (dotted keys) that do not change what `stale` holds: a change
    to them alone keeps it, and the record takes their new values."""
    path = folder / marker
    reason = _discard_reason(path, settings, ignored)
    if reason is not None:
        present = [item for item in stale if item.exists()]
        if present:
            log.warning("%s: %s; removing %s", folder, reason,
                        ", ".join(sorted(item.name for item in present)))
        for item in present:
            if item.is_dir():
                shutil.rmtree(item)
            else:
                item.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, sort_keys=True))
