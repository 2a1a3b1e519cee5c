"""Reliability: SIGKILL `akd train` at random moments, some timed to land inside checkpoint saves,
resume it through the CLI each time, and check the finished run against an uninterrupted one
(weights bit for bit, every step's loss and beta, metrics.json). Tiny models, on CPU.

    python benchmarks/kill_resume.py --kills 20 --kills-per-run 2

Each run is killed `--kills-per-run` times in a row (each restart resumes the previous kill's
state) and then resumed to its end; a kill passes when its run ends identical to the reference.
Every `--save-kill-every`-th kill is timed to a save: SIGKILL as soon as a checkpoint folder
exists without its completion marker. The others come after a random step, plus a random part of
one step's time. The result rows go into the table of docs/reliability.md (other rows are kept).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the kill harness and the tiny models live there

from kill_resume_harness import (
    REFERENCE,
    differences,
    finish_train,
    incomplete_checkpoints,
    kill_inside_a_save,
    make_workdir,
    random_kill,
    run_dir,
    start_train,
    step_seconds,
)
from tiny_models import save_tiny

DATASET = REPO.parent / "shared" / "data" / "codealpaca" / "code_alpaca_2k.json"
REPORT = REPO / "docs" / "reliability.md"
TRAIN = {"lr": 1e-3, "batch_size": 2, "max_steps": 12, "save_steps": 3}
N_TRAIN = 24
VOCAB = 512
RANDOM_FAULT = "Training killed at a random step (SIGKILL)"
SAVE_FAULT = "Training killed inside a checkpoint save (SIGKILL)"
RANDOM_INJECTION = ("SIGKILL after a random step plus a random part of one step, then "
                    "`akd train` again")
SAVE_INJECTION = ("SIGKILL as soon as a `checkpoint-N` folder exists without its completion "
                  "marker, then `akd train` again")
TABLE_HEADER = ("| Fault class | How injected | Trials | Passes | Machine | Command | Date |\n"
                "|---|---|---|---|---|---|---|\n")


@dataclass
class Kill:
    run: str
    timed_to_save: bool
    landed_in_save: bool
    passed: bool = False


def kill_once(workdir: Path, run: str, timed_to_save: bool, rng: random.Random,
              step_s: float) -> Kill | None:
    """Start the run (resuming whatever the last kill left) and kill it; None when it ended
    first."""
    out = run_dir(workdir, run)
    before = set(incomplete_checkpoints(out / "checkpoints"))
    proc = start_train(workdir, run)
    if timed_to_save:
        killed = kill_inside_a_save(proc, out / "checkpoints")
    else:
        killed = random_kill(proc, out / "log.jsonl", TRAIN["max_steps"], rng, step_s)
    if not killed:
        return None
    landed = bool(set(incomplete_checkpoints(out / "checkpoints")) - before)
    return Kill(run, timed_to_save, landed)


def table_rows(kills: list[Kill], machine: str, command: str, date: str) -> dict[str, str]:
    rows = {}
    for fault, timed, how in (
        (RANDOM_FAULT, False, RANDOM_INJECTION),
        (SAVE_FAULT, True, SAVE_INJECTION),
    ):
        trials = [k for k in kills if k.timed_to_save == timed]
        passes = sum(k.passed for k in trials)
        landed = sum(k.landed_in_save for k in trials)
        rows[fault] = (f"| {fault} | {how} ({landed} of the kills left an incomplete checkpoint) "
                       f"| {len(trials)} | {passes} | {machine} | `{command}` | {date} |\n")
    return rows


def write_rows(rows: dict[str, str]) -> None:
    """Replace this benchmark's rows in the reliability table, or add them at its end."""
    text = REPORT.read_text() if REPORT.exists() else "# Reliability\n\n" + TABLE_HEADER
    lines = text.splitlines(keepends=True)
    table = [i for i, line in enumerate(lines) if line.startswith("|")]
    for fault, row in rows.items():
        mine = [i for i in table if lines[i].startswith(f"| {fault} |")]
        if mine:
            lines[mine[0]] = row
        else:
            lines.insert(table[-1] + 1, row)
            table.append(table[-1] + 1)
    REPORT.write_text("".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--kills-per-run", type=int, default=2)
    parser.add_argument("--save-kill-every", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    runs = [f"run-{i}" for i in range(args.kills)]  # enough should every run end after one kill
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = json.loads(DATASET.read_text())
        texts = [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in rows]
        teacher = save_tiny("llama", texts, root / "llama", VOCAB)
        student = save_tiny("gpt_bigcode", texts, root / "gpt_bigcode", VOCAB)
        workdir = make_workdir(root / "work", DATASET, str(teacher), str(student), runs, TRAIN,
                               N_TRAIN)
        finish_train(workdir, REFERENCE)
        step_s = step_seconds(run_dir(workdir, REFERENCE))
        kills: list[Kill] = []
        for run in runs:
            if len(kills) == args.kills:
                break
            mine, ended = [], False
            while len(mine) < args.kills_per_run and len(kills) + len(mine) < args.kills:
                timed = (len(kills) + len(mine) + 1) % args.save_kill_every == 0
                kill = kill_once(workdir, run, timed, rng, step_s)
                if kill is None:  # the run ended before the kill: nothing left to resume
                    ended = True
                    break
                mine.append(kill)
            if not ended:
                finish_train(workdir, run)
            found = differences(run_dir(workdir, REFERENCE), run_dir(workdir, run))
            for kill in mine:
                kill.passed = not found
            kills += mine
            where = ", ".join("in a save" if k.landed_in_save else "between saves" for k in mine)
            print(f"{run}: {len(mine)} kills ({where}): "
                  f"{'identical' if not found else '; '.join(found[:3])}", flush=True)
    wall = time.perf_counter() - start
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), no GPU"
    command = "python " + shlex.join(["benchmarks/kill_resume.py", *sys.argv[1:]])
    date = datetime.date.today().isoformat()
    write_rows(table_rows(kills, machine, command, date))
    landed = sum(k.landed_in_save for k in kills)
    print(f"{len(kills)} kills, {sum(k.passed for k in kills)} passed, {landed} landed inside "
          f"a save (an incomplete checkpoint left), {wall:.0f} s")


if __name__ == "__main__":
    main()
