"""The paper's error taxonomy (Table 13), automated.

Each failing solution is re-run in the sandbox against its task's base tests (HumanEval's
`check`, MBPP's assertions) and classified by the first exception it raises, and as complete
(it ran and defined the entry point, so the tests could call it) or incomplete. Passing solutions
are counted as correct and complete without a re-run.
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache

from akd_cache.evaluation.postprocess import top_level_function
from akd_cache.evaluation.problems import Problem
from akd_cache.evaluation.sandbox import DEFAULT_LIMITS, Limits, Outcome, run_in_sandbox
from akd_cache.evaluation.score import SampleResult

CORRECT = "correct"
OTHER = "other"
CATEGORIES: tuple[str, ...] = (
    "AssertionError",
    "NameError",
    "SyntaxError",
    "ValueError",
    "IndexError",
    "TypeError",
    "AttributeError",
    "TimeoutError",
    "IndentationError",
    "ModuleNotFoundError",
    "KeyError",
    "UnboundLocalError",
    "RecursionError",
    "NotImplementedError",
)
ALIASES = {"TabError": "IndentationError"}  # a subclass the table does not list
EMPTY_FUNCTION = "empty function"
WRONG_NAME = "wrong function name"
NOTHING_GENERATED = "nothing generated"
MISSING_IMPORT = "missing import"
UNBALANCED = "unbalanced delimiters"
CUT_OFF = "output cut off"
NOT_REPRODUCED = "not reproduced by the base tests"  # e.g. failed only evalplus's extra tests
# Modules whose exported names a model uses without importing them (List, Counter, sqrt, ...).
IMPORT_SOURCES = (
    "typing",
    "collections",
    "itertools",
    "functools",
    "math",
    "heapq",
    "bisect",
    "re",
    "string",
    "operator",
)
THIRD_PARTY_ALIASES = frozenset({"np", "numpy", "pd", "pandas"})
_UNDEFINED = re.compile(r"name '(\w+)' is not defined")
_DELIMITER = re.compile(r"never closed|unmatched|does not match|unterminated")
_AT_EOF = re.compile(r"unexpected EOF|unterminated triple-quoted")
_EMPTY_RETURNS = ("None", "0")  # by repr, so `return False` / `return 0.0` do not count


@dataclass(frozen=True)
class Attempt:
    """A scored solution; `truncated`: its generation hit max_new_tokens."""

    problem: Problem
    solution: str
    passed: bool
    truncated: bool = False


def attempts_from_scores(
    samples: Iterable[SampleResult], problems: Iterable[Problem], plus: bool = False
) -> list[Attempt]:
    """Scored samples as attempts, judged by the base tests or by base + extra tests."""
    by_id = {p.task_id: p for p in problems}
    return [
        Attempt(by_id[s.task_id], s.solution, s.plus_passed if plus else s.base_passed, s.truncated)
        for s in samples
    ]


@dataclass(frozen=True)
class TaxonomyRow:
    task_id: str
    passed: bool
    complete: bool
    category: str
    subcategory: str | None = None
    message: str = ""


@dataclass(frozen=True)
class TaxonomySummary:
    total: int
    correct: int
    complete: int
    categories: dict[str, int] = field(default_factory=dict)
    subcategories: dict[tuple[str, str], int] = field(default_factory=dict)

    @property
    def incomplete(self) -> int:
        return self.total - self.complete

    @property
    def pass_rate_complete(self) -> float | None:
        """Correct among complete solutions; None when none is complete (0 of 0 is no rate, and
        must not read as a measured 0 %)."""
        return self.correct / self.complete if self.complete else None


@cache
def importable_names() -> frozenset[str]:
    """Standard-library module names and the public names of IMPORT_SOURCES."""
    names = set(sys.stdlib_module_names) | THIRD_PARTY_ALIASES
    for module in IMPORT_SOURCES:
        names |= {n for n in dir(importlib.import_module(module)) if not n.startswith("_")}
    return frozenset(names)


def _is_placeholder(stmt: ast.stmt) -> bool:
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
        return stmt.value.value is Ellipsis or isinstance(stmt.value.value, str)
    if isinstance(stmt, ast.Return):
        value = stmt.value
        return value is None or (
            isinstance(value, ast.Constant) and repr(value.value) in _EMPTY_RETURNS
        )
    return False


def is_empty_function(code: str, name: str) -> bool:
    """The body is only placeholders: `pass`, `...`, a docstring, `return`, `return None`,
    `return 0`."""
    function = top_level_function(code, name)
    return function is not None and all(_is_placeholder(s) for s in function.body)


def _name_error(attempt: Attempt, message: str) -> str | None:
    if not attempt.solution.strip():
        return NOTHING_GENERATED
    match = _UNDEFINED.search(message)
    missing = match.group(1) if match else ""
    if missing == attempt.problem.entry_point:
        return WRONG_NAME
    return MISSING_IMPORT if missing in importable_names() else None


def _syntax_error(attempt: Attempt, outcome: Outcome) -> str | None:
    lines = attempt.solution.rstrip().splitlines()
    at_end = outcome.lineno is not None and outcome.lineno >= len(lines)
    if attempt.truncated or at_end or _AT_EOF.search(outcome.message):
        return CUT_OFF
    return UNBALANCED if _DELIMITER.search(outcome.message) else None


def categorise(attempt: Attempt, outcome: Outcome) -> tuple[str, str | None]:
    """(category, subcategory) of a failing attempt's sandbox outcome."""
    if outcome.passed:
        return OTHER, NOT_REPRODUCED
    error = ALIASES.get(outcome.error_type or "", outcome.error_type or "")
    category = error if error in CATEGORIES else OTHER
    if category == "AssertionError" and is_empty_function(
        attempt.solution, attempt.problem.entry_point
    ):
        return category, EMPTY_FUNCTION
    if category == "NameError":
        return category, _name_error(attempt, outcome.message)
    if category == "SyntaxError":
        return category, _syntax_error(attempt, outcome)
    return category, None


def classify_one(attempt: Attempt, limits: Limits = DEFAULT_LIMITS) -> TaxonomyRow:
    task_id = attempt.problem.task_id
    if attempt.passed:
        return TaxonomyRow(task_id, True, True, CORRECT)
    outcome = run_in_sandbox(
        attempt.solution, attempt.problem.tests, attempt.problem.entry_point, limits
    )
    category, subcategory = categorise(attempt, outcome)
    return TaxonomyRow(
        task_id, False, outcome.reached_tests, category, subcategory, outcome.message
    )


def summarise(rows: list[TaxonomyRow]) -> TaxonomySummary:
    failing = [r for r in rows if not r.passed]
    return TaxonomySummary(
        total=len(rows),
        correct=len(rows) - len(failing),
        complete=sum(r.complete for r in rows),
        categories=dict(Counter(r.category for r in failing)),
        subcategories=dict(Counter((r.category, r.subcategory) for r in failing if r.subcategory)),
    )


def classify(
    attempts: Iterable[Attempt], limits: Limits = DEFAULT_LIMITS, workers: int = 1
) -> tuple[TaxonomySummary, list[TaxonomyRow]]:
    """Rows in input order and their summary; sandboxes run `workers` at a time."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = list(pool.map(lambda a: classify_one(a, limits), attempts))
    return summarise(rows), rows
