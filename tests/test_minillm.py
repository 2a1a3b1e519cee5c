"""MiniLLM through TRL: a few CPU steps move the student towards the teacher in reverse KL on
held-out samples, measured exactly over the full vocabulary."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import build_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerState

from akd_cache.config import MiniLLM, ModelRef, TrainConfig
from akd_cache.data.instructions import Example
from akd_cache.data.tokenize import tokenize_example
from akd_cache.student.minillm import tokens_at, train_minillm

TEMPLATE = "alpaca_original"
N_TRAIN = 32
N_HELDOUT = 8
MAX_LENGTH = 256
STUDENT_SEED = 1  # the teacher is built from seed 0
TRAIN = TrainConfig(lr=1e-2, batch_size=8, max_steps=12, save_steps=100)
EXPERIMENT = MiniLLM(max_new_tokens=24)


def heldout_rkl(student, teacher, tokenizer, examples: list[Example]) -> float:
    """KL(student || teacher) over the full vocabulary in float64, on the reference responses'
    positions, averaged per sample and then over samples."""
    per_sample = []
    for example in examples:
        sample = tokenize_example(tokenizer, example, TEMPLATE, MAX_LENGTH, "truncate_response")
        ids = torch.tensor([sample.input_ids])
        rows = slice(sample.prompt_len - 1, len(sample.input_ids) - 1)
        with torch.no_grad():
            q = student(ids).logits[0, rows].double().log_softmax(-1)
            p = teacher(ids).logits[0, rows].double().log_softmax(-1)
        per_sample.append((q.exp() * (q - p)).sum(-1).mean().item())
    return sum(per_sample) / len(per_sample)


def test_minillm_lowers_heldout_rkl(tiny_models, codealpaca_rows, tmp_path):
    """The teacher is the tiny Llama; the student a tiny Llama from another seed, sharing its
    tokenizer, so the two start far apart (RKL about 2.5 nat/token)."""
    teacher_path, student_path = str(tiny_models["llama"]), str(tmp_path / "student")
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    build_tiny_model("llama", len(tokenizer), seed=STUDENT_SEED).save_pretrained(student_path)
    tokenizer.save_pretrained(student_path)
    examples = [Example(f"row-{i}", r["instruction"], r["input"], r["output"])
                for i, r in enumerate(codealpaca_rows)]
    train, heldout = examples[:N_TRAIN], examples[-N_HELDOUT:]
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    before = heldout_rkl(AutoModelForCausalLM.from_pretrained(student_path).eval(), teacher,
                         tokenizer, heldout)

    out = tmp_path / "minillm"
    metrics = train_minillm(student_path, ModelRef(model=teacher_path), train, TEMPLATE,
                            EXPERIMENT, TRAIN, out, "minillm")

    trained = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    after = heldout_rkl(trained, teacher, tokenizer, heldout)
    assert after < 0.9 * before, (before, after)
    assert metrics["method"] == "minillm" and metrics["steps"] == TRAIN.max_steps
    assert AutoTokenizer.from_pretrained(out / "model").get_vocab() == tokenizer.get_vocab()
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged if "loss" in e] == list(range(1, TRAIN.max_steps + 1))
    # a fresh run: this call's tokens are all TRL counted (prompt + sampled, every process)
    assert metrics["tokens"] == [e["num_tokens"] for e in logged if "num_tokens" in e][-1] > 0
    assert metrics["tokens_per_s"] == pytest.approx(metrics["tokens"] / metrics["wall_s"])


def test_a_resumed_run_counts_only_the_tokens_after_its_checkpoint(tmp_path):
    """What a checkpoint's trainer_state.json says TRL had counted is what a resume subtracts."""
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    TrainerState(global_step=4, num_input_tokens_seen=1234).save_to_json(
        str(checkpoint / "trainer_state.json"))
    assert tokens_at(str(checkpoint)) == 1234
    assert tokens_at(None) == 0
