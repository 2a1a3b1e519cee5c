"""Held-out fidelity against a naive float64 computation, one sample at a time."""

from __future__ import annotations

import copy
import gc
import weakref
from collections.abc import Callable

import numpy as np
import pytest
import torch
from tiny_models import fill_tiny_cache
from transformers import AutoModelForCausalLM

from akd_cache.config import CacheConfig
from akd_cache.errors import ConfigError
from akd_cache.evaluation.fidelity import bootstrap_interval, per_sample_fidelity
from akd_cache.store.reader import TeacherCache
from akd_cache.student.loss import topk_divergences

K = 16
N_SAMPLES = 5
T = 2.0
# every device this machine has: the CPU here and in CI, a GPU's too where one is lent
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(scope="module")
def heldout(tiny_models, codealpaca_rows, tmp_path_factory):
    teacher = str(tiny_models["llama"])
    location = str(tmp_path_factory.mktemp("heldout") / "c")
    fill_tiny_cache(teacher, codealpaca_rows[N_SAMPLES : 2 * N_SAMPLES],
                    CacheConfig(k=K, max_length=128, temperature=T), location)
    return TeacherCache(location), teacher


def naive(student, teacher, cache: TeacherCache, index: int) -> dict[str, float]:
    """One sample, whole-sequence logits in float64, the loss rows picked by position."""
    sample = cache[index]
    ids = torch.tensor(sample.input_ids)[None]
    rows = slice(sample.prompt_len - 1, len(sample.input_ids) - 1)
    s = student(input_ids=ids).logits[0, rows].double()
    t = teacher(input_ids=ids).logits[0, rows].double()
    log_q, log_p = torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1)
    labels = ids[0, sample.prompt_len :]
    topk = torch.from_numpy(sample.topk_ids)
    out = {
        "fkl": (log_p.exp() * (log_p - log_q)).sum(-1).mean(),
        "rkl": (log_q.exp() * (log_q - log_p)).sum(-1).mean(),
        "top1_agreement": (s.argmax(-1) == t.argmax(-1)).double().mean(),
        "nll": -torch.log_softmax(s, -1).gather(-1, labels[:, None]).mean(),
        "student_tail_mass": (1 - log_q.gather(-1, topk).exp().sum(-1)).mean(),
    }
    for mode in ("bucket", "uniform"):
        div = topk_divergences(s, topk, torch.from_numpy(sample.topk_logprobs).double(),
                               torch.from_numpy(sample.tail_logmass).double(), None,
                               temperature=T, mode=mode)
        out[f"fkl_{mode}"], out[f"rkl_{mode}"] = div.fkl.mean(), div.rkl.mean()
    return {name: float(value) for name, value in out.items()}


@pytest.mark.parametrize("device", DEVICES)
def test_fidelity_equals_a_naive_float64_computation(heldout, tiny_models, device):
    cache, teacher_path = heldout
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    student = AutoModelForCausalLM.from_pretrained(str(tiny_models["gpt_bigcode"])).eval()
    got = per_sample_fidelity({"s": lambda: copy.deepcopy(student).to(device)}, cache,
                              lambda: copy.deepcopy(teacher).to(device), temperature=T,
                              batch_size=2, chunk_positions=17, device=device)["s"]
    with torch.no_grad():
        want = [naive(student, teacher, cache, i) for i in range(len(cache))]
    for name, values in got.items():
        np.testing.assert_allclose(values, [w[name] for w in want], rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    assert got["fkl"].min() > 0.01  # a random student is far from the teacher


def test_one_model_at_a_time_is_held_and_each_is_measured_as_if_alone(heldout, tiny_models):
    """Each loader runs only once the model before it is gone (only the teacher's lm head is
    kept), and a student measured after another gets the numbers it gets alone."""
    cache, teacher_path = heldout
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    student = AutoModelForCausalLM.from_pretrained(str(tiny_models["gpt_bigcode"])).eval()
    loaded: list[weakref.ref] = []

    def loader(model: torch.nn.Module) -> Callable[[], torch.nn.Module]:
        def load() -> torch.nn.Module:
            gc.collect()
            assert [ref() for ref in loaded] == [None] * len(loaded), "a model is still held"
            fresh = copy.deepcopy(model)
            loaded.append(weakref.ref(fresh))
            return fresh
        return load

    both = per_sample_fidelity({"a": loader(student), "b": loader(student)}, cache,
                               loader(teacher), temperature=T, batch_size=2)
    assert len(loaded) == 3
    alone = per_sample_fidelity({"b": lambda: student}, cache, lambda: teacher, temperature=T,
                                batch_size=2)["b"]
    for name, values in alone.items():
        np.testing.assert_array_equal(both["b"][name], values, err_msg=name)
        np.testing.assert_array_equal(both["a"][name], values, err_msg=name)


def test_the_teacher_against_itself_is_at_zero(heldout):
    cache, teacher_path = heldout
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    got = per_sample_fidelity({"t": lambda: teacher}, cache, lambda: teacher,
                              temperature=T)["t"]
    np.testing.assert_allclose(got["fkl"], 0, atol=1e-5)
    np.testing.assert_allclose(got["rkl"], 0, atol=1e-5)
    np.testing.assert_array_equal(got["top1_agreement"], 1.0)


def test_without_a_teacher_only_the_cache_view_is_computed(heldout, tiny_models):
    cache, _ = heldout
    student = AutoModelForCausalLM.from_pretrained(str(tiny_models["gpt_bigcode"])).eval()
    got = per_sample_fidelity({"s": lambda: student}, cache, None, temperature=T)["s"]
    assert "fkl" not in got and "fkl_bucket" in got and "nll" in got


def test_a_temperature_other_than_the_cache_is_refused(heldout, tiny_models):
    cache, _ = heldout
    student = AutoModelForCausalLM.from_pretrained(str(tiny_models["gpt_bigcode"])).eval()
    with pytest.raises(ConfigError, match=r"2.0, fidelity asks for train.temperature 1"):
        per_sample_fidelity({"s": lambda: student}, cache, None, temperature=1.0)


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_more_samples():
    rng = np.random.default_rng(1)
    small = bootstrap_interval(rng.normal(3.0, 1.0, 20))
    large = bootstrap_interval(rng.normal(3.0, 1.0, 2000))
    assert small.ci_low < small.mean < small.ci_high
    assert large.ci_high - large.ci_low < (small.ci_high - small.ci_low) / 5
    assert large.ci_low < 3.0 < large.ci_high


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,setting", [("shape", {"tail_shape": True}),
                                          ("lowrank", {"tail_rank": 16})])
def test_a_shape_or_code_cache_adds_its_view_equal_to_its_dense_distribution(
        tiny_models, codealpaca_rows, tmp_path, mode, setting, device):
    """The shape (lowrank) view against KL computed from `reader.dense_logprobs(i, mode)`."""
    location = str(tmp_path / "c")
    fill_tiny_cache(str(tiny_models["llama"]), codealpaca_rows[N_SAMPLES : 2 * N_SAMPLES],
                    CacheConfig(k=K, max_length=128, temperature=T, **setting), location)
    cache = TeacherCache(location)
    student = AutoModelForCausalLM.from_pretrained(str(tiny_models["gpt_bigcode"])).eval()
    got = per_sample_fidelity({"s": lambda: copy.deepcopy(student).to(device)}, cache, None,
                              temperature=T, batch_size=2, chunk_positions=17,
                              device=device)["s"]
    for i in range(len(cache)):
        sample = cache[i]
        rows = slice(sample.prompt_len - 1, len(sample.input_ids) - 1)
        with torch.no_grad():
            logits = student(input_ids=torch.tensor(sample.input_ids)[None]).logits[0, rows]
        log_q = torch.log_softmax(logits.double() / T, -1)
        log_p = torch.from_numpy(cache.dense_logprobs(i, mode)).double()
        fkl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        rkl = (log_q.exp() * (log_q - log_p)).sum(-1).mean()
        assert got[f"fkl_{mode}"][i] == pytest.approx(float(fkl), rel=1e-4)
        assert got[f"rkl_{mode}"][i] == pytest.approx(float(rkl), rel=1e-4)
    assert not np.allclose(got[f"fkl_{mode}"], got["fkl_uniform"], rtol=1e-3)
    other = "lowrank" if mode == "shape" else "shape"
    assert f"fkl_{other}" not in got
