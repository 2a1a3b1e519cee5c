"""Stage `template_analysis` (the paper's Table 9): one teacher cache per prompt template over
the same random training samples, compared by the teacher's probability and entropy."""

from __future__ import annotations

import json
import random

from akd_cache.data.instructions import read_examples
from akd_cache.data.templates import TEMPLATES
from akd_cache.models.resolve import resolve_model
from akd_cache.models.vocab import check_top_k, model_vocab_size
from akd_cache.store.reader import TeacherCache
from akd_cache.store.writer import fill
from akd_cache.teacher.build import (
    backend_factory,
    cache_location,
    load_tokenizer,
    make_ingredients,
    tokenize_split,
)
from akd_cache.teacher.template_analysis import compare_templates, per_sample_scores
from stages.common import (
    PREPARED_DIR,
    RUNS_DIR,
    load_stage_profile,
    require_input,
    stage_args,
    write_json,
)


def main(argv: list[str] | None = None) -> None:
    args = stage_args(__doc__).parse_args(argv)
    profile = load_stage_profile(args)
    settings = profile.template_analysis
    teacher_path = resolve_model(profile.teacher.model, "teacher.model", profile.teacher.revision)
    vocab_size = model_vocab_size(teacher_path, profile.teacher.revision)
    check_top_k(profile.cache.k, vocab_size, teacher_path)
    examples = read_examples(require_input(PREPARED_DIR / "train.jsonl", "prepare"))
    examples = random.Random(settings.seed).sample(examples, min(settings.n_samples,
                                                                 len(examples)))
    tokenizer = load_tokenizer(teacher_path, profile.teacher.revision)
    summary = require_input(PREPARED_DIR / "summary.json", "prepare")
    dataset_sha256 = json.loads(summary.read_text())["dataset_sha256"]
    scores = {}
    for template in TEMPLATES:
        cache_cfg = profile.cache.model_copy(update={"template": template, "root": settings.root})
        split = tokenize_split(tokenizer, examples, cache_cfg)
        ingredients = make_ingredients(
            teacher=profile.teacher, teacher_path=teacher_path, tokenizer=tokenizer,
            data=profile.data, dataset_sha256=dataset_sha256, samples=split.samples,
            cache=cache_cfg,
        )
        location = cache_location(settings.root, ingredients.key())
        fill(location, split.samples, ingredients, max(vocab_size, len(tokenizer)),
             backend_factory(profile.teacher, teacher_path, cache_cfg),
             shard_rows=cache_cfg.shard_tokens)
        scores[template] = per_sample_scores(TeacherCache(location))
    result = compare_templates(scores)
    write_json(RUNS_DIR / "template_analysis.json", result)
    best = max(result["wins"]["probability"], key=result["wins"]["probability"].get)
    print(f"template_analysis: {result['n_samples']} samples; most probability wins: {best}")


if __name__ == "__main__":
    main()
