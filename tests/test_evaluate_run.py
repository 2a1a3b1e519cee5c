"""One model through the whole evaluation: generation, evalplus, taxonomy, metrics."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from akd_cache.config import EvalConfig
from akd_cache.errors import ConfigError, MissingInputError
from akd_cache.evaluation.run import SETTINGS_FILE, evaluate_model
from akd_cache.run_settings import METRICS_FILE
from akd_cache.run_settings import log as run_settings_log

EVALPLUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "evalplus"
RUN_SETTINGS_LOG = run_settings_log.name


def removals(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What `discard_if_changed` announced (other loggers, the Trainer's, are left out)."""
    return [r.getMessage() for r in caplog.records if r.name == RUN_SETTINGS_LOG]


def test_a_random_model_scores_zero_and_every_failure_is_classified(tiny_models, tmp_path):
    cfg = EvalConfig(data_dir=str(EVALPLUS), datasets=["humaneval"], n_tasks=3,
                     max_new_tokens=8, batch_size=3, taxonomy_workers=1)
    result = evaluate_model(tiny_models["llama"], tmp_path, cfg)
    humaneval = result["datasets"]["humaneval"]
    assert humaneval == {"base_pass_at_1": 0.0, "plus_pass_at_1": 0.0, "n_tasks": 3}
    taxonomy = result["taxonomy"]["humaneval"]
    assert taxonomy["total"] == 3 and taxonomy["correct"] == 0
    assert sum(taxonomy["categories"].values()) == 3
    rows = (tmp_path / "humaneval_taxonomy.jsonl").read_text().splitlines()
    assert len(rows) == 3 and all(not json.loads(r)["passed"] for r in rows)
    # samples made under other settings are never reused: 1 new token cannot repeat 8
    evaluate_model(tiny_models["llama"], tmp_path, cfg.model_copy(update={"max_new_tokens": 1}))
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["eval"]["max_new_tokens"] == 1
    raws = [json.loads(r)["raw"] for r in (tmp_path / "humaneval_samples.jsonl").read_text()
            .splitlines()]
    assert len(raws) == 3 and all(len(raw) <= 12 for raw in raws)
    # each dataset keeps the folder of its last scoring run only
    assert [len(list(d.iterdir())) for d in (tmp_path / "scoring").iterdir()] == [1]


def small_cfg() -> EvalConfig:
    return EvalConfig(data_dir=str(EVALPLUS), datasets=["humaneval"], n_tasks=2,
                      max_new_tokens=4, batch_size=2, taxonomy_workers=1)


def mark_samples(samples: Path) -> None:
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    samples.write_text("".join(json.dumps({**row, "raw": "MARK"}) + "\n" for row in rows))


def raws(samples: Path) -> list[str]:
    return [json.loads(line)["raw"] for line in samples.read_text().splitlines()]


def test_a_new_revision_of_the_model_makes_its_samples_again(tiny_models, tmp_path, caplog):
    """A hub model has no local weights to hash: its revision decides whether samples count."""
    cfg = small_cfg()
    samples = tmp_path / "humaneval_samples.jsonl"
    metrics = tmp_path / METRICS_FILE  # what `akd evaluate` writes from the result
    evaluate_model(tiny_models["llama"], tmp_path, cfg, revision="v1")
    metrics.write_text("{}")
    mark_samples(samples)
    evaluate_model(tiny_models["llama"], tmp_path, cfg, revision="v1")
    assert raws(samples) == ["MARK", "MARK"] and metrics.exists()
    with caplog.at_level(logging.WARNING, logger=RUN_SETTINGS_LOG):
        evaluate_model(tiny_models["llama"], tmp_path, cfg, revision="v2")
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["revision"] == "v2"
    assert len(raws(samples)) == 2 and "MARK" not in raws(samples)
    # the old result goes with its samples: a failed run leaves none that looks like its own
    assert not metrics.exists()
    assert removals(caplog) == [(f"{tmp_path}: made under other settings (revision changed); "
                                 f"removing humaneval_samples.jsonl, humaneval_taxonomy.jsonl, "
                                 f"{METRICS_FILE}")]


def test_bad_data_settings_cost_no_samples_and_moved_data_keeps_them(tiny_models, tmp_path,
                                                                     caplog, monkeypatch):
    """The data is read before anything is discarded; where it lies, which datasets run and
    how many processes classify change no sample, so they keep the samples."""
    cfg = small_cfg()
    out = tmp_path / "eval"
    samples = out / "humaneval_samples.jsonl"
    evaluate_model(tiny_models["llama"], out, cfg)
    mark_samples(samples)
    before = {path: path.read_text() for path in (samples, out / SETTINGS_FILE)}
    nowhere = tmp_path / "nowhere"
    with pytest.raises(MissingInputError, match=rf"^{nowhere}/HumanEvalPlus.jsonl.gz: no "
                                                r"humaneval data there \(eval.data_dir\)"):
        evaluate_model(tiny_models["llama"], out, cfg.model_copy(update={"data_dir": str(nowhere)}))
    assert {path: path.read_text() for path in before} == before
    with monkeypatch.context() as cpu_only:  # a device the machine lacks: refused, nothing lost
        cpu_only.setattr(torch.accelerator, "is_available", lambda: False)
        with pytest.raises(ConfigError, match=r"^eval.device 'cuda': this machine has no "):
            evaluate_model(tiny_models["llama"], out, cfg.model_copy(update={"device": "cuda"}))
    assert {path: path.read_text() for path in before} == before
    moved = shutil.copytree(EVALPLUS, tmp_path / "moved")
    with caplog.at_level(logging.WARNING, logger=RUN_SETTINGS_LOG):
        evaluate_model(tiny_models["llama"], out, cfg.model_copy(update={
            "data_dir": str(moved), "datasets": ["humaneval", "mbpp"], "taxonomy_workers": 2}))
    assert raws(samples) == ["MARK", "MARK"] and not removals(caplog)
    assert json.loads((out / SETTINGS_FILE).read_text())["eval"]["data_dir"] == str(moved)
