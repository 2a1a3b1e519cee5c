"""What every stage shares: where its inputs and outputs live, and how it reads its params."""

from __future__ import annotations

import argparse
from collections.abc import Collection
from pathlib import Path

from akd_cache import jsonl
from akd_cache.config import Profile, load_params
from akd_cache.errors import DataError, MissingInputError

PREPARED_DIR = Path("data/prepared")
RUNS_DIR = Path("runs")
TEACHER_CACHE_POINTER = RUNS_DIR / "teacher_cache.json"
TEACHER_CACHE_DROPPED = RUNS_DIR / "teacher_cache_dropped.jsonl"
TEACHER_GENERATIONS_POINTER = RUNS_DIR / "teacher_generations.json"
HELDOUT_CACHE_POINTER = RUNS_DIR / "teacher_cache_heldout.json"
CACHE_POINTERS = {"train": TEACHER_CACHE_POINTER, "heldout": HELDOUT_CACHE_POINTER}
CACHE_DROPPED = {"train": TEACHER_CACHE_DROPPED,
                 "heldout": RUNS_DIR / "teacher_cache_heldout_dropped.jsonl"}
FIDELITY_DIR = RUNS_DIR / "fidelity"
write_json = jsonl.write_json  # how every stage writes its JSON outputs


def stage_args(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None, help="override params.yaml's `profile`")
    return parser


def load_stage_profile(args: argparse.Namespace) -> Profile:
    return load_params(args.params, args.profile).active


def require_input(path: Path, producer: str) -> Path:
    """An earlier stage's output, or a one-line error naming the command that makes it."""
    if not path.exists():
        raise MissingInputError(f"{path}: not found; run `akd {producer}` first")
    return path


def read_output(path: Path, producer: str, required: Collection[str] = ()) -> dict:
    """An earlier stage's JSON document (a pointer, a summary): a damaged one is a one-line
    error naming the file and the command that writes it again."""
    try:
        return jsonl.read_json(require_input(path, producer), dict, required)
    except DataError as err:
        raise DataError(f"{err}; run `akd {producer}` again") from None
