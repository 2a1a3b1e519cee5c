"""Stage `train` (Stage 2): one experiment, the student against the teacher cache alone, or for
an `online: true` experiment against the live teacher (the profile's teacher model, resolved as
Stage 1 resolves it), with the cache's tokens and order; MiniLLM (through TRL) against the live
teacher on the student's own samples of the prepared training prompts.

    akd train --experiment akd
    torchrun --nproc_per_node N -m akd_cache.cli train --experiment akd   # DDP, N processes
"""

from __future__ import annotations

from pathlib import Path

from accelerate import PartialState

from akd_cache.config import DistillationExperiment, MiniLLM, ModelRef, SeqKD, load_params
from akd_cache.data.instructions import read_examples
from akd_cache.errors import ConfigError
from akd_cache.models.resolve import resolve_model
from akd_cache.run_settings import METRICS_FILE
from akd_cache.store.reader import TeacherCache
from akd_cache.student.run import train_experiment
from akd_cache.teacher.build import check_cache_settings
from stages.common import (
    PREPARED_DIR,
    TEACHER_CACHE_POINTER,
    TEACHER_GENERATIONS_POINTER,
    read_output,
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
    if isinstance(experiment, MiniLLM) or (
        isinstance(experiment, DistillationExperiment) and experiment.online
    ):
        teacher = ModelRef(
            model=resolve_model(profile.teacher.model, "teacher.model", profile.teacher.revision),
            revision=profile.teacher.revision,
        )
    student = resolve_model(profile.student.model, "student.model")
    out = Path(profile.train.output_root) / args.experiment
    if isinstance(experiment, MiniLLM):
        from akd_cache.student.minillm import train_minillm  # TRL loads for MiniLLM runs only

        metrics = train_minillm(
            student, teacher, read_examples(require_input(PREPARED_DIR / "train.jsonl", "prepare")),
            profile.cache.template, experiment, profile.train, out, args.experiment,
        )
    else:
        pointer = read_output(TEACHER_CACHE_POINTER, "cache-teacher", ["location"])
        if not isinstance(experiment, SeqKD):
            check_cache_settings(pointer["location"],
                                 TeacherCache(pointer["location"]).ingredients, profile.teacher,
                                 profile.data, profile.cache)
        generations = (read_output(TEACHER_GENERATIONS_POINTER, "teacher-generate").get("location")
                       if TEACHER_GENERATIONS_POINTER.exists() else None)
        metrics = train_experiment(
            pointer["location"], student, experiment, profile.train, out, args.experiment,
            generations=generations, cache_cfg=profile.cache, teacher=teacher,
            cache_key=pointer["key"],
        )
    if not PartialState().is_main_process:  # under torchrun, rank 0 reports for all
        return
    write_json(out / METRICS_FILE, metrics)
    beta = "" if metrics["final_beta"] is None else f", beta {metrics['final_beta']:.3f}"
    print(f"train {args.experiment} ({metrics['teacher']} teacher): {metrics['steps']} steps, "
          f"loss {metrics['train_loss']:.4f}{beta}, {metrics['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
