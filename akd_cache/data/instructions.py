"""Instruction data: load, validate row by row, split deterministically, and report dropped rows.

Local JSON / JSONL files are parsed with the json module rather than `datasets`, so a single row
with a wrong type is dropped and reported instead of failing Arrow's schema inference for the
whole file. Hub ids go through `datasets`. The content hash covers the rows themselves, not file
mtimes, so two copies of the same data share one teacher cache.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from akd_cache.config import DataConfig
from akd_cache.errors import DataError

SCHEMA_COLUMNS: dict[str, dict[str, str]] = {
    "codealpaca": {"instruction": "instruction", "input": "input", "output": "output"},
    "magicoder": {"instruction": "problem", "output": "solution"},
}


@dataclass(frozen=True)
class Example:
    sample_id: str
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class DroppedRow:
    sample_id: str
    stage: str
    reason: str


class BadRow(ValueError):
    """One row that cannot be used; it is counted and reported, never fatal."""


def read_rows(dataset: str, hub_split: str = "train") -> list[dict]:
    path = Path(dataset)
    if path.suffix in {".json", ".jsonl"}:
        if not path.exists():
            raise DataError(f"{path}: dataset file not found; fix data.dataset in the params")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            rows = []
            for line_no, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    rows.append({"__unparsable__": f"line {line_no}: {err.msg}"})
            return rows
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
        return rows
    from datasets import load_dataset

    return list(load_dataset(dataset, split=hub_split))


def content_sha256(rows: list[dict]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def to_example(index: int, row: object, columns: dict[str, str]) -> Example:
    sample_id = f"row-{index:06d}"
    if not isinstance(row, dict):
        raise BadRow(f"row is a {type(row).__name__}, not an object")
    if "__unparsable__" in row:
        raise BadRow(f"unparsable JSON ({row['__unparsable__']})")
    fields = {}
    for field in ("instruction", "input", "output"):
        column = columns.get(field)
        if column is None:
            fields[field] = ""
            continue
        value = row.get(column, "" if field == "input" else None)
        if value is None:
            raise BadRow(f"missing field {column!r}")
        if not isinstance(value, str):
            raise BadRow(f"field {column!r} is a {type(value).__name__}, not a string")
        fields[field] = value
    if not fields["instruction"].strip():
        raise BadRow("empty instruction")
    if not fields["output"].strip():
        raise BadRow("empty output")
    return Example(sample_id=sample_id, **fields)


@dataclass(frozen=True)
class PreparedData:
    train: list[Example]
    heldout: list[Example]
    dropped: list[DroppedRow]
    content_sha256: str
    n_rows: int


def prepare(cfg: DataConfig) -> PreparedData:
    rows = read_rows(cfg.dataset, cfg.hub_split)
    columns = cfg.columns if cfg.schema_ == "custom" else SCHEMA_COLUMNS[cfg.schema_]
    examples: list[Example] = []
    dropped: list[DroppedRow] = []
    seen: set[tuple[str, str, str]] = set()
    for index, row in enumerate(rows):
        try:
            example = to_example(index, row, columns)
        except BadRow as err:
            dropped.append(DroppedRow(f"row-{index:06d}", "prepare", str(err)))
            continue
        identity = (example.instruction, example.input, example.output)
        if identity in seen:
            dropped.append(DroppedRow(example.sample_id, "prepare", "duplicate of an earlier row"))
            continue
        seen.add(identity)
        examples.append(example)
    if cfg.heldout >= len(examples):
        raise DataError(
            f"{cfg.dataset}: data.heldout={cfg.heldout} leaves no training data "
            f"({len(examples)} usable rows)"
        )
    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)
    heldout = sorted(order[: cfg.heldout])
    end = None if cfg.max_train_samples is None else cfg.heldout + cfg.max_train_samples
    train = sorted(order[cfg.heldout : end])
    return PreparedData(
        train=[examples[i] for i in train],
        heldout=[examples[i] for i in heldout],
        dropped=dropped,
        content_sha256=content_sha256(rows),
        n_rows=len(rows),
    )


def write_jsonl(path: Path, records: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_examples(path: Path) -> list[Example]:
    with open(path, encoding="utf-8") as f:
        return [Example(**json.loads(line)) for line in f if line.strip()]


def drop_summary(dropped: list[DroppedRow], total: int) -> str:
    if not dropped:
        return f"kept all {total} rows"
    reasons = Counter(d.reason.split(" (")[0] for d in dropped)
    detail = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
    return f"dropped {len(dropped)} of {total} rows: {detail}"
