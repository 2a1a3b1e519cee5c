"""Stage 1 end to end with the real SmolLM2 teacher: prepare -> models -> cache_teacher."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import akd_cache.teacher.build
import stages.cache_teacher
import stages.models
import stages.prepare
import stages.template_analysis
from akd_cache.config import CacheConfig, TemplateAnalysisConfig
from akd_cache.data.instructions import read_examples
from akd_cache.data.templates import TEMPLATES
from akd_cache.data.tokenize import tokenize_example
from akd_cache.store.reader import TeacherCache
from akd_cache.teacher.template_analysis import compare_templates

N_TRAIN = 6
N_TEMPLATE_SAMPLES = 2
K = 64
PROBABILITY_TOLERANCE = 1e-4  # the cache stores the target log-prob in float32
ENTROPY_TOLERANCE = 1e-2  # the top-k values are coded on 100 sqrt(p) levels


def params(codealpaca_path, cache_root) -> dict:
    return {"profile": "mini", "profiles": {"mini": {
        "data": {"dataset": str(codealpaca_path), "heldout": 3, "max_train_samples": N_TRAIN},
        "teacher": {"model": "embedded:smollm2"},
        "student": {"model": "storage/models/student", "keep_teacher_layers": 2},
        "cache": {"k": K, "shard_tokens": 1024, "root": str(cache_root)},
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

    monkeypatch.setattr(akd_cache.teacher.build, "backend_factory", lambda *a: no_teacher)
    assert run_stage_one(workdir, smollm2_dir, doc, monkeypatch) == pointer
    assert run_stage_one(tmp_path, smollm2_dir, doc, monkeypatch) == pointer


def live_template_scores(workdir, teacher_dir) -> dict:
    """Table 9 by hand: the stage's seeded sample of training examples under each template, the
    live teacher's full softmax in float64, its top 64 plus the rest as one bucket for the
    entropy (what a top-k cache can know), compared as the paper does."""
    examples = read_examples(workdir / "data" / "prepared" / "train.jsonl")
    examples = random.Random(TemplateAnalysisConfig().seed).sample(examples, N_TEMPLATE_SAMPLES)
    cache = CacheConfig()  # the test's params leave max_length and truncation at their defaults
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float64).eval()
    scores = {}
    for template in TEMPLATES:
        scores[template] = {}
        for example in examples:
            sample = tokenize_example(tokenizer, example, template, cache.max_length,
                                      cache.truncation)
            ids = torch.tensor(sample.input_ids)[None]
            with torch.no_grad():
                log_p = torch.log_softmax(teacher(input_ids=ids).logits[0], -1)
            rows = log_p[sample.prompt_len - 1 : -1]
            target = rows.gather(-1, ids[0, sample.prompt_len :, None])[:, 0]
            top = rows.topk(K).values
            tail = torch.log1p(-top.exp().sum(-1))
            entropy = -(top.exp() * top).sum(-1) - tail.exp() * tail
            scores[template][example.sample_id] = (float(target.exp().mean()),
                                                   float(entropy.mean()))
    return compare_templates(scores)


def test_template_analysis_builds_one_cache_per_template(first_run, tmp_path, monkeypatch,
                                                         smollm2_dir):
    """Table 9 through the same cache build as Stage 1, per template against the live teacher;
    a rerun reuses every template's cache."""
    workdir, doc, _ = first_run
    doc = {**doc, "profiles": {"mini": {**doc["profiles"]["mini"], "template_analysis": {
        "n_samples": N_TEMPLATE_SAMPLES, "root": str(tmp_path / "template-caches")}}}}
    (workdir / "params_templates.yaml").write_text(yaml.safe_dump(doc))
    monkeypatch.chdir(workdir)
    result_path = workdir / "runs" / "template_analysis.json"
    stages.template_analysis.main(["--params", "params_templates.yaml"])
    result = json.loads(result_path.read_text())
    assert len(list((tmp_path / "template-caches").iterdir())) == len(TEMPLATES)
    reference = live_template_scores(workdir, smollm2_dir)
    assert result["n_samples"] == N_TEMPLATE_SAMPLES
    assert set(result["templates"]) == set(TEMPLATES)
    for template, scores in result["templates"].items():
        expected = reference["templates"][template]
        assert scores["mean_probability"] == pytest.approx(expected["mean_probability"],
                                                           abs=PROBABILITY_TOLERANCE), template
        assert scores["mean_entropy"] == pytest.approx(expected["mean_entropy"],
                                                       abs=ENTROPY_TOLERANCE), template
    assert result["wins"] == reference["wins"]

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher should not run for existing template caches")

    monkeypatch.setattr(akd_cache.teacher.build, "backend_factory", lambda *a: no_teacher)
    stages.template_analysis.main(["--params", "params_templates.yaml"])
    assert json.loads(result_path.read_text()) == result


def test_heldout_cache_and_fidelity_through_the_cli(first_run, monkeypatch):
    """The held-out split gets its own cache; `akd fidelity` puts the teacher itself at zero
    and the 2-of-30-layer student far from it, in both the exact and the cache's view."""
    from akd_cache.cli import main

    workdir, _, pointer = first_run
    monkeypatch.chdir(workdir)
    main(["cache-teacher", "--split", "heldout"])
    heldout = json.loads((workdir / "runs" / "teacher_cache_heldout.json").read_text())
    cache = TeacherCache(heldout["location"])
    assert heldout["key"] != pointer["key"] and cache.ingredients["split"] == "heldout"
    teacher_dir = "storage/models/smollm2-135m-instruct"
    main(["fidelity", "--model", "student", "--model", teacher_dir])
    result = {name: json.loads((workdir / "runs" / "fidelity" / f"{name}.json").read_text())
              for name in ("student", "smollm2-135m-instruct")}
    teacher, student = (result[n]["metrics"] for n in ("smollm2-135m-instruct", "student"))
    assert teacher["fkl"]["mean"] < 1e-4 and teacher["top1_agreement"]["mean"] == 1.0
    # the cache's view of the teacher is its coding error plus the tail it cannot see
    assert teacher["fkl_uniform"]["mean"] < 0.1
    assert student["fkl"]["mean"] > 1.0 and student["fkl_bucket"]["mean"] <= student["fkl"]["mean"]
    for values in student.values():
        assert values["ci_low"] <= values["mean"] <= values["ci_high"]
