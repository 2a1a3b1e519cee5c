"""Kill `akd train` as a user's machine would (SIGKILL, at a random step or inside a checkpoint
save) and compare the resumed run with an uninterrupted one: shared by tests/test_train_resume.py
and benchmarks/kill_resume.py.

A workdir holds a params.yaml with tiny models and a tiny teacher cache, and several experiments
with identical settings: one is the uninterrupted reference, the others are killed and resumed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import chdir
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from akd_cache.cli import main
from akd_cache.student.checkpoints import COMPLETE_MARKER, checkpoint_folder, checkpoint_folders

REPO = Path(__file__).resolve().parents[1]
REFERENCE = "reference"
POLL_S = 0.0005
RUN_TIMEOUT_S = 600
COMPARED_LOG_KEYS = ("loss", "beta_used", "beta", "fkl", "rkl", "grad_norm")
COMPARED_METRICS = ("train_loss", "final_beta", "final_fkl", "final_rkl", "steps")


def make_workdir(workdir: Path, dataset: Path, teacher: str, student: str, experiments: list[str],
                 train: dict, n_train: int) -> Path:
    """params.yaml with `experiments` (all the same akd run) and the teacher cache, built
    in-process through `akd prepare` and `akd cache-teacher`."""
    doc = {"profile": "tiny", "profiles": {"tiny": {
        "data": {"dataset": str(dataset), "heldout": 2, "max_train_samples": n_train},
        "teacher": {"model": teacher},
        "student": {"model": student},
        "cache": {"k": 8, "shard_tokens": 1024, "root": str(workdir / "cache")},
        "train": train,
    }}, "experiments": {name: {"method": "akd"} for name in [REFERENCE, *experiments]}}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump(doc))
    with chdir(workdir):
        main(["prepare"])
        main(["cache-teacher"])
    return workdir


def run_dir(workdir: Path, experiment: str) -> Path:
    return workdir / "runs" / "train" / experiment


def step_seconds(finished_run: Path) -> float:
    """A finished run's training time per step, saves included."""
    metrics = json.loads((finished_run / "metrics.json").read_text())
    return metrics["wall_s"] / metrics["steps"]


def start_train(workdir: Path, experiment: str) -> subprocess.Popen:
    """`akd train --experiment X` as a user starts it, in its own process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("AKD_DEBUG", None)
    err = open(workdir / f"{experiment}.stderr", "ab")  # noqa: SIM115 (the child owns it)
    return subprocess.Popen([sys.executable, "-m", "akd_cache.cli", "train", "--experiment",
                             experiment], cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                            stderr=err)


def finish_train(workdir: Path, experiment: str) -> None:
    """Run `akd train` to its end; fail with its stderr when it does not exit 0."""
    proc = start_train(workdir, experiment)
    if proc.wait(timeout=RUN_TIMEOUT_S) != 0:
        stderr = (workdir / f"{experiment}.stderr").read_text()
        raise AssertionError(f"akd train --experiment {experiment} exited {proc.returncode}:\n"
                             f"{stderr[-3000:]}")


def incomplete_checkpoints(checkpoints: Path) -> list[int]:
    """Read while the run writes: the folder may vanish under the listing (a finished run
    removes its checkpoints), which then lists none."""
    try:
        return sorted(step for step, folder in checkpoint_folders(checkpoints).items()
                      if not (folder / COMPLETE_MARKER).exists())
    except FileNotFoundError:
        return []


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=RUN_TIMEOUT_S)


def kill_inside_a_save(proc: subprocess.Popen, checkpoints: Path) -> bool:
    """SIGKILL as soon as a save starts: a checkpoint folder without its completion marker,
    other than the leftovers of earlier kills. False when the run ended first."""
    leftovers = set(incomplete_checkpoints(checkpoints))
    while proc.poll() is None:
        if set(incomplete_checkpoints(checkpoints)) - leftovers:
            _kill(proc)
            return True
        time.sleep(POLL_S)
    return False


def logged_steps(log: Path) -> int:
    if not log.exists():
        return 0
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()
             if line.endswith("}")]
    return max(steps, default=0)


def kill_after_step(proc: subprocess.Popen, log: Path, step: int, delay_s: float) -> bool:
    """SIGKILL `delay_s` after the log first shows `step`; False when the run ended first."""
    while proc.poll() is None and logged_steps(log) < step:
        time.sleep(POLL_S)
    time.sleep(delay_s)
    if proc.poll() is not None:
        return False
    _kill(proc)
    return True


def random_kill(proc: subprocess.Popen, log: Path, max_steps: int, rng: random.Random,
                step_s: float) -> bool:
    """A kill at a random moment of training: after a random step not reached before (the log
    still shows the killed run's steps until the resumed run starts), plus up to one step's
    time. False when the run ended first (left to end when no step is left to pick)."""
    first = logged_steps(log) + 1
    if first >= max_steps:
        proc.wait(timeout=RUN_TIMEOUT_S)
        return False
    return kill_after_step(proc, log, rng.randint(first, max_steps - 1), rng.uniform(0, step_s))


def leave_incomplete_checkpoint(folder: Path, config: Path) -> None:
    """What a kill inside the Trainer's save leaves: config.json and a temp file only."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_bytes(config.read_bytes())
    (folder / "tmp3f9a1c2e").write_bytes(b"\0" * 1024)


def replace_with_incomplete(checkpoints: Path, step: int, config: Path) -> None:
    folder = checkpoint_folder(checkpoints, step)
    shutil.rmtree(folder, ignore_errors=True)
    leave_incomplete_checkpoint(folder, config)


def _step_entries(log: Path) -> list[dict]:
    return [e for e in map(json.loads, log.read_text().splitlines()) if "loss" in e]


def differences(reference: Path, run: Path) -> list[str]:
    """How a finished run differs from the reference: weights bit for bit, every logged step's
    loss and beta, metrics.json; each step logged exactly once; no checkpoints left."""
    found = []
    want = load_file(reference / "model" / "model.safetensors")
    got = load_file(run / "model" / "model.safetensors")
    if want.keys() != got.keys():
        found.append("weights: other tensor names")
    found += [f"weights: {name} differs" for name in want
              if name in got and not torch.equal(want[name], got[name])]
    want_log, got_log = _step_entries(reference / "log.jsonl"), _step_entries(run / "log.jsonl")
    if [e["step"] for e in got_log] != [e["step"] for e in want_log]:
        found.append(f"log steps: {[e['step'] for e in got_log]}")
    for w, g in zip(want_log, got_log, strict=False):
        found += [f"log step {w['step']}: {key} {g[key]} != {w[key]}"
                  for key in COMPARED_LOG_KEYS if g[key] != w[key]]
    want_m = json.loads((reference / "metrics.json").read_text())
    got_m = json.loads((run / "metrics.json").read_text())
    found += [f"metrics: {key} {got_m[key]} != {want_m[key]}"
              for key in COMPARED_METRICS if got_m[key] != want_m[key]]
    if (run / "checkpoints").exists():
        found.append("checkpoints left behind")
    return found
