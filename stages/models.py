"""Stage `models`: the embedded teacher converted once, and the layer-pruned demo student."""

from __future__ import annotations

from pathlib import Path

from akd_cache.models.prune import save_pruned_student
from akd_cache.models.resolve import MODELS_DIR, embedded_folder, resolve_model
from akd_cache.models.smollm2 import EMBEDDED_ID, ensure_smollm2
from stages.common import load_stage_profile, stage_args, write_json


def main(argv: list[str] | None = None) -> None:
    args = stage_args(__doc__).parse_args(argv)
    profile = load_stage_profile(args)
    if profile.teacher.model == EMBEDDED_ID:
        ensure_smollm2(embedded_folder(profile.teacher.model, "teacher.model"))
    teacher = resolve_model(profile.teacher.model, "teacher.model", profile.teacher.revision)
    student = profile.student
    if student.keep_teacher_layers is None:
        resolve_model(student.model, "student.model")
    else:
        save_pruned_student(teacher, Path(student.model), student.keep_teacher_layers,
                            profile.teacher.revision)
    write_json(MODELS_DIR / "manifest.json", {
        "teacher": teacher,
        "student": student.model,
        "student_keeps_teacher_layers": student.keep_teacher_layers,
    })
    print(f"models: teacher {teacher}, student {student.model}")


if __name__ == "__main__":
    main()
