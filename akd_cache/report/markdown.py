"""Markdown pieces every table shares: percent cells, pipe tables, a titled section."""

from __future__ import annotations

import math
from collections.abc import Sequence

MISSING = "-"
NOT_RUN = "_not run_"
PERCENT = 100.0


def pct(value: float | None) -> str:
    """A fraction as percent with one decimal, as the paper prints pass@1 and accuracy loss."""
    if value is None or math.isnan(value):
        return MISSING
    return f"{PERCENT * value:.1f}"


def number(value: float | None, spec: str) -> str:
    return MISSING if value is None else format(value, spec)


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def section(title: str, caption: str, body: str | None) -> str:
    return f"## {title}\n\n{caption}\n\n{body if body else NOT_RUN}\n"
