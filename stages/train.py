"""Stage `train` (Stage 2): one experiment, the student against the teacher cache alone, or for
an `online: true` experiment against the live teacher (the profile's teacher model, resolved as
Stage 1 resolves it), with the cache's tokens and order.

    akd train --experiment akd
"""

from __future__ import annotations

import json
from pathlib import Path

from akd_cache.config import DistillationExperiment, ModelRef, load_params
from akd_cache.errors import ConfigError
from akd_cache.models.resolve import resolve_model
from akd_cache.student.run import train_experiment
from stages.common import (
    TEACHER_CACHE_POINTER,
    TEACHER_GENERATIONS_POINTER,
    require_input,
    stage_args,
    write_json,
)


def main(argv: list[str] | None = None) -> None:
    parser = stage_args(__doc__)
    parser.add_argument("--experiment", required=True)
    args = parser.parse_args(argv)
    params = load_params(args.params, args.profile)
    if args.experiment not in params.experiments:
        raise ConfigError(f"{args.params}: no experiment {args.experiment!r}; "
                          f"known: {', '.join(params.experiments)}")
    profile = params.active
    experiment = params.experiments[args.experiment]
    teacher = None
    if isinstance(experiment, DistillationExperiment) and experiment.online:
        teacher = ModelRef(
            model=resolve_model(profile.teacher.model, "teacher.model", profile.teacher.revision),
            revision=profile.teacher.revision,
        )
    student = resolve_model(profile.student.model, "student.model")
    require_input(TEACHER_CACHE_POINTER, "cache-teacher")
    out = Path(profile.train.output_root) / args.experiment
    generations = (json.loads(TEACHER_GENERATIONS_POINTER.read_text())["location"]
                   if TEACHER_GENERATIONS_POINTER.exists() else None)
    metrics = train_experiment(
        json.loads(TEACHER_CACHE_POINTER.read_text())["location"], student,
        experiment, profile.train, out, args.experiment,
        generations=generations, cache_cfg=profile.cache, teacher=teacher,
    )
    write_json(out / "metrics.json", metrics)
    print(f"train {args.experiment} ({metrics['teacher']} teacher): {metrics['steps']} steps, "
          f"loss {metrics['train_loss']:.4f}, beta {metrics['final_beta']:.3f}, "
          f"{metrics['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
