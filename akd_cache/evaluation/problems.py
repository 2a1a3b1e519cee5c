"""HumanEval+ / MBPP+ problems, read from a local evalplus file or evalplus's own download.

evalplus 0.3.1 reads `HUMANEVAL_OVERRIDE_PATH` / `MBPP_OVERRIDE_PATH` once, when
`evalplus.data.humaneval` / `evalplus.data.mbpp` are first imported (module constants), so setting
the variable later in a process that already imported evalplus changes nothing. Scoring therefore
runs evalplus in a child process whose environment carries the override (`override_env`).
"""

from __future__ import annotations

import ast
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from akd_cache import jsonl
from akd_cache.data.templates import render_prompt
from akd_cache.errors import DataError, MissingInputError

Dataset = Literal["humaneval", "mbpp"]
DATA_FILES: dict[Dataset, str] = {
    "humaneval": "HumanEvalPlus.jsonl.gz",
    "mbpp": "MbppPlus.jsonl.gz",
}
OVERRIDE_ENV: dict[Dataset, str] = {
    "humaneval": "HUMANEVAL_OVERRIDE_PATH",
    "mbpp": "MBPP_OVERRIDE_PATH",
}
HUMANEVAL_INSTRUCTION = "Complete the following Python function."
# The MBPP paper's wording; the JOS paper reformats each MBPP task to include its test cases.
MBPP_TESTS_LEAD = "Your code should pass these tests:"


@dataclass(frozen=True)
class Problem:
    """One task; `tests` is a script that raises on the first failing base test."""

    dataset: Dataset
    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    tests: str

    @property
    def reference(self) -> str:
        """The canonical solution as a complete program (HumanEval's omits the signature)."""
        if self.dataset == "humaneval":
            return self.prompt + self.canonical_solution
        return self.canonical_solution


def dataset_file(dataset: Dataset, data_dir: Path | None = None) -> Path:
    """The local file when `data_dir` is given, else evalplus's cached download (fetched once)."""
    if data_dir is not None:
        path = Path(data_dir) / DATA_FILES[dataset]
        if not path.is_file():
            raise MissingInputError(f"{path}: no {dataset} data there (eval.data_dir); put "
                                    f"{DATA_FILES[dataset]} there, or set eval.data_dir: null to "
                                    "let evalplus download it")
        return path
    if dataset == "humaneval":
        from evalplus.data.humaneval import _ready_human_eval_plus_path as ready
    else:
        from evalplus.data.mbpp import _ready_mbpp_plus_path as ready
    return Path(ready())


def override_env(dataset: Dataset, path: Path) -> dict[str, str]:
    """Environment entries that make a fresh evalplus process read `path` for `dataset`."""
    return {OVERRIDE_ENV[dataset]: str(Path(path).resolve())}


def read_rows(path: Path) -> list[dict]:
    """Raw dataset rows, inputs left serialised (evalplus's loader turns MBPP+ inputs into
    tuples, sets and complex numbers that would not survive being written back)."""
    from evalplus.data.utils import stream_jsonl

    try:
        return list(stream_jsonl(str(path)))
    except (OSError, EOFError, zlib.error, ValueError) as err:  # not gzip, cut short, not JSON
        raise DataError(f"{path}: not a readable evalplus data file ({err}); replace it with "
                        "a fresh copy") from None


def write_rows(rows: list[dict], path: Path) -> Path:
    """Plain (not gzipped) jsonl: gzip stamps a time into its header, and evalplus keys its
    ground-truth cache on the file's md5, so a gzipped subset would never hit the cache."""
    jsonl.write(path, rows, ensure_ascii=True)  # evalplus reads it in the locale's encoding
    return path


TEXT_FIELDS: dict[Dataset, tuple[str, ...]] = {
    "humaneval": ("task_id", "prompt", "entry_point", "canonical_solution", "test"),
    "mbpp": ("task_id", "prompt", "entry_point", "canonical_solution", "assertion"),
}
"""The fields a problem is made of, each a string; evalplus's own loader reads the rest."""


def _tests(dataset: Dataset, row: dict) -> str:
    if dataset == "humaneval":
        return f"{row['test']}\n\ncheck({row['entry_point']})\n"
    return row["assertion"].strip() + "\n"


def to_problem(dataset: Dataset, row: dict) -> Problem:
    return Problem(
        dataset=dataset,
        task_id=row["task_id"],
        prompt=row["prompt"],
        entry_point=row["entry_point"],
        canonical_solution=row["canonical_solution"],
        tests=_tests(dataset, row),
    )


def _checked_problem(dataset: Dataset, row: object, path: Path, row_no: int) -> Problem:
    """`to_problem`, or a DataError naming the file, the row and the task of a damaged row."""
    if not isinstance(row, dict):
        raise DataError(f"{path}: row {row_no} is a {type(row).__name__}, not an object; replace "
                        "the file with a fresh copy")
    task = row.get("task_id", "no task_id")
    fail = f"{path}: row {row_no} ({task})"
    for field in TEXT_FIELDS[dataset]:
        if field not in row:
            raise DataError(f"{fail} has no {field!r}; replace the file with a fresh copy")
        if not isinstance(row[field], str):
            raise DataError(f"{fail}: {field!r} is not a string ({type(row[field]).__name__}); "
                            "replace the file with a fresh copy")
    problem = to_problem(dataset, row)
    try:
        instruction(problem)
    except (ValueError, SyntaxError) as err:  # an MBPP prompt that is not a string literal
        raise DataError(f"{fail}: 'prompt' is not a Python string literal ({err}); replace the "
                        "file with a fresh copy") from None
    return problem


def subset_ids(task_ids: list[str], n: int, seed: int) -> list[str]:
    """`n` task ids drawn with `seed`, in dataset order, so demos score a stable subset."""
    chosen = set(random.Random(seed).sample(task_ids, min(n, len(task_ids))))
    return [t for t in task_ids if t in chosen]


def load_problems(
    dataset: Dataset, data_dir: Path | None = None, n: int | None = None, seed: int = 0
) -> list[Problem]:
    """All problems, or a seeded subset of `n` of them."""
    path = dataset_file(dataset, data_dir)
    problems = [_checked_problem(dataset, row, path, row_no)
                for row_no, row in enumerate(read_rows(path), 1)]
    if n is not None:
        keep = set(subset_ids([p.task_id for p in problems], n, seed))
        problems = [p for p in problems if p.task_id in keep]
    return problems


def instruction(problem: Problem) -> str:
    """HumanEval: complete the given function, code included. MBPP: the task text and its
    assertions, as the paper reformats MBPP."""
    if problem.dataset == "humaneval":
        return f"{HUMANEVAL_INSTRUCTION}\n{problem.prompt.strip()}"
    text = ast.literal_eval(problem.prompt.strip()).strip()
    return f"{text}\n{MBPP_TESTS_LEAD}\n{problem.tests.strip()}"


def build_prompt(problem: Problem, template: str) -> str:
    return render_prompt(template, instruction(problem))
