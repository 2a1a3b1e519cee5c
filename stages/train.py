"""Stage `train` (Stage 2): one experiment, the student against the teacher cache alone (MiniLLM:
against the teacher online).

    akd train --experiment akd
"""

from __future__ import annotations

import json
from pathlib import Path

from akd_cache.config import load_params
from akd_cache.data.instructions import read_examples
from akd_cache.models.resolve import resolve_model
from akd_cache.student.run import train_experiment
from stages.common import (
    PREPARED_DIR,
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
    experiment = params.experiments[args.experiment]
    out = Path(profile.train.output_root) / args.experiment
    if experiment.method == "minillm":
        from akd_cache.student.minillm import train_minillm  # TRL loads for MiniLLM runs only

        metrics = train_minillm(
            profile.student.model, profile.teacher, resolve_model(profile.teacher.model),
            read_examples(PREPARED_DIR / "train.jsonl"), profile.cache.template, experiment,
            profile.train, out, args.experiment,
        )
    else:
        generations = (json.loads(TEACHER_GENERATIONS_POINTER.read_text())["location"]
                       if TEACHER_GENERATIONS_POINTER.exists() else None)
        metrics = train_experiment(
            json.loads(TEACHER_CACHE_POINTER.read_text())["location"], profile.student.model,
            experiment, profile.train, out, args.experiment,
            generations=generations, cache_cfg=profile.cache,
        )
    write_json(out / "metrics.json", metrics)
    beta = "" if metrics["final_beta"] is None else f"beta {metrics['final_beta']:.3f}, "
    print(f"train {args.experiment}: {metrics['steps']} steps, loss {metrics['train_loss']:.4f}, "
          f"{beta}{metrics['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
