"""params.yaml: validated at load, errors name the file and the key."""

from pathlib import Path

import pytest
import yaml

from akd_cache.config import ConfigError, load_params

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, doc) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def minimal(**cache) -> dict:
    return {"profile": "p", "profiles": {"p": {
        "data": {"dataset": "d.json"}, "teacher": {"model": "t"}, "student": {"model": "s"},
        "cache": cache}}}


def test_repository_params_load_in_both_profiles():
    assert load_params(REPO / "params.yaml").active.teacher.model == "embedded:smollm2"
    paper = load_params(REPO / "params.yaml", profile="paper").active
    assert paper.teacher.backend == "vllm" and paper.data.heldout == 1000


def test_unknown_key_is_an_error_that_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"params.yaml: profiles.p.cache.topk: Extra inputs"):
        load_params(write(tmp_path, minimal(topk=5)))


def test_bad_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"profiles.p.cache.k: Input should be greater"):
        load_params(write(tmp_path, minimal(k=0)))
    with pytest.raises(ConfigError, match=r"profiles.p.cache.template"):
        load_params(write(tmp_path, minimal(template="chatml")))


def test_missing_profile_is_named(tmp_path):
    doc = minimal()
    doc["profile"] = "gpu"
    with pytest.raises(ConfigError, match="'gpu' is not one of"):
        load_params(write(tmp_path, doc))


def test_custom_schema_needs_its_columns(tmp_path):
    doc = minimal()
    doc["profiles"]["p"]["data"]["schema"] = "custom"
    with pytest.raises(ConfigError, match="data.columns must map"):
        load_params(write(tmp_path, doc))
