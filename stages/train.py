"""Stage `train` (Stage 2): one experiment, the student against the teacher cache alone.

    akd train --experiment akd
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint

from akd_cache.config import load_params
from akd_cache.store.reader import CacheDataset, TeacherCache, collate
from akd_cache.student.akd import BetaController
from akd_cache.student.setup import load_student, training_arguments
from akd_cache.student.trainer import (
    DistillationModule,
    DistillTrainer,
    load_beta_state,
    method_beta,
    peak_memory_mb,
)
from stages.common import TEACHER_CACHE_POINTER, stage_args, write_json


def main(argv: list[str] | None = None) -> None:
    parser = stage_args(__doc__)
    parser.add_argument("--experiment", required=True)
    args = parser.parse_args(argv)
    params = load_params(args.params, args.profile)
    if args.experiment not in params.experiments:
        raise SystemExit(f"{args.params}: no experiment {args.experiment!r}; "
                         f"known: {', '.join(params.experiments)}")
    experiment, profile = params.experiments[args.experiment], params.active
    out = Path(profile.train.output_root) / args.experiment

    cache = TeacherCache(json.loads(TEACHER_CACHE_POINTER.read_text())["location"])
    tokenizer = AutoTokenizer.from_pretrained(profile.student.model)
    cache.check_student(tokenizer)
    student = load_student(profile.student.model, experiment, profile.train.bf16)
    variant, beta = method_beta(experiment)
    controller = BetaController(variant, beta_init=beta, reset=experiment.beta_reset,
                                seed=profile.train.seed)
    trainer = DistillTrainer(
        model=DistillationModule(student, experiment, profile.train),
        args=training_arguments(profile.train, out / "checkpoints"),
        train_dataset=CacheDataset(cache),
        data_collator=collate,
        controller=controller,
        log_path=out / "log.jsonl",
    )
    checkpoints = out / "checkpoints"
    checkpoint = get_last_checkpoint(str(checkpoints)) if checkpoints.exists() else None
    if checkpoint:
        load_beta_state(controller, Path(checkpoint))
    else:
        (out / "log.jsonl").unlink(missing_ok=True)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    wall = time.perf_counter() - start
    student.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    history = [e for e in trainer.state.log_history if "fkl" in e]
    write_json(out / "metrics.json", {
        "experiment": args.experiment,
        "method": experiment.method,
        "cache_key": cache.key,
        "train_loss": result.training_loss,
        "final_fkl": history[-1]["fkl"] if history else None,
        "final_rkl": history[-1]["rkl"] if history else None,
        "final_beta": controller.beta,
        "steps": trainer.state.global_step,
        "wall_s": wall,
        "tokens_per_s": trainer.tokens_seen / wall,
        "peak_memory_mb": peak_memory_mb(),
    })
    print(f"train {args.experiment}: {trainer.state.global_step} steps, loss "
          f"{result.training_loss:.4f}, beta {controller.beta:.3f}, {wall:.0f} s")


if __name__ == "__main__":
    main()
