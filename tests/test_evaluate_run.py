"""One model through the whole evaluation: generation, evalplus, taxonomy, metrics."""

import json
from pathlib import Path

from akd_cache.config import EvalConfig
from akd_cache.evaluation.run import SETTINGS_FILE, evaluate_model

EVALPLUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "evalplus"


def test_a_random_model_scores_zero_and_every_failure_is_classified(tiny_models, tmp_path):
    cfg = EvalConfig(data_dir=str(EVALPLUS), datasets=["humaneval"], n_tasks=3,
                     max_new_tokens=8, batch_size=3, taxonomy_workers=1)
    result = evaluate_model(tiny_models["llama"], tmp_path, cfg)
    humaneval = result["datasets"]["humaneval"]
    assert humaneval == {"base_pass_at_1": 0.0, "plus_pass_at_1": 0.0, "n_tasks": 3}
    taxonomy = result["taxonomy"]["humaneval"]
    assert taxonomy["total"] == 3 and taxonomy["correct"] == 0
    assert sum(taxonomy["categories"].values()) == 3
    rows = (tmp_path / "humaneval_taxonomy.jsonl").read_text().splitlines()
    assert len(rows) == 3 and all(not json.loads(r)["passed"] for r in rows)
    # samples made under other settings are never reused: 1 new token cannot repeat 8
    evaluate_model(tiny_models["llama"], tmp_path, cfg.model_copy(update={"max_new_tokens": 1}))
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["eval"]["max_new_tokens"] == 1
    raws = [json.loads(r)["raw"] for r in (tmp_path / "humaneval_samples.jsonl").read_text()
            .splitlines()]
    assert len(raws) == 3 and all(len(raw) <= 12 for raw in raws)
    # each dataset keeps the folder of its last scoring run only
    assert [len(list(d.iterdir())) for d in (tmp_path / "scoring").iterdir()] == [1]


def test_a_new_revision_of_the_model_makes_its_samples_again(tiny_models, tmp_path):
    """A hub model has no local weights to hash: its revision decides whether samples count."""
    cfg = EvalConfig(data_dir=str(EVALPLUS), datasets=["humaneval"], n_tasks=2,
                     max_new_tokens=4, batch_size=2, taxonomy_workers=1)
    samples = tmp_path / "humaneval_samples.jsonl"

    def mark_samples() -> None:
        rows = [json.loads(line) for line in samples.read_text().splitlines()]
        samples.write_text("".join(json.dumps({**row, "raw": "MARK"}) + "\n" for row in rows))

    def raws() -> list[str]:
        return [json.loads(line)["raw"] for line in samples.read_text().splitlines()]

    evaluate_model(tiny_models["llama"], tmp_path, cfg, revision="v1")
    mark_samples()
    evaluate_model(tiny_models["llama"], tmp_path, cfg, revision="v1")
    assert raws() == ["MARK", "MARK"]
    evaluate_model(tiny_models["llama"], tmp_path, cfg, revision="v2")
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["revision"] == "v2"
    assert len(raws()) == 2 and "MARK" not in raws()
