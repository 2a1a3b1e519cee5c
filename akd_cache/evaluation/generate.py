"""Completions for HumanEval+ / MBPP+ prompts, written as the samples jsonl evalplus reads.

The generation itself (both backends, stops, batching) is `akd_cache.generation`; this module
picks the prompts, resumes a samples file, and turns each completion into an evalplus row.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from akd_cache import generation, jsonl
from akd_cache.config import EvalConfig
from akd_cache.evaluation.postprocess import DEFAULT_STOPS, to_solution
from akd_cache.evaluation.problems import Problem, build_prompt
from akd_cache.generation import Decoding, TextGenerator

log = logging.getLogger(__name__)
SAMPLE_FIELDS = {"task_id": str, "raw": str, "truncated": bool, "prompt_sha256": str}
"""What a resume reads of a row; the prompt's digest tells whether the eval data (or anything
else that builds the prompt) changed since the row was generated."""


def decoding(cfg: EvalConfig) -> Decoding:
    return Decoding(
        max_new_tokens=cfg.max_new_tokens, stops=DEFAULT_STOPS, n_samples=cfg.n_samples,
        temperature=cfg.temperature, seed=cfg.seed,
    )


def generator_factory(model_dir: Path, cfg: EvalConfig, revision: str | None = None
                      ) -> Callable[[], TextGenerator]:
    """The backend `cfg.backend` names, on `cfg`'s device, dtype and memory share."""
    return generation.generator_factory(
        str(model_dir), cfg.backend, dtype=cfg.dtype, device=cfg.device,
        device_setting="eval.device", memory_utilization=cfg.vllm_memory_utilization,
        revision=revision, batch_size=cfg.batch_size,
    )


def _unusable(value: object) -> str | None:
    """What keeps a decoded line from being a samples row a resume can use; None if nothing."""
    if not isinstance(value, dict):
        return f"a {type(value).__name__}, not an object"
    for field, kind in SAMPLE_FIELDS.items():
        if not isinstance(value.get(field), kind):
            return f"{field!r} missing or not a {kind.__name__}"
    return None


def _sample_rows(out_path: Path) -> list[dict]:
    """The usable rows of `out_path`. Any other line (cut by a crash, not JSON, not a samples
    row) is reported by its number and dropped, so its task is generated again."""
    rows = []
    for line_no, raw in enumerate(out_path.read_bytes().split(jsonl.NEWLINE), 1):
        if not raw.strip():
            continue
        try:
            value = jsonl.decode_line(raw)
        except ValueError as err:
            reason = str(err)
        else:
            reason = _unusable(value)
        if reason is None:
            rows.append(value)
        else:
            log.warning("%s: line %d: %s; dropped, its task is generated again", out_path,
                        line_no, reason)
    return rows


def prompt_digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


def _existing(out_path: Path, n_samples: int, problems: dict[str, Problem],
              digests: dict[str, str]) -> set[str]:
    """Task ids already complete in `out_path`. Rows of unfinished tasks, rows generated from
    another prompt than the task's today (`digests`) and unusable lines are dropped from the
    file, so they are generated again; the kept rows' solutions are made again from their raw
    text, so a change to the post-processing reaches them."""
    if not out_path.exists():
        return set()
    rows = _sample_rows(out_path)
    changed = {row["task_id"] for row in rows if row["task_id"] in digests
               and row["prompt_sha256"] != digests[row["task_id"]]}
    if changed:
        log.warning("%s: %d task(s) were generated from another prompt than today's (the eval "
                    "data changed): %s; their samples are generated again", out_path,
                    len(changed), ", ".join(sorted(changed)))
    by_task: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_task[row["task_id"]].append(row)
    done = {t for t, task_rows in by_task.items()
            if t in problems and t not in changed and len(task_rows) >= n_samples}
    kept = [_record(problems[row["task_id"]], row["raw"], row["truncated"], row["prompt_sha256"])
            for row in rows if row["task_id"] in done]
    jsonl.write(out_path, kept, ensure_ascii=True)  # evalplus reads it in the locale's encoding
    return done


def _record(problem: Problem, raw: str, truncated: bool, digest: str) -> dict:
    return {"task_id": problem.task_id, "solution": to_solution(raw, problem, DEFAULT_STOPS),
            "raw": raw, "truncated": truncated, "prompt_sha256": digest}


def generate_samples(
    generator: Callable[[], TextGenerator], problems: list[Problem], out_path: Path,
    cfg: EvalConfig,
) -> Path:
    """`cfg.n_samples` samples for every problem, appended as they finish; tasks already
    complete in `out_path` are skipped, so an interrupted run resumes. `generator` is called
    only when something is left to generate."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    prompts = {p.task_id: build_prompt(p, cfg.template) for p in problems}
    digests = {task: prompt_digest(prompt) for task, prompt in prompts.items()}
    done = _existing(out_path, cfg.n_samples, {p.task_id: p for p in problems}, digests)
    todo = [p for p in problems if p.task_id not in done]
    if not todo:
        return out_path
    model = generator()
    try:
        completions = model.complete([prompts[p.task_id] for p in todo], decoding(cfg))
        with out_path.open("a") as out:
            for i, completion in tqdm(completions, total=len(todo) * cfg.n_samples,
                                      desc=f"generate {out_path.stem}", unit="sample"):
                problem = todo[i]
                row = _record(problem, completion.text, completion.truncated,
                              digests[problem.task_id])
                out.write(json.dumps(row) + "\n")
                out.flush()
    finally:
        generation.shut_down(model)
    return out_path
