"""Online-teacher training: the live teacher's full distribution in place of the cache's top-k.

References: an explicit float64 full-vocabulary computation; a cache run whose teacher rows hold
the whole vocabulary (k = V) with the Stage 1 backend's exact values; and a cache run that must
never touch the teacher model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import fill_tiny_cache
from transformers import AutoModelForCausalLM, AutoTokenizer

import akd_cache.student.run as run_module
from akd_cache.config import AKD, KD, CacheConfig, ModelRef, TrainConfig
from akd_cache.store.reader import TeacherCache, collate
from akd_cache.store.rows import TokenizedSample
from akd_cache.student.loss import LiveTeacher, LossSettings, distillation_loss
from akd_cache.student.run import train_experiment
from akd_cache.student.trainer import DistillationModule
from akd_cache.teacher.hf_backend import HFTeacher

F64 = torch.float64
N_SAMPLES = 8
TRAIN = TrainConfig(batch_size=4, max_steps=4, save_steps=100, lr=1e-3, chunk_size=37)
# Cache k = V and online differ only in float32 rounding (sums in top-k order vs id order, the
# teacher forward's batch shapes): measured 1.1e-7 relative on the divergences. Adam scales every
# entry's step to about lr, so that rounding moves near-zero-gradient entries by up to 6e-6 in
# four steps, against 4e-3 that training moves them.
LOSS_RTOL = 1e-6
WEIGHT_ATOL = 2e-5


@pytest.fixture(scope="module")
def full_cache(tiny_models, codealpaca_rows, tmp_path_factory):
    """A GPTBigCode teacher's cache with k = V, the Llama student sharing its tokenizer."""
    teacher = str(tiny_models["gpt_bigcode"])
    vocab = len(AutoTokenizer.from_pretrained(teacher))
    location = str(tmp_path_factory.mktemp("cache") / "c")
    fill_tiny_cache(teacher, codealpaca_rows[:N_SAMPLES], CacheConfig(k=vocab, max_length=128),
                    location, vocab)
    return location, str(tiny_models["llama"]), teacher


def naive_objective(student_logits, teacher_logits, labels, beta, ce_weight, temperature):
    """Per-sample means of beta * RKL + (1 - beta) * FKL + ce_weight * CE, then the batch mean,
    with every divergence an explicit float64 sum over the whole vocabulary."""
    per_sample, fkl_means, rkl_means = [], [], []
    for s_rows, t_rows, y_rows in zip(student_logits, teacher_logits, labels, strict=True):
        fkls, rkls, ces = [], [], []
        for s, t, y in zip(s_rows.tolist(), t_rows.tolist(), y_rows.tolist(), strict=True):
            log_q = log_softmax([v / temperature for v in s])
            log_p = log_softmax([v / temperature for v in t])
            fkls.append(sum(math.exp(a) * (a - b) for a, b in zip(log_p, log_q, strict=True)))
            rkls.append(sum(math.exp(b) * (b - a) for a, b in zip(log_p, log_q, strict=True)))
            ces.append(-log_softmax(s)[y])
        fkl, rkl, ce = (sum(v) / len(v) for v in (fkls, rkls, ces))
        per_sample.append(beta * rkl + (1 - beta) * fkl + ce_weight * ce)
        fkl_means.append(fkl)
        rkl_means.append(rkl)
    n = len(per_sample)
    return sum(per_sample) / n, sum(fkl_means) / n, sum(rkl_means) / n


def log_softmax(values: list[float]) -> list[float]:
    peak = max(values)
    norm = peak + math.log(sum(math.exp(v - peak) for v in values))
    return [v - norm for v in values]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_online_loss_equals_a_naive_float64_full_vocabulary_computation(temperature):
    gen = torch.Generator().manual_seed(0)
    batch, seq, width, teacher_width, vocab = 3, 6, 8, 12, 40
    hidden = torch.randn(batch, seq, width, generator=gen, dtype=F64, requires_grad=True)
    teacher_hidden = torch.randn(batch, seq, teacher_width, generator=gen, dtype=F64)
    head = torch.nn.Linear(width, vocab, dtype=F64)
    teacher_head = torch.nn.Linear(teacher_width, vocab, bias=False, dtype=F64)
    with torch.no_grad():
        for weight in (head.weight, head.bias, teacher_head.weight):
            weight.copy_(torch.randn(weight.shape, generator=gen, dtype=F64) * 2)
    loss_mask = torch.zeros(batch, seq, dtype=torch.bool)
    loss_mask[0, 1:5] = loss_mask[1, 0:2] = loss_mask[2, 3:6] = True
    labels = torch.randint(vocab, (batch, seq), generator=gen)
    beta, ce_weight = 0.3, 0.5
    settings = LossSettings(distill=True, ce_weight=ce_weight, tail_mode="bucket",
                            temperature=temperature, chunk_size=4)

    out = distillation_loss(hidden, head, LiveTeacher(teacher_hidden, teacher_head), loss_mask,
                            labels, torch.tensor(beta, dtype=F64), settings)

    student_logits = [head(hidden[b][loss_mask[b]]).detach() for b in range(batch)]
    teacher_logits = [teacher_head(teacher_hidden[b][loss_mask[b]]) for b in range(batch)]
    targets = [labels[b][loss_mask[b]] for b in range(batch)]
    loss, fkl, rkl = naive_objective(student_logits, teacher_logits, targets, beta, ce_weight,
                                     temperature)
    assert out.loss.item() == pytest.approx(loss, rel=1e-12)
    assert out.fkl.item() == pytest.approx(fkl, rel=1e-12)
    assert out.rkl.item() == pytest.approx(rkl, rel=1e-12)
    assert out.teacher_tail.item() == out.student_tail.item() == 0.0  # nothing outside

    # gradients against autograd through the materialised float64 objective
    out.loss.backward()
    assert teacher_head.weight.grad is None  # the teacher is never trained
    fused_grads = [hidden.grad, head.weight.grad, head.bias.grad]
    hidden.grad = head.weight.grad = head.bias.grad = None
    weight = 1.0 / (loss_mask.sum(1)[torch.nonzero(loss_mask)[:, 0]].to(F64) * batch)
    log_q = (head(hidden[loss_mask]) / temperature).log_softmax(-1)
    log_p = (teacher_head(teacher_hidden[loss_mask]) / temperature).log_softmax(-1)
    fkl_rows = (log_p.exp() * (log_p - log_q)).sum(-1)
    rkl_rows = (log_q.exp() * (log_q - log_p)).sum(-1)
    ce_rows = torch.nn.functional.cross_entropy(head(hidden[loss_mask]), labels[loss_mask],
                                                reduction="none")
    ((beta * rkl_rows + (1 - beta) * fkl_rows + ce_weight * ce_rows) * weight).sum().backward()
    for fused, reference in zip(fused_grads, [hidden.grad, head.weight.grad, head.bias.grad],
                                strict=True):
        torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-12)


def test_online_module_matches_the_teacher_models_own_logits(full_cache):
    """The teacher's rows line up with the student's positions (no off-by-one)."""
    location, student_path, teacher_path = full_cache
    batch = collate([TeacherCache(location)[i] for i in range(4)])
    student = AutoModelForCausalLM.from_pretrained(student_path, dtype=F64)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=F64)
    module = DistillationModule(student, AKD(online=True), TRAIN, teacher)
    out = module(**batch, beta=torch.tensor(0.3, dtype=F64))
    mask = batch["loss_mask"]
    student_logits = student(input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).logits
    teacher_logits = teacher(input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).logits
    loss, _, _ = naive_objective(
        [student_logits[b][mask[b]].detach() for b in range(4)],
        [teacher_logits[b][mask[b]].detach() for b in range(4)],
        [batch["labels"][b][mask[b]] for b in range(4)], 0.3, 0.0, 1.0,
    )
    assert out.loss.item() == pytest.approx(loss, rel=1e-10)
    with pytest.raises(ValueError, match="needs the teacher model"):
        DistillationModule(student, AKD(online=True), TRAIN)
    with pytest.raises(ValueError, match="a cache run none"):
        DistillationModule(student, AKD(), TRAIN, teacher)


def exact_rows(location: str, teacher_path: str):
    """The cache's samples with the Stage 1 backend's k = V rows before the store codes them
    (the store keeps sqrt(p) in 101 levels), keyed by sample id."""
    cache = TeacherCache(location)
    samples = [cache[i] for i in range(len(cache))]
    backend = HFTeacher(teacher_path, k=cache.k)
    rows = backend.score([TokenizedSample(s.sample_id, s.input_ids.tolist(), s.prompt_len)
                          for s in samples])
    return {s.sample_id: r for s, r in zip(samples, rows, strict=True)}


def test_cache_of_the_whole_vocabulary_and_online_train_identically(full_cache, tmp_path,
                                                                     monkeypatch):
    location, student_path, teacher_path = full_cache
    exact = exact_rows(location, teacher_path)
    decode = TeacherCache.__getitem__

    def exact_item(self, index):
        sample = decode(self, index)
        row = exact[sample.sample_id]
        assert row.topk_ids.shape == sample.topk_ids.shape
        return type(sample)(**{**vars(sample), "topk_ids": row.topk_ids,
                               "topk_logprobs": row.topk_logprobs,
                               "tail_logmass": row.tail_logmass})

    monkeypatch.setattr(TeacherCache, "__getitem__", exact_item)
    experiment = {"beta": 0.3, "variant": "m2"}
    cached = train_experiment(location, student_path, AKD(**experiment), TRAIN, tmp_path / "c",
                              "c")
    online = train_experiment(location, student_path, AKD(**experiment, online=True), TRAIN,
                              tmp_path / "o", "o", teacher=ModelRef(model=teacher_path))
    assert (cached["teacher"], online["teacher"]) == ("cache", "online")
    assert cached["cache_key"] == online["cache_key"] and cached["steps"] == online["steps"] == 4

    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()
             if '"fkl"' in line] for run in ("c", "o")]
    assert len(logs[0]) == len(logs[1]) == 4
    for c, o in zip(*logs, strict=True):
        for key in ("fkl", "rkl", "beta_used", "beta"):  # the logged loss is rounded
            assert o[key] == pytest.approx(c[key], rel=LOSS_RTOL), key
        assert c["teacher_tail_mass"] == o["teacher_tail_mass"] == 0.0
    assert online["final_beta"] == pytest.approx(cached["final_beta"], rel=LOSS_RTOL)
    assert online["train_loss"] == pytest.approx(cached["train_loss"], rel=LOSS_RTOL)
    assert online["final_beta"] != 0.3  # beta moved, from the exact divergences

    start = load_file(f"{student_path}/model.safetensors")
    weights = [load_file(tmp_path / run / "model" / "model.safetensors") for run in ("c", "o")]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=WEIGHT_ATOL)
    moved = max((weights[0][n] - start[n]).abs().max().item() for n in start)
    assert moved > 100 * WEIGHT_ATOL


def test_a_cache_run_never_loads_the_teacher(full_cache, tmp_path, monkeypatch):
    location, student_path, teacher_path = full_cache

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(run_module, "load_teacher", refuse)
    monkeypatch.setattr(HFTeacher, "__init__", refuse)
    teacher = ModelRef(model=teacher_path)
    metrics = train_experiment(location, student_path, KD(), TRAIN, tmp_path / "cache", "kd",
                               teacher=teacher)
    assert metrics["teacher"] == "cache" and metrics["steps"] == 4
    with pytest.raises(AssertionError, match="the teacher was loaded"):
        train_experiment(location, student_path, KD(online=True), TRAIN, tmp_path / "online",
                         "kd", teacher=teacher)
    with pytest.raises(ValueError, match="needs the teacher model"):
        train_experiment(location, student_path, KD(online=True), TRAIN, tmp_path / "x", "kd")


@pytest.mark.parametrize("setting", ["logit_scale", "final_logit_softcapping"])
def test_a_teacher_that_scales_or_caps_its_logits_is_refused_live(tiny_models, tmp_path,
                                                                  setting):
    """Online training and `akd fidelity` compute the teacher's logits as W h: a teacher whose
    own forward scales or caps them would be measured wrong, so it is refused by name."""
    from akd_cache.errors import ConfigError
    from akd_cache.student.setup import load_frozen_teacher

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["llama"]))
    setattr(model.config, setting, 2.0)
    model.save_pretrained(tmp_path / "scaled")
    with pytest.raises(ConfigError, match=rf"{setting} is not supported for a live teacher"):
        load_frozen_teacher(ModelRef(model=str(tmp_path / "scaled")), torch.float32)
    plain = load_frozen_teacher(ModelRef(model=str(tiny_models["llama"])), torch.float32)
    assert not plain.training and not any(p.requires_grad for p in plain.parameters())
