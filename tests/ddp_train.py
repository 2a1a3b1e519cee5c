"""Run under `torchrun --nproc_per_node 2` by tests/test_torchrun.py: one AKD run straight
through, and one interrupted during step 3 (after the step-2 checkpoint) and resumed, recording
each rank's beta at every step.

    torchrun --nproc_per_node 2 tests/ddp_train.py CACHE STUDENT OUT PER_DEVICE_BATCH
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from akd_cache.config import AKD, TrainConfig
from akd_cache.student.akd import BetaController
from akd_cache.student.run import train_experiment
from akd_cache.student.trainer import DistillTrainer

STEPS = 4
INTERRUPTED_AT = 3


class Interrupted(Exception):
    pass


def main() -> None:
    cache, student, out, batch = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    rank = int(os.environ["RANK"])
    train = TrainConfig(batch_size=batch, max_steps=STEPS, save_steps=2, lr=1e-3, chunk_size=37)
    betas = out / f"beta-rank{rank}.jsonl"
    step = BetaController.step

    def recording(self, fkl, rkl):
        step(self, fkl, rkl)
        with open(betas, "a") as f:
            f.write(json.dumps({"fkl": float(fkl), "rkl": float(rkl), "beta": self.beta}) + "\n")

    BetaController.step = recording
    out.mkdir(parents=True, exist_ok=True)
    metrics = train_experiment(cache, student, AKD(beta=0.1), train, out / "straight", "akd")
    if rank == 0:
        (out / "straight.json").write_text(json.dumps(metrics))
    BetaController.step = step
    compute_loss, calls = DistillTrainer.compute_loss, {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == INTERRUPTED_AT:
            raise Interrupted
        return compute_loss(self, *args, **kwargs)

    DistillTrainer.compute_loss = interrupted
    try:
        train_experiment(cache, student, AKD(beta=0.1), train, out / "resumed", "akd")
    except Interrupted:
        torch.distributed.barrier()  # a restart begins once every rank (rank 0 saving) is down
    DistillTrainer.compute_loss = compute_loss
    if rank == 0:
        assert (out / "resumed" / "checkpoints" / "checkpoint-2").exists()
    metrics = train_experiment(cache, student, AKD(beta=0.1), train, out / "resumed", "akd")
    if rank == 0:
        (out / "resumed.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    main()
