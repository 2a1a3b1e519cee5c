"""Evaluate one model: generate, score with evalplus, classify the failures, write metrics."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

from akd_cache import jsonl
from akd_cache.config import EvalConfig
from akd_cache.devices import require_device
from akd_cache.evaluation.generate import generate_samples, generator_factory
from akd_cache.evaluation.problems import load_problems
from akd_cache.evaluation.score import score
from akd_cache.evaluation.taxonomy import attempts_from_scores, classify
from akd_cache.run_settings import METRICS_FILE, discard_if_changed
from akd_cache.teacher.identity import weights_sha256


def taxonomy_json(summary) -> dict:
    return {
        "total": summary.total,
        "correct": summary.correct,
        "complete": summary.complete,
        "incomplete": summary.incomplete,
        "pass_rate_complete": summary.pass_rate_complete,
        "categories": dict(summary.categories),
        "subcategories": {f"{cat}: {sub}": n for (cat, sub), n in summary.subcategories.items()},
    }


SETTINGS_FILE = "eval_settings.json"
SAMPLE_NEUTRAL_SETTINGS = frozenset({"eval.data_dir", "eval.datasets", "eval.taxonomy_workers"})
"""Settings that leave the generated samples as they are, so a change to them keeps them:
where the data files lie (moving the folder changes no prompt), which datasets run (each has
its own samples file) and how many processes classify the failures (after generation)."""
SCORING_DIR = "scoring"  # evalplus's run folders, one per dataset, each replaced by the next run


def evaluate_model(model_dir: Path, out: Path, cfg: EvalConfig, revision: str | None = None
                   ) -> dict:
    """Per dataset: samples (resumable), a fresh evalplus run, the taxonomy of the failures.
    A hub model has no local weights to hash, so its `revision` stands in the settings that
    decide whether earlier samples still count."""
    data_dir = Path(cfg.data_dir) if cfg.data_dir else None
    # read before anything is discarded: bad data or device settings must not cost the samples
    problems = {d: load_problems(d, data_dir, cfg.n_tasks, cfg.seed) for d in cfg.datasets}
    if cfg.backend == "hf":
        require_device(cfg.device, "eval.device")
    settings = {"model": weights_sha256(str(model_dir)), "revision": revision,
                "eval": cfg.model_dump()}
    discard_if_changed(out, SETTINGS_FILE, settings, [*out.glob("*.jsonl"), out / METRICS_FILE],
                       SAMPLE_NEUTRAL_SETTINGS)
    generator = generator_factory(model_dir, cfg, revision)
    datasets, taxonomy = {}, {}
    for dataset in cfg.datasets:
        samples = generate_samples(generator, problems[dataset],
                                   out / f"{dataset}_samples.jsonl", cfg)
        scoring = out / SCORING_DIR / dataset  # the last scoring run only: each makes a folder
        shutil.rmtree(scoring, ignore_errors=True)
        result = score(samples, dataset, data_dir=data_dir, work_dir=scoring,
                       allow_subset=cfg.n_tasks is not None)
        summary, rows = classify(attempts_from_scores(result.samples, problems[dataset]),
                                 workers=cfg.taxonomy_workers)
        jsonl.write(out / f"{dataset}_taxonomy.jsonl", map(asdict, rows), ensure_ascii=True)
        datasets[dataset] = {
            "base_pass_at_1": result.base_pass_at_1,
            "plus_pass_at_1": result.plus_pass_at_1,
            "n_tasks": len(result.tasks),
        }
        taxonomy[dataset] = taxonomy_json(summary)
    return {"datasets": datasets, "taxonomy": taxonomy}
