"""Training resumes after a SIGKILL anywhere, inside a checkpoint save included, to the run an
uninterrupted `akd train` makes: the same weights bit for bit, the same per-step loss and beta,
the same train_loss in metrics.json."""

from __future__ import annotations

import json
import logging
import random
import shutil

import pytest
import torch
from kill_resume_harness import (
    REFERENCE,
    differences,
    finish_train,
    kill_after_step,
    kill_inside_a_save,
    leave_incomplete_checkpoint,
    make_workdir,
    random_kill,
    replace_with_incomplete,
    run_dir,
    start_train,
    step_seconds,
)
from safetensors.torch import load_file
from test_trainer import cache_and_student, interrupt_at_call  # noqa: F401 (a fixture)

from akd_cache.config import AKD, TrainConfig
from akd_cache.run_settings import METRICS_FILE, MODEL_DIR
from akd_cache.run_settings import log as run_settings_log
from akd_cache.student.checkpoints import (
    COMPLETE_MARKER,
    checkpoint_folder,
    checkpoint_folders,
    last_complete_checkpoint,
    rotate_checkpoints,
)
from akd_cache.student.run import train_experiment
from akd_cache.student.trainer import DistillTrainer, mean_step_loss

MAX_STEPS = 8
SAVE_STEPS = 2
TRAIN = {"lr": 1e-3, "batch_size": 2, "max_steps": MAX_STEPS, "save_steps": SAVE_STEPS}
N_TRAIN = 16
SEED = 9
TIMINGS = {"tokens_per_s", "peak_memory_mb", "train_runtime", "train_samples_per_second",
           "train_steps_per_second"}
RUN_SETTINGS_LOG = run_settings_log.name


def removals(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What `discard_if_changed` announced (other loggers, the Trainer's, are left out)."""
    return [r.getMessage() for r in caplog.records if r.name == RUN_SETTINGS_LOG]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, codealpaca_path, tiny_models):
    """A tiny cache, and the uninterrupted reference run of `akd train`."""
    workdir = make_workdir(
        tmp_path_factory.mktemp("resume"), codealpaca_path, str(tiny_models["llama"]),
        str(tiny_models["gpt_bigcode"]), ["fresh", "handmade", "killed"], TRAIN, N_TRAIN,
    )
    finish_train(workdir, REFERENCE)
    return workdir


def test_a_kill_inside_the_first_save_does_not_strand_the_run(workdir, tiny_models):
    # the exact state a kill inside the Trainer's first save leaves: config.json and a temp file
    out = run_dir(workdir, "fresh")
    out.mkdir(parents=True)
    (out / "run_settings.json").write_text(
        (run_dir(workdir, REFERENCE) / "run_settings.json").read_text())
    leave_incomplete_checkpoint(checkpoint_folder(out / "checkpoints", SAVE_STEPS),
                                tiny_models["gpt_bigcode"] / "config.json")
    finish_train(workdir, "fresh")  # today: FileNotFoundError on beta_state.pt, every restart
    assert differences(run_dir(workdir, REFERENCE), out) == []


def test_resume_takes_the_last_complete_checkpoint(workdir, tiny_models):
    out = run_dir(workdir, "handmade")
    checkpoints = out / "checkpoints"
    proc = start_train(workdir, "handmade")
    # killed once step 4 is logged, just before its save: checkpoint-2 is complete
    assert kill_after_step(proc, out / "log.jsonl", 2 * SAVE_STEPS, 0.0)
    assert (checkpoint_folder(checkpoints, SAVE_STEPS) / COMPLETE_MARKER).exists()
    for step, folder in checkpoint_folders(checkpoints).items():
        if step > 2 * SAVE_STEPS:
            shutil.rmtree(folder)
    # the state a kill inside the save of checkpoint-4 leaves
    replace_with_incomplete(checkpoints, 2 * SAVE_STEPS, tiny_models["gpt_bigcode"] / "config.json")
    assert last_complete_checkpoint(checkpoints) == checkpoint_folder(checkpoints, SAVE_STEPS)
    finish_train(workdir, "handmade")
    assert differences(run_dir(workdir, REFERENCE), out) == []


def test_random_kills_and_kills_inside_saves_resume_to_the_uninterrupted_run(workdir):
    out = run_dir(workdir, "killed")
    rng = random.Random(SEED)
    step_s = step_seconds(run_dir(workdir, REFERENCE))
    proc = start_train(workdir, "killed")
    # tiny models save in milliseconds: the kill may land just after the save completes
    assert kill_inside_a_save(proc, out / "checkpoints"), "the run ended before the kill"
    proc = start_train(workdir, "killed")
    random_kill(proc, out / "log.jsonl", MAX_STEPS, rng, step_s)
    finish_train(workdir, "killed")
    assert differences(run_dir(workdir, REFERENCE), out) == []


def test_train_loss_and_logs_after_a_resume_with_sparse_logging(
    cache_and_student, tmp_path, monkeypatch,  # noqa: F811 (the fixture imported above)
):
    """logging_steps 2 and save_steps 3 do not line up: every save step is logged too, so a run
    resumed from checkpoint-3 logs the entries of one never stopped."""
    train = TrainConfig(batch_size=2, max_steps=8, save_steps=3, logging_steps=2, lr=1e-3,
                        chunk_size=37)
    location, student = cache_and_student
    straight = train_experiment(location, student, AKD(beta=0.1), train, tmp_path / "a", "a")
    interrupt_at_call(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        train_experiment(location, student, AKD(beta=0.1), train, tmp_path / "b", "b")
    monkeypatch.undo()
    resumed = train_experiment(location, student, AKD(beta=0.1), train, tmp_path / "b", "b")
    for key in ("train_loss", "final_beta", "final_fkl", "steps"):
        assert resumed[key] == straight[key], key
    logs = [[{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
             for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("a", "b")]
    assert [e["step"] for e in logs[0] if "loss" in e] == [2, 3, 4, 6, 8]
    assert logs[1] == logs[0]  # step 4, logged before the crash, is logged once
    weights = [load_file(tmp_path / run / "model" / "model.safetensors") for run in ("a", "b")]
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_a_run_resumes_across_settings_that_leave_its_weights(
    cache_and_student, tmp_path, monkeypatch, caplog,  # noqa: F811 (the fixture imported above)
):
    """When it saves and logs and where runs are kept change no weight: an interrupted run
    resumes across them to the weights of one never stopped. Another learning rate does: the
    run's checkpoints and log go, and the log line says why."""
    train = TrainConfig(batch_size=2, max_steps=6, save_steps=2, lr=1e-3, chunk_size=37)
    location, student = cache_and_student

    def run(out, train):
        return train_experiment(location, student, AKD(beta=0.1), train, out, "x")

    run(tmp_path / "a", train)
    interrupt_at_call(monkeypatch, 2 * SAVE_STEPS)  # checkpoint-2 complete, step 4 not
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", train)
    monkeypatch.undo()
    steps = []
    original = DistillTrainer.compute_loss
    monkeypatch.setattr(DistillTrainer, "compute_loss",
                        lambda self, *a, **kw: steps.append(1) or original(self, *a, **kw))
    neutral = train.model_copy(update={"save_steps": 3, "logging_steps": 2,
                                       "output_root": "elsewhere"})
    with caplog.at_level(logging.WARNING, logger=RUN_SETTINGS_LOG):
        run(tmp_path / "b", neutral)
    monkeypatch.undo()
    assert len(steps) == train.max_steps - SAVE_STEPS and not removals(caplog)
    weights = [load_file(tmp_path / r / MODEL_DIR / "model.safetensors") for r in ("a", "b")]
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
    out = tmp_path / "c"
    interrupt_at_call(monkeypatch, 2 * SAVE_STEPS)
    with pytest.raises(KeyboardInterrupt):
        run(out, train)
    interrupt_at_call(monkeypatch, 1)
    with caplog.at_level(logging.WARNING, logger=RUN_SETTINGS_LOG), \
            pytest.raises(KeyboardInterrupt):
        run(out, train.model_copy(update={"lr": 2e-3}))
    assert checkpoint_folders(out / "checkpoints") == {}
    assert removals(caplog) == [
        f"{out}: made under other settings (train.lr changed); removing checkpoints, log.jsonl"]
    # a finished run's model and metrics (`akd train` writes them beside it) go too, so a failed
    # run under new settings never leaves the old result looking like its own
    out = tmp_path / "b"
    (out / METRICS_FILE).write_text("{}")
    caplog.clear()
    monkeypatch.undo()
    interrupt_at_call(monkeypatch, 1)
    with caplog.at_level(logging.WARNING, logger=RUN_SETTINGS_LOG), \
            pytest.raises(KeyboardInterrupt):
        run(out, train.model_copy(update={"lr": 2e-3}))
    assert not (out / MODEL_DIR).exists() and not (out / METRICS_FILE).exists()
    assert removals(caplog) == [(f"{out}: made under other settings (train.lr changed); "
                                 f"removing log.jsonl, {METRICS_FILE}, {MODEL_DIR}")]


def test_train_loss_weighs_each_logged_loss_by_the_steps_it_covers():
    per_step = [4.0, 2.0, 1.0, 3.0, 5.0]
    # logs at steps 2, 3 and 5: each the mean over the steps since the previous log
    history = [{"step": 2, "loss": 3.0}, {"step": 3, "loss": 1.0}, {"step": 5, "loss": 4.0},
               {"step": 5, "train_runtime": 1.0, "train_loss": 9.9}]
    assert mean_step_loss(history) == pytest.approx(sum(per_step) / len(per_step))


def test_rotation_keeps_the_last_complete_checkpoints_only(tmp_path):
    for step in (2, 4, 6, 8):
        folder = checkpoint_folder(tmp_path, step)
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
        if step != 6:  # checkpoint-6: a killed save's leftover
            (folder / COMPLETE_MARKER).write_text(json.dumps({"step": step}))
    (checkpoint_folder(tmp_path, 2) / "touched").write_text("newest by mtime")
    rotate_checkpoints(tmp_path, keep=2)
    assert sorted(checkpoint_folders(tmp_path)) == [4, 8]
    assert last_complete_checkpoint(tmp_path) == checkpoint_folder(tmp_path, 8)
