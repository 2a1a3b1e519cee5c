"""Stage `teacher_generate` (Stage 1's generate mode): the teacher's own responses to the
training prompts, for SeqKD; content-addressed and resumable like the logit cache. With no
seqkd experiment in params.yaml (the default demo) there is nothing to generate: the pointer
says so and the teacher is never loaded."""

from __future__ import annotations

from pathlib import Path

from akd_cache.config import SeqKD, load_params
from akd_cache.data.instructions import read_examples
from akd_cache.models.resolve import resolve_model
from akd_cache.store.generations import generations_location
from akd_cache.teacher.build import load_tokenizer
from akd_cache.teacher.generate import (
    generate_responses,
    generator_factory,
    make_generation_ingredients,
)
from stages.common import (
    PREPARED_DIR,
    TEACHER_GENERATIONS_POINTER,
    require_input,
    stage_args,
    write_json,
)


def main(argv: list[str] | None = None) -> None:
    parser = stage_args(__doc__)
    parser.add_argument("--break-lock", action="store_true")
    args = parser.parse_args(argv)
    params = load_params(args.params, args.profile)
    if not any(isinstance(e, SeqKD) for e in params.experiments.values()):
        Path(params.active.generate.root).mkdir(parents=True, exist_ok=True)
        write_json(TEACHER_GENERATIONS_POINTER, {"skipped": "no seqkd experiment"})
        print("teacher_generate: no seqkd experiment, nothing to generate")
        return
    profile = params.active
    teacher_path = resolve_model(profile.teacher.model, "teacher.model", profile.teacher.revision)
    tokenizer = load_tokenizer(teacher_path, profile.teacher.revision)
    examples = read_examples(require_input(PREPARED_DIR / "train.jsonl", "prepare"))
    ingredients = make_generation_ingredients(
        teacher=profile.teacher, teacher_path=teacher_path, tokenizer=tokenizer,
        examples=examples, template=profile.cache.template,
        max_new_tokens=profile.generate.max_new_tokens,
    )
    location = generations_location(ingredients.key(), profile.generate.root)
    generate_responses(location, examples, ingredients,
                       generator_factory(profile.teacher, teacher_path,
                                         profile.generate.batch_size),
                       break_lock=args.break_lock)
    write_json(TEACHER_GENERATIONS_POINTER, {"key": ingredients.key(), "location": str(location)})
    print(f"teacher_generate: {len(examples)} responses in {location}")


if __name__ == "__main__":
    main()
