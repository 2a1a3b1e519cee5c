"""Stage 2 training: the loss against a naive computation, determinism, resume, resets, LoRA."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import fill_tiny_cache
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from akd_cache.config import (
    AKD,
    KD,
    RKD,
    SFT,
    CacheConfig,
    LoraSettings,
    SeqKD,
    TeacherConfig,
    TrainConfig,
)
from akd_cache.data.instructions import Example
from akd_cache.errors import CacheError, ConfigError
from akd_cache.store.reader import CacheDataset, TeacherCache, collate
from akd_cache.student.loss import CachedTailModel, topk_divergences
from akd_cache.student.run import cached_tail_model, train_experiment
from akd_cache.student.seqkd_data import SeqKDDataset
from akd_cache.student.trainer import DistillationModule, DistillTrainer

K = 16
N_SAMPLES = 8
TAIL_RANK = 16


@pytest.fixture(scope="module")
def cache_and_student(tiny_models, codealpaca_rows, tmp_path_factory):
    """A llama teacher's cache; the student is the GPTBigCode model with the same tokenizer."""
    teacher = str(tiny_models["llama"])
    location = str(tmp_path_factory.mktemp("cache") / "c")
    fill_tiny_cache(teacher, codealpaca_rows[:N_SAMPLES], CacheConfig(k=K, max_length=128),
                    location)
    return location, str(tiny_models["gpt_bigcode"])


TRAIN = TrainConfig(batch_size=4, max_steps=4, save_steps=2, lr=1e-3, chunk_size=37)


def run(cache_and_student, out, experiment, train=TRAIN, name="x"):
    location, student = cache_and_student
    return train_experiment(location, student, experiment, train, out, name)


def interrupt_at_call(monkeypatch, n: int) -> None:
    """The n-th training step from now raises KeyboardInterrupt, as a kill would stop it."""
    calls = {"n": 0}
    original = DistillTrainer.compute_loss

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DistillTrainer, "compute_loss", interrupted)


@pytest.mark.parametrize("method,beta", [("akd", 0.3), ("kd", 0.0), ("rkd", 1.0), ("sft", 0.0)])
def test_step_loss_equals_a_naive_full_vocabulary_computation(cache_and_student, method, beta):
    experiment = {"akd": AKD, "kd": KD, "rkd": RKD, "sft": SFT}[method]()
    location, student_path = cache_and_student
    cache = TeacherCache(location)
    batch = collate([cache[i] for i in range(4)])
    student = AutoModelForCausalLM.from_pretrained(student_path)
    module = DistillationModule(student, experiment, TRAIN)
    out = module(**batch, beta=torch.tensor(beta))
    logits = student(input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"]).logits.double()
    per_sample = []
    for b in range(4):
        rows = batch["loss_mask"][b]
        sample = cache[b]  # the teacher rows straight from the reader, not from collate
        div = topk_divergences(logits[b][rows], torch.from_numpy(sample.topk_ids),
                               torch.from_numpy(sample.topk_logprobs).double(),
                               torch.from_numpy(sample.tail_logmass).double(),
                               torch.ones(int(rows.sum()), dtype=torch.bool))
        ce = torch.nn.functional.cross_entropy(logits[b][rows], batch["labels"][b][rows])
        mix = beta * div.rkl.mean() + (1 - beta) * div.fkl.mean()
        per_sample.append(ce if method == "sft" else mix)
        if b == 0:
            first = div
    assert out.loss.item() == pytest.approx(torch.stack(per_sample).mean().item(), rel=2e-4)
    assert first.fkl.mean().item() > 0


def test_training_is_deterministic_and_resumes_with_beta(cache_and_student, tmp_path,
                                                         monkeypatch):
    experiment = AKD(beta=0.1)
    straight = run(cache_and_student, tmp_path / "a", experiment)
    again = run(cache_and_student, tmp_path / "b", experiment)
    weights_a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    weights_b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert all(torch.equal(weights_a[n], weights_b[n]) for n in weights_a)
    assert straight["final_beta"] == again["final_beta"] != 0.1
    assert not (tmp_path / "a" / "checkpoints").exists()  # the saved model supersedes them
    # interrupted during step 3, after the step-2 checkpoint: the re-run resumes from it
    interrupt_at_call(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run(cache_and_student, tmp_path / "c", experiment)
    monkeypatch.undo()
    assert (tmp_path / "c" / "checkpoints" / "checkpoint-2" / "beta_state.pt").exists()
    resumed = run(cache_and_student, tmp_path / "c", experiment)
    weights_r = load_file(tmp_path / "c" / "model" / "model.safetensors")
    assert all(torch.allclose(weights_a[n], weights_r[n], atol=1e-6) for n in weights_a)
    assert resumed["final_beta"] == pytest.approx(straight["final_beta"], abs=1e-9)
    assert resumed["steps"] == straight["steps"] == 4


def test_dataloader_workers_change_nothing_but_who_reads(cache_and_student, tmp_path,
                                                        monkeypatch):
    """Worker processes (forked, each with its own decoded-chunk cache) feed the same batches in
    the same order: the losses and the trained weights are identical. (The student has no
    dropout: PyTorch seeds the workers from the global RNG, which moves dropout's stream.)"""
    location, student = cache_and_student
    model = AutoModelForCausalLM.from_pretrained(student, resid_pdrop=0.0, embd_pdrop=0.0,
                                                 attn_pdrop=0.0)
    model.save_pretrained(tmp_path / "student")
    AutoTokenizer.from_pretrained(student).save_pretrained(tmp_path / "student")
    experiment = AKD(beta=0.1)
    readers = tmp_path / "reader_pids"
    original = CacheDataset.__getitem__

    def record_reader(self, index):
        with readers.open("a") as f:
            f.write(f"{os.getpid()}\n")
        return original(self, index)

    monkeypatch.setattr(CacheDataset, "__getitem__", record_reader)
    inline = train_experiment(location, str(tmp_path / "student"), experiment, TRAIN,
                              tmp_path / "a", "x")
    assert set(readers.read_text().split()) == {str(os.getpid())}
    readers.unlink()
    workers = train_experiment(location, str(tmp_path / "student"), experiment,
                               TRAIN.model_copy(update={"dataloader_workers": 2}),
                               tmp_path / "b", "x")
    assert str(os.getpid()) not in set(readers.read_text().split())  # only workers read
    weights_a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    weights_b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert all(torch.equal(weights_a[n], weights_b[n]) for n in weights_a)
    log_a, log_b = ((tmp_path / d / "log.jsonl").read_text() for d in "ab")
    assert [json.loads(x)["loss"] for x in log_a.splitlines() if "loss" in json.loads(x)] == \
        [json.loads(x)["loss"] for x in log_b.splitlines() if "loss" in json.loads(x)]
    assert inline["final_beta"] == workers["final_beta"]


def test_m3_resets_beta_at_each_epoch_start_only(cache_and_student, tmp_path):
    train = TrainConfig(batch_size=4, epochs=3, save_steps=100, lr=1e-3)
    run(cache_and_student, tmp_path, AKD(beta=0.3), train)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    used = [e["beta_used"] for e in log if "beta_used" in e]
    steps_per_epoch = N_SAMPLES // 4
    assert len(used) == 3 * steps_per_epoch
    assert used[0] == pytest.approx(0.3)
    for epoch in (1, 2):
        first = used[epoch * steps_per_epoch]
        assert min(abs(first - 0.1), abs(first - 0.6)) < 1e-6  # reset by choice
    for step in range(1, len(used)):
        if step % steps_per_epoch:  # within an epoch beta moves by about one lr, never jumps
            assert abs(used[step] - used[step - 1]) < 0.02


def test_lora_trains_only_the_adapters(cache_and_student, tmp_path):
    experiment = KD(lora=LoraSettings(rank=4))
    run(cache_and_student, tmp_path, experiment, TrainConfig(batch_size=4, max_steps=2, lr=1e-2))
    adapter = load_file(tmp_path / "model" / "adapter_model.safetensors")
    assert adapter and all("lora" in name for name in adapter)
    assert any(t.abs().sum() > 0 for n, t in adapter.items() if "lora_B" in n)


def test_lora_targets_that_name_no_module_are_one_line(tiny_models):
    from akd_cache.student.setup import load_student

    student = str(tiny_models["llama"])
    with pytest.raises(ConfigError) as err:
        load_student(student, KD(lora=LoraSettings(targets=["nope"])))
    assert str(err.value) == (f"lora.targets ['nope']: no module of {student} has any of these "
                              "names; name its attention or MLP projections")


def test_a_student_with_another_tokenizer_is_refused(cache_and_student, tmp_path, codealpaca_rows):
    from tiny_models import save_tiny

    from akd_cache.store.reader import CacheError

    other = save_tiny("llama", [r["output"] for r in codealpaca_rows[:200]], tmp_path / "m", 300)
    with pytest.raises(CacheError, match="tokenizer"):
        train_experiment(cache_and_student[0], str(other), KD(), TRAIN,
                         tmp_path / "out", "x")


def test_checkpoints_of_other_settings_are_never_resumed(cache_and_student, tmp_path,
                                                          monkeypatch):
    """A run interrupted after its step-2 checkpoint, then run again at another lr: it starts
    over, and ends exactly where a fresh run at that lr ends."""
    interrupt_at_call(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run(cache_and_student, tmp_path / "run", KD())
    monkeypatch.undo()
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-2").exists()
    changed = TrainConfig(batch_size=4, max_steps=4, save_steps=2, lr=5e-4, chunk_size=37)
    second = run(cache_and_student, tmp_path / "run", KD(), changed)
    fresh = run(cache_and_student, tmp_path / "fresh", KD(), changed)
    assert second["steps"] == 4 and second["train_loss"] == fresh["train_loss"]
    got = load_file(tmp_path / "run" / "model" / "model.safetensors")
    want = load_file(tmp_path / "fresh" / "model" / "model.safetensors")
    assert all(torch.equal(got[n], want[n]) for n in want)
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len([line for line in log if '"fkl"' in line]) == 4  # the old run's log is gone


@pytest.fixture(scope="module")
def generations(tiny_models, codealpaca_rows, tmp_path_factory) -> Path:
    """The llama teacher's responses to 4 prompts: a SeqKD generations folder."""
    from akd_cache.teacher.generate import (
        generate_responses,
        generator_factory,
        make_generation_ingredients,
    )

    teacher = str(tiny_models["llama"])
    examples = seqkd_examples(codealpaca_rows)
    ingredients = make_generation_ingredients(
        teacher=TeacherConfig(model=teacher), teacher_path=teacher,
        tokenizer=AutoTokenizer.from_pretrained(teacher), examples=examples, template="alpaca",
        max_new_tokens=12,
    )
    location = tmp_path_factory.mktemp("seqkd") / "generations"
    generate_responses(location, examples, ingredients,
                       generator_factory(TeacherConfig(model=teacher), teacher, 4))
    return location


def seqkd_examples(codealpaca_rows) -> list[Example]:
    return [Example(f"row-{i}", r["instruction"], r["input"], r["output"])
            for i, r in enumerate(codealpaca_rows[:4])]


def test_seqkd_trains_on_the_teachers_generated_responses(generations, cache_and_student,
                                                          tmp_path):
    location = generations
    metrics = train_experiment(
        cache_and_student[0], cache_and_student[1], SeqKD(),
        TrainConfig(batch_size=2, max_steps=2, lr=1e-3), tmp_path / "out", "seqkd",
        generations=str(location), cache_cfg=CacheConfig(max_length=128),
    )
    assert metrics["steps"] == 2 and metrics["cache_key"] == location.name
    assert metrics["train_loss"] > 0
    with pytest.raises(ValueError, match="needs the teacher's generations"):
        train_experiment(cache_and_student[0], cache_and_student[1], SeqKD(),
                         TRAIN, tmp_path / "out2", "seqkd")


def test_seqkd_checkpoints_of_another_tokenization_are_never_resumed(
        generations, cache_and_student, tmp_path, monkeypatch):
    """SeqKD tokenises the generations itself, under cache.max_length and cache.truncation,
    which the generations' key does not cover: a run interrupted after a checkpoint resumes it
    under the same settings only."""
    train = TrainConfig(batch_size=2, max_steps=2, save_steps=1, lr=1e-3)
    checkpoint = tmp_path / "checkpoints" / "checkpoint-1"

    def interrupted_run(cache: CacheConfig, at_call: int) -> None:
        interrupt_at_call(monkeypatch, at_call)
        with pytest.raises(KeyboardInterrupt):
            train_experiment(*cache_and_student, SeqKD(), train, tmp_path, "seqkd",
                             generations=str(generations), cache_cfg=cache)
        monkeypatch.undo()

    interrupted_run(CacheConfig(max_length=128), at_call=2)
    assert checkpoint.exists()
    interrupted_run(CacheConfig(max_length=128), at_call=1)  # resumed: step 2 is its first
    assert checkpoint.exists()
    interrupted_run(CacheConfig(max_length=256), at_call=1)
    assert not checkpoint.exists()
    interrupted_run(CacheConfig(max_length=256), at_call=2)
    assert checkpoint.exists()
    interrupted_run(CacheConfig(max_length=256, truncation="drop"), at_call=1)
    assert not checkpoint.exists()


def test_only_the_main_process_discards_a_changed_runs_checkpoints(cache_and_student, tmp_path,
                                                                   monkeypatch):
    """Under torchrun every rank runs `train_experiment`; rank 0 alone removes what a run with
    other settings left, the others wait for it."""
    stale = tmp_path / "checkpoints" / "checkpoint-2"
    (tmp_path / "run_settings.json").write_text("{}")  # another run's settings

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DistillTrainer, "train", interrupted)
    for main in (False, True):
        stale.mkdir(parents=True, exist_ok=True)
        monkeypatch.setattr(TrainingArguments, "process_index",
                            property(lambda self, main=main: 0 if main else 1))
        with pytest.raises(KeyboardInterrupt):
            run(cache_and_student, tmp_path, KD())
        assert stale.exists() != main


@pytest.mark.parametrize("mode", ["shape", "lowrank"])
def test_sft_and_seqkd_train_whatever_the_profiles_tail_mode(cache_and_student, codealpaca_rows,
                                                             mode):
    """train.tail_mode 'shape' or 'lowrank' is for distillation: sft and seqkd get no tail model,
    and their step is the one of the default tail mode (cross-entropy, FKL/RKL logged)."""
    location, student_path = cache_and_student
    train = TRAIN.model_copy(update={"tail_mode": mode})
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    seqkd = SeqKDDataset(seqkd_examples(codealpaca_rows), tokenizer, CacheConfig(max_length=128))
    student = AutoModelForCausalLM.from_pretrained(student_path)
    for experiment, dataset in ((SFT(), CacheDataset(TeacherCache(location))), (SeqKD(), seqkd)):
        batch = collate([dataset[i] for i in range(2)])
        module = DistillationModule(student, experiment, train,
                                    tail_model=cached_tail_model(experiment, train, dataset))
        out = module(**batch, beta=torch.tensor(0.0))
        out.loss.backward()
        want = DistillationModule(student, experiment, TRAIN)(**batch, beta=torch.tensor(0.0))
        assert [out.loss.item(), out.fkl.item()] == [want.loss.item(), want.fkl.item()]
        assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
        student.zero_grad()


TAIL_MODELS = {"shape": {"tail_shape": True}, "lowrank": {"tail_rank": TAIL_RANK}}


@pytest.fixture(scope="module", params=list(TAIL_MODELS))
def modelled_cache(request, tiny_models, codealpaca_rows, tmp_path_factory):
    """(mode, a cache that stores what that tail mode reads)."""
    mode = request.param
    location = str(tmp_path_factory.mktemp(mode) / "c")
    fill_tiny_cache(str(tiny_models["llama"]), codealpaca_rows[:N_SAMPLES],
                    CacheConfig(k=K, max_length=128, **TAIL_MODELS[mode]), location)
    return mode, location


def test_a_modelled_tail_mode_trains_against_the_caches_dense_distribution(
        modelled_cache, cache_and_student, tmp_path):
    """The module's loss on a batch equals the AKD objective against
    `reader.dense_logprobs(i, mode)`, and a run trains; on a cache without what the mode reads
    the run is refused before it starts."""
    mode, location = modelled_cache
    _, student_path = cache_and_student
    cache = TeacherCache(location)
    batch = collate([cache[i] for i in range(4)])
    student = AutoModelForCausalLM.from_pretrained(student_path).eval()
    tail_model = (CachedTailModel(log_tail_shape=torch.from_numpy(cache.log_tail_shape))
                  if mode == "shape" else
                  CachedTailModel(tail_code_basis=(torch.from_numpy(cache.tail_code.basis),
                                                   torch.from_numpy(cache.tail_code.bias))))
    module = DistillationModule(student, KD(tail_mode=mode), TRAIN, tail_model=tail_model)
    beta = 0.5
    out = module(**batch, beta=torch.tensor(beta))
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).logits.double()
    want = []
    for b in range(4):
        log_q = logits[b][batch["loss_mask"][b]].log_softmax(-1)
        log_p = torch.from_numpy(cache.dense_logprobs(b, mode)).double()
        fkl = (log_p.exp() * (log_p - log_q)).sum(-1)
        rkl = (log_q.exp() * (log_q - log_p)).sum(-1)
        want.append(((1 - beta) * fkl + beta * rkl).mean())
    assert out.loss.item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-4)

    metrics = train_experiment(location, student_path, KD(tail_mode=mode), TRAIN,
                               tmp_path / mode, "x")
    assert metrics["steps"] == TRAIN.max_steps
    with pytest.raises(CacheError, match="this cache has none"):
        run(cache_and_student, tmp_path / "none", KD(tail_mode=mode))


def test_beta_steps_once_per_optimizer_step_on_its_micro_batches_means(cache_and_student,
                                                                       tmp_path):
    """With gradient accumulation, beta's one step per training step (docs/method.md §4) uses
    the means over that step's micro-batches: replayed from the logged means, beta matches."""
    from akd_cache.student.akd import BetaController

    train = TrainConfig(batch_size=2, grad_accum=2, epochs=1, save_steps=100, lr=1e-3)
    result = run(cache_and_student, tmp_path, AKD(beta=0.3), train)
    steps = N_SAMPLES // (2 * 2)
    assert result["steps"] == steps
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    entries = [e for e in log if "fkl" in e]
    assert len(entries) == steps
    replay = BetaController(beta_init=0.3)
    replay.start_epoch(0)
    for entry in entries:
        assert entry["beta_used"] == pytest.approx(replay.beta, abs=1e-7)
        replay.step(torch.tensor(entry["fkl"]), torch.tensor(entry["rkl"]))
        assert entry["beta"] == pytest.approx(replay.beta, abs=1e-6)
