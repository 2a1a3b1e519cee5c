"""The transformers teacher backend against a naive full-vocabulary forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from akd_cache.data.instructions import Example
from akd_cache.data.tokenize import tokenize_example
from akd_cache.store.rows import tail_from_topk
from akd_cache.teacher.hf_backend import HFTeacher, length_buckets

K = 16


def samples_for(model_dir, rows, n=8):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [
        tokenize_example(tokenizer, Example(str(i), r["instruction"], r["input"], r["output"]),
                         "alpaca", 512, "truncate_response")
        for i, r in enumerate(rows[:n])
    ]


def naive_rows(model_dir, sample, temperature=1.0):
    """Full forward of one sequence, float64 log-softmax over the whole vocabulary."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([sample.input_ids])).logits[0].double() / temperature
    logp = logits.log_softmax(-1)
    return logp[sample.prompt_len - 1 : len(sample.input_ids) - 1]


@pytest.mark.parametrize("arch", ["gpt_bigcode", "llama"])
def test_rows_align_with_the_position_that_predicts_the_next_token(tiny_models, codealpaca_rows,
                                                                    arch):
    model_dir = str(tiny_models[arch])
    samples = samples_for(model_dir, codealpaca_rows)
    out = HFTeacher(model_dir, k=K, batch_tokens=1024).score(samples)
    for sample, rows in zip(samples, out):
        logp = naive_rows(model_dir, sample)
        assert len(rows) == sample.n_loss_rows == logp.shape[0]
        values, ids = logp.topk(K, dim=-1)
        np.testing.assert_array_equal(rows.topk_ids, ids.numpy())
        np.testing.assert_allclose(rows.topk_logprobs, values.numpy(), atol=2e-5)
        targets = torch.tensor(sample.input_ids[sample.prompt_len :])
        expected_target = logp.gather(-1, targets[:, None]).squeeze(-1)
        np.testing.assert_allclose(rows.target_logprob, expected_target.numpy(), atol=2e-5)
        # an off-by-one would pair row j with token j, not j + 1
        previous = torch.tensor(sample.input_ids[sample.prompt_len - 1 : -1])
        shifted = logp.gather(-1, previous[:, None])
        assert np.abs(rows.target_logprob - shifted.squeeze(-1).numpy()).max() > 1e-2
        expected_tail = torch.log1p(-values.exp().sum(-1))
        np.testing.assert_allclose(rows.tail_logmass, expected_tail.numpy(), atol=2e-5)


def test_exact_temperature(tiny_models, codealpaca_rows):
    model_dir = str(tiny_models["llama"])
    sample = samples_for(model_dir, codealpaca_rows, n=1)[0]
    rows = HFTeacher(model_dir, k=K, temperature=2.0).score([sample])[0]
    values, ids = naive_rows(model_dir, sample, temperature=2.0).topk(K, dim=-1)
    np.testing.assert_array_equal(rows.topk_ids, ids.numpy())
    np.testing.assert_allclose(rows.topk_logprobs, values.numpy(), atol=2e-5)


def test_chunking_and_batching_do_not_change_the_rows(tiny_models, codealpaca_rows):
    model_dir = str(tiny_models["gpt_bigcode"])
    samples = samples_for(model_dir, codealpaca_rows, n=10)
    whole = HFTeacher(model_dir, k=K, batch_tokens=8192).score(samples)
    teacher = HFTeacher(model_dir, k=K, batch_tokens=300)
    teacher.rows_per_chunk = 7
    pieces = teacher.score(samples)
    for a, b in zip(whole, pieces):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-5)
        np.testing.assert_allclose(a.tail_logmass, b.tail_logmass, atol=1e-5)


def test_length_buckets_respect_the_token_budget():
    lengths = [5, 50, 7, 48, 6, 100]
    batches = length_buckets(lengths, batch_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= 100 or len(batch) == 1


def test_tail_from_topk_keeps_digits_for_tiny_tails():
    p = np.array([[0.5, 0.3, 0.2 - 1e-7]])
    tail = tail_from_topk(np.log(p).astype(np.float32))
    assert tail[0] == pytest.approx(np.log(1e-7), abs=0.3)
    # a top-k holding all the mass: float32 rounding leaves at most ~1e-7, or exactly nothing
    assert tail_from_topk(np.log(np.array([[0.6, 0.4]])).astype(np.float32))[0] < np.log(1e-6)
    assert tail_from_topk(np.array([[0.0, -np.inf]], dtype=np.float32))[0] == -np.inf
