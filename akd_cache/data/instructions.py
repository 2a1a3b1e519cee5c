"""Instruction data: load, validate row by row, split deterministically, and report dropped rows.

Local JSON / JSONL files are parsed with the json module rather than `datasets`, so a single row
with a wrong type is dropped and reported instead of failing Arrow's schema inference for the
whole file; a JSONL line that is not UTF-8 JSON is one dropped row. Hub ids go through
`datasets`. The content hash covers the rows themselves, not file mtimes, so two copies of the
same data share one teacher cache.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from akd_cache import jsonl
from akd_cache.config import DATA_ROLES, DataConfig, is_local_dataset
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


def read_rows(dataset: str, hub_split: str = "train") -> list:
    """The dataset's rows; a JSONL line that cannot be decoded is a `jsonl.BadLine` in its place,
    to be dropped as one row."""
    path = Path(dataset)
    if is_local_dataset(dataset):
        if not path.exists():
            raise DataError(f"{path}: dataset file not found; fix data.dataset in the params")
        return jsonl.read_lines(path) if path.suffix == ".jsonl" else jsonl.read_json(path, list)
    if path.exists():
        raise DataError(f"{path}: a local dataset is one .json or .jsonl file; fix data.dataset "
                        "in the params")
    from datasets import load_dataset

    try:
        return list(load_dataset(dataset, split=hub_split))
    except (OSError, ValueError) as err:  # not found, unreachable, or no such split
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"data.dataset {dataset!r}: not a local .json or .jsonl file, and the "
                        f"hub cannot load it ({reason})") from None


def content_sha256(rows: list) -> str:
    """Over the rows as parsed; a line that could not be decoded, over its bytes."""
    digest = hashlib.sha256()
    for row in rows:
        if isinstance(row, jsonl.BadLine):
            digest.update(row.raw)
        else:
            digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def to_example(index: int, row: object, columns: dict[str, str]) -> Example:
    sample_id = f"row-{index:06d}"
    if isinstance(row, jsonl.BadLine):
        raise BadRow(f"{row.reason}, line {row.line_no}")
    if not isinstance(row, dict):
        raise BadRow(f"row is a {type(row).__name__}, not an object")
    fields = {}
    for field in DATA_ROLES:
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
class CheckedData:
    examples: list[Example]
    dropped: list[DroppedRow]
    content_sha256: str
    n_rows: int


@dataclass(frozen=True)
class PreparedData:
    train: list[Example]
    heldout: list[Example]
    dropped: list[DroppedRow]
    content_sha256: str
    n_rows: int


def check_rows(cfg: DataConfig) -> CheckedData:
    """Every row as an example, or dropped with its reason; duplicates after the first dropped."""
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
    return CheckedData(examples, dropped, content_sha256(rows), len(rows))


def split_data(checked: CheckedData, cfg: DataConfig) -> PreparedData:
    """A seeded held-out / train split of the usable examples."""
    examples = checked.examples
    if cfg.heldout >= len(examples):
        cause = f"; most dropped: {drop_reasons(checked.dropped)[0]}" if checked.dropped else ""
        raise DataError(
            f"{cfg.dataset}: data.heldout={cfg.heldout} leaves no training data "
            f"({len(examples)} usable of {checked.n_rows} rows{cause})"
        )
    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)
    heldout = sorted(order[: cfg.heldout])
    end = None if cfg.max_train_samples is None else cfg.heldout + cfg.max_train_samples
    train = sorted(order[cfg.heldout : end])
    return PreparedData(
        train=[examples[i] for i in train],
        heldout=[examples[i] for i in heldout],
        dropped=checked.dropped,
        content_sha256=checked.content_sha256,
        n_rows=checked.n_rows,
    )


def prepare(cfg: DataConfig) -> PreparedData:
    return split_data(check_rows(cfg), cfg)


def read_examples(path: Path) -> list[Example]:
    return [Example(**record) for record in jsonl.read(path)]


def drop_reasons(dropped: list[DroppedRow]) -> list[str]:
    """Each reason with its count ("3 empty output"), the most common first; the details in
    parentheses are left out, so that rows dropped for one cause count together."""
    reasons = Counter(d.reason.split(" (")[0] for d in dropped)
    return [f"{count} {reason}" for reason, count in reasons.most_common()]


def drop_summary(dropped: list[DroppedRow], total: int) -> str:
    if not dropped:
        return f"kept all {total} rows"
    return f"dropped {len(dropped)} of {total} rows: {', '.join(drop_reasons(dropped))}"
