"""Stage `train` (Stage 2): one experiment, the student against the teacher cache alone, or for
an `online: true` experiment against the live teacher (the profile's teacher model, resolved as
Stage 1 resolves it), with the cache's tokens and order.

    akd train --experiment akd
"""

from __future__ import annotations

import json
from pathlib import Path

from akd_cache.config import ModelRef, load_params
from akd_cache.models.resolve import resolve_model
from akd_cache.student.run import train_experiment
from stages.common import (
    TEACHER_CACHE_POINTER,
    TEACHER_GENERATIONS_POINTER,
    stage_args,
    write_json,
)


def main(argv: list[str] | None = None) -> None:
    parser = stage_args(__doc__)
    parser.add_argument("--experiment", required=True)
    args = parser.parse_args(argv)
    params = load_params(args.params, args.profile)
    if args.experiment not in params.experiments:
        raise SystemExit(f"{args.params}: no experiment {args.experiment!r}; "
                         f"known: {', '.join(params.experiments)}")
    profile = params.active
    out = Path(profile.train.output_root) / args.experiment
    generations = (json.loads(TEACHER_GENERATIONS_POINTER.read_text())["location"]
                   if TEACHER_GENERATIONS_POINTER.exists() else None)
    metrics = train_experiment(
        json.loads(TEACHER_CACHE_POINTER.read_text())["location"], profile.student.model,
        params.experiments[args.experiment], profile.train, out, args.experiment,
        generations=generations, cache_cfg=profile.cache,
        teacher=ModelRef(model=resolve_model(profile.teacher.model),
                         revision=profile.teacher.revision),
    )
    write_json(out / "metrics.json", metrics)
    print(f"train {args.experiment} ({metrics['teacher']} teacher): {metrics['steps']} steps, "
          f"loss {metrics['train_loss']:.4f}, beta {metrics['final_beta']:.3f}, "
          f"{metrics['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
