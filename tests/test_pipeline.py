"""Stage 1 end to end with the real SmolLM2 teacher: prepare -> models -> cache_teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from transformers import AutoConfig, AutoTokenizer

import stages.cache_teacher
import stages.models
import stages.prepare
from akd_cache.store.reader import TeacherCache

N_TRAIN = 6


def params(codealpaca_path, cache_root) -> dict:
    return {"profile": "mini", "profiles": {"mini": {
        "data": {"dataset": str(codealpaca_path), "heldout": 3, "max_train_samples": N_TRAIN},
        "teacher": {"model": "embedded:smollm2"},
        "student": {"model": "storage/models/student", "keep_teacher_layers": 2},
        "cache": {"k": 64, "shard_tokens": 1024, "root": str(cache_root)},
    }}}


def run_stage_one(workdir, smollm2_dir, doc, monkeypatch) -> dict:
    (workdir / "storage" / "models").mkdir(parents=True, exist_ok=True)
    link = workdir / "storage" / "models" / smollm2_dir.name
    if not link.exists():
        link.symlink_to(smollm2_dir)
    (workdir / "params.yaml").write_text(yaml.safe_dump(doc))
    monkeypatch.chdir(workdir)
    stages.prepare.main([])
    stages.models.main([])
    stages.cache_teacher.main([])
    return json.loads((workdir / "runs" / "teacher_cache.json").read_text())


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, smollm2_dir, codealpaca_path):
    workdir = tmp_path_factory.mktemp("exp1")
    cache_root = tmp_path_factory.mktemp("shared") / "teacher-cache"
    doc = params(codealpaca_path, cache_root)
    with pytest.MonkeyPatch.context() as mp:
        pointer = run_stage_one(workdir, smollm2_dir, doc, mp)
    return workdir, doc, pointer


def test_cache_from_the_real_teacher(first_run):
    workdir, _, pointer = first_run
    cache = TeacherCache(pointer["location"])
    assert len(cache) == N_TRAIN and cache.k == 64
    student = workdir / "storage" / "models" / "student"
    assert AutoConfig.from_pretrained(student).num_hidden_layers == 2
    cache.check_student(AutoTokenizer.from_pretrained(student), expected_key=pointer["key"])
    stats = cache.meta.stats
    # SmolLM2 is confident on CodeAlpaca responses: little mass outside its top 64
    assert stats.mean_topk_mass > 0.9
    sample = cache[0]
    assert np.exp(sample.target_logprob).mean() > 0.3
    summary = json.loads((workdir / "data" / "prepared" / "summary.json").read_text())
    assert summary["train"] == N_TRAIN and summary["dropped"] == 2  # 2 empty outputs in the file


def test_rerun_and_second_experiment_reuse_the_cache(first_run, tmp_path, smollm2_dir,
                                                     monkeypatch):
    workdir, doc, pointer = first_run

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher should not run for an existing cache")

    monkeypatch.setattr(stages.cache_teacher, "backend_factory", lambda *a: no_teacher)
    assert run_stage_one(workdir, smollm2_dir, doc, monkeypatch) == pointer
    assert run_stage_one(tmp_path, smollm2_dir, doc, monkeypatch) == pointer
