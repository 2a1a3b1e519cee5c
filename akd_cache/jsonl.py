"""JSON Lines files: one JSON value per line, UTF-8, every line ended by b"\\n".

Lines are split on b"\\n" only, and each is decoded on its own. `str.splitlines()` would also
split at U+2028, U+0085 and the other breaks that JSON leaves unescaped inside strings, and
decoding the whole file first would let one bad byte fail every line. An unterminated last line
is what a killed writer leaves: files that are appended to are read with `complete_only`, and
`append` cuts such a line off before it writes, so two records never merge. `write_json` writes
a whole JSON document (metadata, metrics) with the same atomic replace; `read_json` reads one
back, checked, so that a damaged file is one line naming it rather than a traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from akd_cache.errors import DataError

NEWLINE = b"\n"
TAIL_BLOCK_BYTES = 1 << 16
JSON_NAMES = {list: "list", dict: "object"}


class JsonlError(DataError):
    """A line that is not UTF-8 JSON, named by its file and line number."""


@dataclass(frozen=True)
class BadLine:
    line_no: int  # 1-based
    reason: str
    raw: bytes


def decode_line(raw: bytes) -> Any:
    """One line's value; ValueError with the reason (the first bad byte, or the JSON error)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = f"byte 0x{raw[err.start]:02x} at column {err.start + 1}"
        raise ValueError(f"not UTF-8 ({bad})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"unparsable JSON ({err.msg} at column {err.colno})") from None


def parse(data: bytes, complete_only: bool = False) -> list[Any | BadLine]:
    """Every non-blank line's value, or a `BadLine` where it cannot be decoded. With
    `complete_only`, an unterminated last line is left out."""
    lines = data.split(NEWLINE)
    if complete_only or not lines[-1]:
        lines.pop()
    out: list[Any | BadLine] = []
    for line_no, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            out.append(decode_line(raw))
        except ValueError as err:
            out.append(BadLine(line_no, str(err), raw))
    return out


def read_lines(path: str | Path, complete_only: bool = False) -> list[Any | BadLine]:
    """`parse` of a file: bad lines come back as `BadLine`s for the caller to report."""
    return parse(Path(path).read_bytes(), complete_only)


def read(path: str | Path, complete_only: bool = False) -> list[Any]:
    """Every line's value; the first bad line raises `JsonlError` naming the file and line."""
    values = read_lines(path, complete_only)
    for value in values:
        if isinstance(value, BadLine):
            raise JsonlError(f"{path}: line {value.line_no}: {value.reason}")
    return values


def read_json(path: str | Path, kind: type[list | dict] = dict,
              required: Collection[str] = ()) -> Any:
    """A whole JSON document that must be a `kind` (an object: holding the `required` keys)."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 at byte offset {err.start} "
                        f"(0x{data[err.start]:02x}); re-encode the file as UTF-8") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, kind):
        raise DataError(f"{path}: expected a JSON {JSON_NAMES[kind]}, got "
                        f"{type(value).__name__}")
    missing = [key for key in required if key not in value]
    if missing:
        raise DataError(f"{path}: no {missing[0]!r} key")
    return value


def _encode(record: Any, ensure_ascii: bool) -> bytes:
    return json.dumps(record, ensure_ascii=ensure_ascii).encode() + NEWLINE


def write(path: str | Path, records: Iterable[Any], ensure_ascii: bool = False) -> None:
    """Replaces `path` atomically (a temp file, then os.replace): readers see old or new, whole.

    `ensure_ascii` escapes non-ASCII characters, for files that tools open in the locale's
    encoding rather than UTF-8.
    """
    _replace(path, (_encode(record, ensure_ascii) for record in records))


def write_json(path: str | Path, value: Any) -> None:
    """One JSON document, indented with sorted keys (readable, and diffs stay small), replaced
    atomically as by `write`; ASCII-escaped, so that a reader in any locale decodes it."""
    _replace(path, [json.dumps(value, indent=2, sort_keys=True).encode() + NEWLINE])


def _replace(path: str | Path, chunks: Iterable[bytes]) -> None:
    """Writes a temp file beside `path`, then os.replace: readers see old or new, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.writelines(chunks)
    os.replace(tmp, path)


def _complete_end(f: BinaryIO) -> int:
    """The offset just past the last b"\n" of an open file, read backwards a block at a time."""
    pos = f.seek(0, os.SEEK_END)
    while pos > 0:
        start = max(0, pos - TAIL_BLOCK_BYTES)
        f.seek(start)
        found = f.read(pos - start).rfind(NEWLINE)
        if found >= 0:
            return start + found + 1
        pos = start
    return 0


def append(path: str | Path, records: Iterable[Any], ensure_ascii: bool = False) -> None:
    """Adds each record as it comes, flushed, so a crash loses at most the one being written.
    An unterminated last line left by an earlier crash is cut off first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        f.truncate(_complete_end(f))
        for record in records:
            f.write(_encode(record, ensure_ascii))
            f.flush()
