"""Stage `template_analysis` (the paper's Table 9): one teacher cache per prompt template over
the same random training samples, compared by the teacher's probability and entropy."""

from __future__ import annotations

import random

from akd_cache.data.instructions import read_examples
from akd_cache.data.templates import TEMPLATES
from akd_cache.store.reader import TeacherCache
from akd_cache.teacher.build import build_cache
from akd_cache.teacher.template_analysis import compare_templates, per_sample_scores
from stages.common import (
    PREPARED_DIR,
    RUNS_DIR,
    load_stage_profile,
    read_output,
    require_input,
    stage_args,
    write_json,
)


def main(argv: list[str] | None = None) -> None:
    args = stage_args(__doc__).parse_args(argv)
    profile = load_stage_profile(args)
    settings = profile.template_analysis
    examples = read_examples(require_input(PREPARED_DIR / "train.jsonl", "prepare"))
    examples = random.Random(settings.seed).sample(examples, min(settings.n_samples,
                                                                 len(examples)))
    dataset_sha256 = read_output(PREPARED_DIR / "summary.json", "prepare",
                                 ["dataset_sha256"])["dataset_sha256"]
    scores = {}
    for template in TEMPLATES:
        cache = profile.cache.model_copy(update={"template": template, "root": settings.root})
        built = build_cache(profile.teacher, profile.data, cache, examples, dataset_sha256)
        scores[template] = per_sample_scores(TeacherCache(built.location))
    result = compare_templates(scores)
    write_json(RUNS_DIR / "template_analysis.json", result)
    best = max(result["wins"]["probability"], key=result["wins"]["probability"].get)
    print(f"template_analysis: {result['n_samples']} samples; most probability wins: {best}")


if __name__ == "__main__":
    main()
