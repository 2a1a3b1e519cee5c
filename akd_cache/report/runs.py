"""Reading what the stages left under `runs/`: evaluations, training metrics and logs, the
template analysis and the teacher cache's tail histogram. Anything missing reads as absent; a
damaged file is a one-line error naming it (`jsonl.read_json`)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from akd_cache import jsonl
from akd_cache.run_settings import METRICS_FILE


@dataclass
class RunData:
    """Everything the report reads, keyed by model / experiment name."""

    evals: dict[str, dict] = field(default_factory=dict)
    train: dict[str, dict] = field(default_factory=dict)
    logs: dict[str, list[dict]] = field(default_factory=dict)
    fidelity: dict[str, dict] = field(default_factory=dict)
    templates: dict | None = None
    cache_pointer: dict | None = None
    tail_hist: dict | None = None


def read_json(path: Path, required: Collection[str] = ()) -> dict | None:
    return jsonl.read_json(path, dict, required) if path.is_file() else None


def read_log(path: Path) -> list[dict]:
    """The JSON lines of a training log; a line cut short by a run still writing is skipped."""
    return [row for row in jsonl.read_lines(path) if not isinstance(row, jsonl.BadLine)]


def _per_folder(root: Path, name: str) -> dict[str, Path]:
    if not root.is_dir():
        return {}
    return {p.parent.name: p for p in sorted(root.glob(f"*/{name}")) if p.is_file()}


def load_tail_histogram(pointer_path: Path) -> dict | None:
    """The cache's tail-mass histogram (`{"edges", "counts"}`), or None when there is no
    finished cache to read it from. Imported lazily: the reader pulls in torch."""
    pointer = read_json(pointer_path, ["location"])
    if pointer is None:
        return None
    from akd_cache.store.reader import CacheError, TeacherCache

    try:
        meta = TeacherCache(pointer["location"], allow_incomplete=True).meta
    except CacheError:
        return None
    return None if meta.stats is None else meta.stats.tail_mass_log10_hist.model_dump()


def load_runs(runs_dir: Path, models: Collection[str], train_dir: Path | None = None) -> RunData:
    """The runs of `models` (the teacher, the student and the experiments of params): what an
    experiment since removed from params, or another model, left under `runs/` is no row of
    this report."""
    train_dir = runs_dir / "train" if train_dir is None else train_dir
    pointer_path = runs_dir / "teacher_cache.json"
    fidelity = {p.stem: p for p in sorted((runs_dir / "fidelity").glob("*.json"))}
    return RunData(
        evals={m: jsonl.read_json(p) for m, p in
               _per_folder(runs_dir / "eval", METRICS_FILE).items() if m in models},
        train={e: jsonl.read_json(p) for e, p in
               _per_folder(train_dir, METRICS_FILE).items() if e in models},
        logs={e: read_log(p) for e, p in _per_folder(train_dir, "log.jsonl").items()
              if e in models},
        fidelity={m: jsonl.read_json(p, dict, ["metrics"]) for m, p in fidelity.items()
                  if m in models},  # the key every table and plot of fidelity reads
        templates=read_json(runs_dir / "template_analysis.json"),
        cache_pointer=read_json(pointer_path),
        tail_hist=load_tail_histogram(pointer_path),
    )
