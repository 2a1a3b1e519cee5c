"""params.yaml is Hydra's composition of conf/ (what `dvc exp run` writes), for every suite."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from dvc.utils.hydra import compose_and_dump

from akd_cache.config import SeqKD, load_params
from akd_cache.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def compose(tmp_path: Path, *overrides: str) -> Path:
    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(REPO / "conf"), None, "config", "", list(overrides))
    return out


def test_params_yaml_is_the_default_composition(tmp_path):
    assert yaml.safe_load(compose(tmp_path).read_text()) == yaml.safe_load(
        (REPO / "params.yaml").read_text())


def test_the_demo_suite_skips_seqkd_and_evaluates_two_models():
    params = load_params(REPO / "params.yaml")
    assert not any(isinstance(e, SeqKD) for e in params.experiments.values())
    assert params.evalplus.references == ["teacher"] and params.evalplus.experiments == ["akd"]
    online = {n for n, e in params.experiments.items() if getattr(e, "online", False)}
    assert online == {"kd_online", "akd_online"}


def test_the_full_suite_holds_the_papers_lists(tmp_path):
    params = load_params(compose(tmp_path, "suite=full"))
    methods = {e.method for e in params.experiments.values()}
    assert methods == {"sft", "seqkd", "kd", "rkd", "akd", "fixed_beta", "minillm"}
    assert {"akd_lora", "akd_m1", "akd_m2", "beta_08"} <= set(params.experiments)
    assert set(params.evalplus.experiments) == set(params.experiments)


def test_evalplus_must_name_experiments(tmp_path):
    path = compose(tmp_path, "evalplus.experiments=[nope]")
    with pytest.raises(ConfigError, match="evalplus.experiments names no experiment: nope"):
        load_params(path)
