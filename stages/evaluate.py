"""Stage `evaluate`: pass@1 on HumanEval(+) / MBPP(+) and the error taxonomy of one model.

    akd evaluate --model teacher | student | <experiment>
"""

from __future__ import annotations

from pathlib import Path

from akd_cache.config import load_params
from akd_cache.errors import ConfigError
from akd_cache.evaluation.run import evaluate_model
from akd_cache.models.resolve import resolve_model
from akd_cache.run_settings import METRICS_FILE, MODEL_DIR
from stages.common import RUNS_DIR, require_input, stage_args, write_json


def main(argv: list[str] | None = None) -> None:
    parser = stage_args(__doc__)
    parser.add_argument("--model", required=True)
    args = parser.parse_args(argv)
    params = load_params(args.params, args.profile)
    profile = params.active
    revision = None
    if args.model == "teacher":
        revision = profile.teacher.revision
        model_dir = resolve_model(profile.teacher.model, "teacher.model", revision)
        kind, method = "teacher", None
    elif args.model == "student":
        model_dir = resolve_model(profile.student.model, "student.model")
        kind, method = "student", None
    elif args.model in params.experiments:
        trained = Path(profile.train.output_root) / args.model / MODEL_DIR
        model_dir = str(require_input(trained, f"train --experiment {args.model}"))
        kind, method = "trained", params.experiments[args.model].method
    else:
        raise ConfigError(f"{args.params}: --model {args.model!r} is neither teacher, student nor "
                          f"an experiment ({', '.join(params.experiments)})")
    out = RUNS_DIR / "eval" / args.model
    out.mkdir(parents=True, exist_ok=True)
    result = evaluate_model(Path(model_dir), out, profile.eval, revision)
    write_json(out / METRICS_FILE, {"model": args.model, "kind": kind, "method": method,
                                     **result})
    scores = ", ".join(f"{name} {d['base_pass_at_1']:.3f}/{d['plus_pass_at_1']:.3f}"
                       for name, d in result["datasets"].items())
    print(f"evaluate {args.model}: pass@1 base/plus {scores}")


if __name__ == "__main__":
    main()
