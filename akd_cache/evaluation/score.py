"""pass@k on HumanEval+ / MBPP+ through evalplus 0.3.1's own evaluator, offline.

Quirks of evalplus 0.3.1 this module works around:
- `evaluate()` returns nothing; it writes `<samples stem>_eval_results.json` beside the samples and,
  when that file exists, loads it instead of evaluating (with `i_just_wanna_run` it asks on stdin
  whether to overwrite). Each run here copies the samples into a fresh directory.
- The dataset override variables are read once, at import (see problems.py), and evaluate()
  starts a non-daemon "stucking checker" thread that sleeps in 20 s steps, holding the interpreter
  open after the work is done. Both are why evalplus runs in a child process that exits with
  `os._exit` once the results file is written.
- The sandbox memory cap is `EVALPLUS_MAX_MEMORY_BYTES` (default 4 GiB, capped at physical RAM,
  -1 for none), an RLIMIT_AS on a process forked from a worker that holds the whole dataset's
  expected outputs, so that address space counts against the cap too.
- `EVALPLUS_TIMEOUT_PER_TASK`, if set, crashes the evaluation (`min(str, float)`); it is dropped.
  Its 60 s default therefore caps each solution's total test time: on 2 busy cores the canonical
  Mbpp/599 (38 s of expected-output time) times out against it.
- evaluate() insists that every dataset task has a sample: a subset is scored against a subset
  dataset file written next to the results.
- HumanEval/32 (`find_zero`) fails for every solution, the canonical one included: its special
  oracle `continue`s before recording the passed test, so the test details are never all true.
  A perfect HumanEval+ score is therefore 163/164 = 0.9939.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from akd_cache import jsonl
from akd_cache.errors import DataError
from akd_cache.evaluation.problems import (
    Dataset,
    dataset_file,
    override_env,
    read_rows,
    write_rows,
)

PASS = "pass"
GIB = 1 << 30
# evalplus's default is 1 s per test input; 4 s keeps canonical MBPP+ solutions from timing out
# on a slow, busy machine, and costs time only for solutions that loop.
MIN_TIME_LIMIT_S = 4.0
GT_TIME_LIMIT_FACTOR = 4.0  # evalplus's default: a test may take 4x the canonical solution's time
# evalplus's 4 GiB fails canonical Mbpp/255 (1.7 M tuples of 77 items, while the worker also holds
# that expected output); 16 GiB passes all of MBPP+ (evalplus lowers it to the physical RAM).
MAX_MEMORY_BYTES = 16 * GIB
LOG_TAIL_CHARS = 2000  # of evalplus's log, in the error when it fails
_CHILD = (
    "import json, os, sys\n"
    "from evalplus.evaluate import evaluate\n"
    "evaluate(**json.loads(sys.argv[1]))\n"
    "sys.stdout.flush()\n"
    "sys.stderr.flush()\n"
    "os._exit(0)\n"
)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator 1 - C(n-c, k) / C(n, k) for one task with c of n samples correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass(frozen=True)
class SampleResult:
    task_id: str
    solution: str
    base_status: str
    plus_status: str | None
    truncated: bool = False

    @property
    def base_passed(self) -> bool:
        return self.base_status == PASS

    @property
    def plus_passed(self) -> bool:
        """evalplus's "+" verdict: the base tests and the extra tests both pass."""
        return self.base_passed and self.plus_status == PASS


@dataclass(frozen=True)
class TaskScore:
    n: int
    base_correct: int
    plus_correct: int


@dataclass(frozen=True)
class ScoreResult:
    dataset: Dataset
    samples: list[SampleResult]
    results_path: Path

    @property
    def tasks(self) -> dict[str, TaskScore]:
        by_task: dict[str, list[SampleResult]] = defaultdict(list)
        for s in self.samples:
            by_task[s.task_id].append(s)
        return {
            t: TaskScore(len(ss), sum(s.base_passed for s in ss), sum(s.plus_passed for s in ss))
            for t, ss in by_task.items()
        }

    def pass_at(self, k: int = 1, plus: bool = False) -> float:
        """Mean over tasks of pass@k, on the base tests or on base + extra tests."""
        scores = [
            pass_at_k(t.n, t.plus_correct if plus else t.base_correct, k)
            for t in self.tasks.values()
        ]
        return sum(scores) / len(scores)

    @property
    def base_pass_at_1(self) -> float:
        return self.pass_at(1)

    @property
    def plus_pass_at_1(self) -> float:
        return self.pass_at(1, plus=True)


def accuracy_loss(teacher_pass: float, student_pass: float) -> float:
    """(teacher - student) / teacher, the paper's relative loss. A teacher that solves nothing
    leaves no accuracy to lose: NaN, so it cannot pass for a real 0 % loss."""
    if teacher_pass == 0:
        return math.nan
    return (teacher_pass - student_pass) / teacher_pass


def read_samples(path: Path) -> list[dict]:
    return jsonl.read(path)


def _dataset_for(samples: list[dict], source: Path, run_dir: Path, allow_subset: bool) -> Path:
    rows = read_rows(source)
    known = {r["task_id"] for r in rows}
    wanted = {s["task_id"] for s in samples}
    if unknown := wanted - known:
        raise DataError(f"{len(unknown)} sample task ids are not in {source}, e.g. {min(unknown)}")
    if wanted == known:
        return source
    if not allow_subset:
        raise ValueError(
            f"samples cover {len(wanted)} of {len(known)} tasks; pass allow_subset=True to score "
            "the subset alone"
        )
    return write_rows([r for r in rows if r["task_id"] in wanted], run_dir / "dataset.jsonl")


def _run_evalplus(kwargs: dict, env: dict[str, str], log: Path) -> None:
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(kwargs)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if proc.returncode != 0:
        tail = log.read_text()[-LOG_TAIL_CHARS:]
        raise RuntimeError(f"evalplus failed ({proc.returncode}):\n{tail}")


def score(
    samples_path: Path,
    dataset: Dataset,
    data_dir: Path | None = None,
    work_dir: Path | None = None,
    parallel: int | None = None,
    min_time_limit: float = MIN_TIME_LIMIT_S,
    gt_time_limit_factor: float = GT_TIME_LIMIT_FACTOR,
    max_memory_bytes: int = MAX_MEMORY_BYTES,
    allow_subset: bool = False,
) -> ScoreResult:
    """Score a samples jsonl ({task_id, solution} rows, `truncated` optional) in a fresh run
    directory under `work_dir` (default: beside the samples); evalplus's log is kept there."""
    samples_path = Path(samples_path)
    samples = read_samples(samples_path)
    parent = Path(work_dir) if work_dir is not None else samples_path.parent
    parent.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{samples_path.stem}_{dataset}_", dir=parent))
    run_samples = run_dir / "samples.jsonl"
    shutil.copyfile(samples_path, run_samples)
    source = _dataset_for(samples, dataset_file(dataset, data_dir), run_dir, allow_subset)
    env = {**os.environ, **override_env(dataset, source)}
    env["EVALPLUS_MAX_MEMORY_BYTES"] = str(max_memory_bytes)
    env.pop("EVALPLUS_TIMEOUT_PER_TASK", None)
    kwargs = {
        "dataset": dataset,
        "samples": str(run_samples),
        "parallel": parallel or os.cpu_count() or 1,
        "min_time_limit": min_time_limit,
        "gt_time_limit_factor": gt_time_limit_factor,
    }
    _run_evalplus(kwargs, env, run_dir / "evalplus.log")
    results_path = run_dir / "samples_eval_results.json"
    return ScoreResult(
        dataset, _results(json.loads(results_path.read_text()), samples), results_path
    )


def _results(results: dict, samples: list[dict]) -> list[SampleResult]:
    """In the samples file's order. evalplus lists tasks as they finish but keeps each task's
    samples in file order, so the i-th result of a task is its i-th sample, which carries the
    `truncated` flag evalplus drops."""
    seen: Counter[str] = Counter()
    rows = []
    for sample in samples:
        task_id = sample["task_id"]
        r = results["eval"][task_id][seen[task_id]]
        seen[task_id] += 1
        truncated = bool(sample.get("truncated", False))
        rows.append(
            SampleResult(task_id, r["solution"], r["base_status"], r["plus_status"], truncated)
        )
    return rows
