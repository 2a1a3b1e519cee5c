"""Checkpoints that count only once complete, so a kill during a save never strands a run.

The Trainer writes a checkpoint's files in place, one after another; a SIGKILL, an OOM kill or a
preemption part way through leaves a folder that cannot be resumed (say `config.json` and a temp
file). So a checkpoint counts only when its completion marker exists, and the marker is written
last: after every file of the folder is synced to disk and after beta's state, each of the two
written atomically (temp name, fsync, rename). Resume takes the last complete checkpoint and
ignores the rest; the next save of a step replaces an incomplete folder of that step. Rotation
counts complete checkpoints only, and unmarks a folder before deleting it, so a kill during the
deletion leaves an incomplete folder, never a complete-looking broken one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from transformers import TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from akd_cache.run_settings import METRICS_FILE, MODEL_DIR, discard_if_changed

COMPLETE_MARKER = "checkpoint_complete.json"
RUN_SETTINGS_FILE = "run_settings.json"  # the settings a run's checkpoints and log were made with
RESUME_NEUTRAL_SETTINGS = frozenset({"train.save_steps", "train.logging_steps",
                                     "train.output_root"})
"""Settings a run resumes across, so a change to them alone keeps its checkpoints: when it saves
and logs (neither moves the weights, and a resumed Trainer keeps the checkpoint's own intervals)
and where runs are kept (a moved folder holds the same run). Not `train.dataloader_workers`: with
dropout, the trained weights differ with the number of workers."""
CHECKPOINTS_KEPT = 2  # the last complete one to resume from, and one spare
TEMP_SUFFIX = ".tmp"
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def discard_changed_run(args: TrainingArguments, out: Path, settings: dict, checkpoints: Path
                        ) -> None:
    """Drop the checkpoints, log and final outputs of a run made under settings that change its
    result, so they are never resumed or taken for the new run's (and say so, naming the
    settings that changed). Under torchrun every rank gets here: the main process removes them
    before any rank looks for a checkpoint or builds its Trainer (which makes the output
    folder)."""
    with args.main_process_first(local=False, desc="discarding a run of other settings"):
        if args.process_index == 0:
            stale = [checkpoints, out / "log.jsonl", out / MODEL_DIR, out / METRICS_FILE]
            discard_if_changed(out, RUN_SETTINGS_FILE, settings, stale, RESUME_NEUTRAL_SETTINGS)


def checkpoint_folder(root: Path, step: int) -> Path:
    return root / f"{PREFIX_CHECKPOINT_DIR}-{step}"


def checkpoint_folders(root: Path) -> dict[int, Path]:
    """Every `checkpoint-N` folder under `root` by step N, complete or not."""
    if not root.is_dir():
        return {}
    found = {}
    for path in root.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match and path.is_dir():
            found[int(match.group(1))] = path
    return found


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def completed_step(folder: Path) -> int:
    return json.loads((folder / COMPLETE_MARKER).read_text())["step"]


def last_complete_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint of the highest step: where a run resumes."""
    complete = {step: path for step, path in checkpoint_folders(root).items()
                if is_complete(path)}
    return complete[max(complete)] if complete else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """`path` holds either its old content or all of `data`, whenever the process dies."""
    temp = path.with_name(path.name + TEMP_SUFFIX)
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    _fsync(path.parent)


def mark_complete(folder: Path, step: int, last_files: dict[str, bytes]) -> None:
    """Sync the folder's files, write `last_files` (beta's state) and then the marker."""
    for path in folder.rglob("*"):
        if path.is_file():
            _fsync(path)
    for name, data in last_files.items():
        write_atomically(folder / name, data)
    write_atomically(folder / COMPLETE_MARKER, json.dumps({"step": step}).encode())


def discard_checkpoint(folder: Path) -> None:
    """Unmark first, so a kill part way through the removal leaves an incomplete folder."""
    marker = folder / COMPLETE_MARKER
    if marker.exists():
        marker.unlink()
        _fsync(folder)
    shutil.rmtree(folder, ignore_errors=True)


def discard_checkpoints(root: Path) -> None:
    """Remove every checkpoint under `root` (the saved model supersedes them)."""
    for folder in checkpoint_folders(root).values():
        discard_checkpoint(folder)
    shutil.rmtree(root, ignore_errors=True)


def rotate_checkpoints(root: Path, keep: int = CHECKPOINTS_KEPT) -> None:
    """Keep the last `keep` complete checkpoints; remove older ones and every incomplete one
    (a killed save's leftover: none is in progress when a save has just completed)."""
    folders = checkpoint_folders(root)
    complete = sorted(step for step, path in folders.items() if is_complete(path))
    kept = set(complete[-keep:])
    for step, folder in folders.items():
        if step not in kept:
            discard_checkpoint(folder)
