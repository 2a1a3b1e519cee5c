"""Stage `fidelity`: how close each student is to the teacher on the held-out split.

    akd fidelity                                  # the untrained student and every experiment
    akd fidelity --model kd --model path/to/model # some of them, or any model folder
    akd fidelity --no-teacher                     # the held-out cache's view only

Each model gets `runs/fidelity/<name>.json`: exact full-vocabulary FKL and RKL against the live
teacher (loaded for this evaluation only), the held-out cache's view of the same in each tail mode
it supports (bucket and uniform; shape and lowrank when it stores them), the NLL of the reference
responses, top-1 agreement and the student's mass outside the teacher's top-k, each a mean over
samples with a bootstrap 95% interval. One model at a time is on `fidelity.device` (the teacher
first, then each student), so the paper's 7B teacher and its 1B students need one card's worth of
one of them, not of all.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from akd_cache.config import Params, TeacherConfig, load_params
from akd_cache.devices import require_device
from akd_cache.errors import ConfigError
from akd_cache.evaluation.fidelity import per_sample_fidelity, summarise
from akd_cache.models.resolve import resolve_model
from akd_cache.run_settings import MODEL_DIR
from akd_cache.store.reader import TeacherCache
from akd_cache.student.setup import load_frozen_teacher
from akd_cache.teacher.build import check_cache_settings
from akd_cache.teacher.hf_backend import DTYPES
from stages.common import (
    FIDELITY_DIR,
    HELDOUT_CACHE_POINTER,
    read_output,
    require_input,
    stage_args,
    write_json,
)

UNTRAINED = "student"


def model_paths(params: Params, names: list[str] | None) -> dict[str, str]:
    """Name -> folder: `student` is the untrained student, an experiment name its trained model,
    anything else a model folder (named after it)."""
    profile = params.active
    names = names or [UNTRAINED, *params.experiments]
    paths = {}
    for name in names:
        if name == UNTRAINED:
            paths[name] = resolve_model(profile.student.model, "student.model")
        elif name in params.experiments:
            folder = Path(profile.train.output_root) / name / MODEL_DIR
            paths[name] = str(require_input(folder, f"train --experiment {name}"))
        elif Path(name).is_dir():
            folder = Path(name)
            paths[folder.parent.name if folder.name == MODEL_DIR else folder.name] = name
        else:
            raise ConfigError(f"--model {name!r}: neither `{UNTRAINED}`, an experiment of "
                              f"params.yaml, nor a model folder")
    return paths


def load(path: str, device: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


def load_teacher(teacher: TeacherConfig, device: str) -> torch.nn.Module:
    path = resolve_model(teacher.model, "teacher.model", teacher.revision)
    return load_frozen_teacher(teacher.model_copy(update={"model": path}),
                               DTYPES[teacher.dtype]).to(device)


def main(argv: list[str] | None = None) -> None:
    parser = stage_args(__doc__)
    parser.add_argument("--model", action="append", help="repeatable; default: all")
    parser.add_argument("--no-teacher", action="store_true", help="the cache's view only")
    args = parser.parse_args(argv)
    params = load_params(args.params, args.profile)
    profile = params.active
    paths = model_paths(params, args.model)
    pointer = read_output(HELDOUT_CACHE_POINTER, "cache-teacher --split heldout", ["location"])
    cache = TeacherCache(pointer["location"])
    settings = profile.fidelity
    require_device(settings.device, "fidelity.device")
    check_cache_settings(pointer["location"], cache.ingredients, profile.teacher, profile.data,
                         profile.cache)
    teacher = None if args.no_teacher else partial(load_teacher, profile.teacher, settings.device)
    per_sample = per_sample_fidelity(
        {name: partial(load, path, settings.device) for name, path in paths.items()}, cache,
        teacher, temperature=profile.train.temperature, batch_size=settings.batch_size,
        chunk_positions=settings.chunk_positions, device=settings.device,
    )
    for name, values in per_sample.items():
        summary = summarise(values, settings.bootstrap_seed)
        write_json(FIDELITY_DIR / f"{name}.json", {
            "model": name,
            "path": paths[name],
            "teacher": "live" if teacher is not None else "none",
            "cache_key": cache.key,
            "temperature": profile.train.temperature,
            "n_samples": len(cache),
            "metrics": {metric: asdict(s) for metric, s in summary.items()},
        })
        line = ", ".join(f"{m} {summary[m].mean:.3f}" for m in ("fkl", "rkl", "nll")
                         if m in summary)
        print(f"fidelity {name}: {line}")


if __name__ == "__main__":
    main()
