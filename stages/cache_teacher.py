"""Stage `cache_teacher` (Stage 1): run the teacher over the training split into the store.

Several workers may fill one cache: run with `--num-workers N --worker-index i` on each, then
once with `--finalize-only` (or let the last worker finish it). Interrupted runs resume.
"""

from __future__ import annotations

import json

from akd_cache.data.instructions import read_examples, write_jsonl
from akd_cache.models.resolve import resolve_model
from akd_cache.models.vocab import check_top_k, model_vocab_size
from akd_cache.store.writer import fill
from akd_cache.teacher.build import (
    backend_factory,
    cache_location,
    load_tokenizer,
    make_ingredients,
    tokenize_split,
)
from stages.common import (
    PREPARED_DIR,
    TEACHER_CACHE_DROPPED,
    TEACHER_CACHE_POINTER,
    load_stage_profile,
    require_input,
    stage_args,
    write_json,
)


def main(argv: list[str] | None = None) -> None:
    parser = stage_args(__doc__)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--worker-index", type=int, default=0)
    parser.add_argument("--break-lock", action="store_true")
    args = parser.parse_args(argv)
    profile = load_stage_profile(args)
    teacher_path = resolve_model(profile.teacher.model, "teacher.model", profile.teacher.revision)
    vocab_size = model_vocab_size(teacher_path, profile.teacher.revision)
    check_top_k(profile.cache.k, vocab_size, teacher_path)
    tokenizer = load_tokenizer(teacher_path, profile.teacher.revision)
    train = require_input(PREPARED_DIR / "train.jsonl", "prepare")
    split = tokenize_split(tokenizer, read_examples(train), profile.cache)
    write_jsonl(TEACHER_CACHE_DROPPED, split.dropped)
    summary = json.loads(require_input(PREPARED_DIR / "summary.json", "prepare").read_text())
    ingredients = make_ingredients(
        teacher=profile.teacher, teacher_path=teacher_path, tokenizer=tokenizer,
        data=profile.data, dataset_sha256=summary["dataset_sha256"], samples=split.samples,
        cache=profile.cache,
    )
    location = cache_location(profile.cache.root, ingredients.key())
    print(f"cache_teacher: {len(split.samples)} samples ({len(split.dropped)} dropped as too "
          f"long, listed in {TEACHER_CACHE_DROPPED}), cache {location}")
    complete = fill(
        location, split.samples, ingredients, max(vocab_size, len(tokenizer)),
        backend_factory(profile.teacher, teacher_path, profile.cache),
        shard_rows=profile.cache.shard_tokens, worker_index=args.worker_index,
        num_workers=args.num_workers, break_lock=args.break_lock,
    )
    if complete:
        write_json(TEACHER_CACHE_POINTER, {"key": ingredients.key(), "location": location})
        print(f"cache_teacher: complete, see `akd inspect {location}`")
    else:
        print("cache_teacher: this worker is done; other workers' shards are still missing")


if __name__ == "__main__":
    main()
