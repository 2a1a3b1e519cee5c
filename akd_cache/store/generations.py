"""The SeqKD generations folder: the teacher's responses, content-addressed and resumable.

Layout of `<root>/<key>/` (the key a hash of everything that decides the text):

    meta.json          the key and its ingredients, readable; written first
    generations.jsonl  one `Generation` per line, appended as each response finishes
    complete.json      counts and the finishing time, written last: it marks a finished folder
    locks/generate.lock

A crash loses at most the response being written: a re-run reads the complete lines and generates
only what is missing. Responses may hold any line break: JSONL is split on b"\\n" only.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from akd_cache import jsonl
from akd_cache.errors import CacheError
from akd_cache.store.lock import WriterLock

GENERATIONS_FILE = "generations.jsonl"
META_FILE = "meta.json"
COMPLETE_FILE = "complete.json"
LOCK_NAME = "generate"


class GenerationCacheError(CacheError):
    pass


@dataclass(frozen=True)
class Generation:
    sample_id: str
    instruction: str
    input: str
    output: str  # the teacher's response, cut before the first stop string
    truncated: bool  # max_new_tokens ran out before EOS or a stop


def generations_location(key: str, root: str) -> Path:
    return Path(root) / key


def check_or_init(folder: Path, key: str, ingredients: dict) -> None:
    """Create the folder for `key`, or check that it already holds `key`."""
    meta = folder / META_FILE
    if meta.exists():
        found = json.loads(meta.read_text())["key"]
        if found != key:
            raise GenerationCacheError(
                f"{folder}: holds generations {found}, not {key}; a location is tied to its key; "
                "move that folder away or change generate.root"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    jsonl.write_json(meta, {"key": key, "ingredients": ingredients})


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_FILE).exists()


def writer_lock(folder: Path, break_lock: bool = False) -> WriterLock:
    return WriterLock(str(folder), LOCK_NAME, break_lock)


def read_so_far(folder: Path) -> list[Generation]:
    """The responses on complete lines, in file order; a line cut short by a crash is not one."""
    path = folder / GENERATIONS_FILE
    if not path.exists():
        return []
    return [Generation(**record) for record in jsonl.read(path, complete_only=True)]


def append(folder: Path, generations: Iterable[Generation]) -> None:
    """Each response as it comes (a line cut short by a crash is removed first)."""
    jsonl.append(folder / GENERATIONS_FILE, (asdict(g) for g in generations))


def mark_complete(folder: Path) -> None:
    done = read_so_far(folder)
    jsonl.write_json(folder / COMPLETE_FILE, {
        "n_samples": len(done),
        "n_truncated": sum(g.truncated for g in done),
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    })


def read_generations(location: str | Path, allow_incomplete: bool = False) -> list[Generation]:
    """The responses of a finished folder, by sample_id."""
    folder = Path(location)
    if not (folder / META_FILE).exists():
        raise GenerationCacheError(f"{folder}: no teacher generations there")
    if not is_complete(folder) and not allow_incomplete:
        raise GenerationCacheError(
            f"{folder}: incomplete generations; resume the generate stage, or pass "
            "allow_incomplete=True"
        )
    return sorted(read_so_far(folder), key=lambda g: g.sample_id)


def truncated_sample_ids(location: str | Path, allow_incomplete: bool = False) -> set[str]:
    """The samples whose response ran out of max_new_tokens: it never ended."""
    return {g.sample_id for g in read_generations(location, allow_incomplete) if g.truncated}
