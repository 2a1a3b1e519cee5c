"""params.yaml: validated at load, errors name the file and the key."""

from pathlib import Path

import pytest
import yaml

from akd_cache.config import AKD, KD, RKD, SFT, ConfigError, FixedBeta, SeqKD, load_params

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
    assert paper.fidelity.device == "cuda"


def test_unknown_key_is_an_error_that_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"params.yaml: profiles.p.cache.topk: Extra inputs"):
        load_params(write(tmp_path, minimal(topk=5)))


def test_bad_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"profiles.p.cache.k: Input should be greater"):
        load_params(write(tmp_path, minimal(k=0)))
    with pytest.raises(ConfigError, match=r"profiles.p.cache.template"):
        load_params(write(tmp_path, minimal(template="chatml")))


@pytest.mark.parametrize("section", ["teacher", "eval", "fidelity"])
def test_a_device_that_torch_would_refuse_is_named_at_load(tmp_path, section):
    doc = minimal()
    block = doc["profiles"]["p"].setdefault(section, {})
    block["device"] = "cuda:1"
    assert getattr(load_params(write(tmp_path, doc)).active, section).device == "cuda:1"
    block["device"] = "gpu0"
    with pytest.raises(ConfigError, match=rf"profiles.p.{section}.device: String should match"):
        load_params(write(tmp_path, doc))


def test_missing_profile_is_named(tmp_path):
    doc = minimal()
    doc["profile"] = "gpu"
    path = write(tmp_path, doc)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(err.value) == f"{path}: profile 'gpu' is not one of ['p']"
    with pytest.raises(ConfigError) as err:  # the file's `profile` is fine, the option is not
        load_params(write(tmp_path, minimal()), profile="nope")
    assert str(err.value) == f"--profile nope: not one of {path}'s profiles ['p']"


def test_a_missing_method_is_named(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, with_experiments(kd={"beta": 0.3})))
    assert str(err.value).endswith(": experiments.kd.method is missing (one of sft, seqkd, kd, "
                                   "rkd, akd, fixed_beta, minillm)")


def test_messages_drop_the_method_tag_and_pydantics_prefix(tmp_path):
    doc = with_experiments(kd={"method": "kd", "beta": 0.3})  # the tag is the experiment's name
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, doc))
    assert str(err.value) == f"{tmp_path / 'params.yaml'}: experiments.kd.beta: Extra inputs are " \
                             "not permitted"
    doc = minimal()
    doc["profiles"]["p"]["data"]["schema"] = "custom"
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, doc))
    assert "Value error" not in str(err.value)


def test_a_params_path_that_is_not_a_text_file_is_named(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path)
    assert str(err.value) == f"{tmp_path}: cannot read the params file (Is a directory)"
    binary = tmp_path / "params.yaml"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError) as err:
        load_params(binary)
    assert str(err.value) == f"{binary}: not UTF-8 text at byte offset 128; a params file is YAML"


def test_a_key_given_twice_is_refused(tmp_path):
    path = write(tmp_path, minimal())
    path.write_text(path.read_text() + "evalplus: {references: [teacher], references: []}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: line \d+: key 'references' is given twice "
                                          "in one mapping; keep one$"):
        load_params(path)
    merged = write(tmp_path, minimal())  # a YAML merge may override what it merges
    merged.write_text(merged.read_text() + "x: &e {references: [teacher]}\n"
                      "evalplus: {<<: *e, references: []}\n")
    with pytest.raises(ConfigError, match=r"^\S+: x: Extra inputs are not permitted$"):
        load_params(merged)


def test_custom_schema_needs_its_columns(tmp_path):
    doc = minimal()
    doc["profiles"]["p"]["data"]["schema"] = "custom"
    with pytest.raises(ConfigError, match="data.columns must map"):
        load_params(write(tmp_path, doc))


def test_columns_are_the_custom_schemas_and_name_known_roles(tmp_path):
    doc = minimal()
    data = doc["profiles"]["p"]["data"]
    data["columns"] = {"instruction": "instruction", "output": "output"}
    with pytest.raises(ConfigError, match=r"profiles\.p\.data: data\.columns applies to "
                                          r"data\.schema 'custom' only, not 'codealpaca'"):
        load_params(write(tmp_path, doc))
    data["schema"] = "custom"
    data["columns"]["inptu"] = "input"
    with pytest.raises(ConfigError, match=r"profiles\.p\.data: data\.columns: not a role: "
                                          r"'inptu' \(the roles are instruction, input, output\)"):
        load_params(write(tmp_path, doc))
    data["columns"]["input"] = data["columns"].pop("inptu")
    assert load_params(write(tmp_path, doc)).active.data.columns["input"] == "input"


def test_hub_split_is_for_a_hub_dataset_only(tmp_path):
    doc = minimal()
    data = doc["profiles"]["p"]["data"]
    data["hub_split"] = "test"
    with pytest.raises(ConfigError, match=r"profiles\.p\.data: data\.hub_split applies to a hub "
                                          "dataset only, not the local file 'd.json'"):
        load_params(write(tmp_path, doc))
    data["dataset"] = "sahil2801/CodeAlpaca-20k"
    assert load_params(write(tmp_path, doc)).active.data.hub_split == "test"


@pytest.mark.parametrize("max_steps", [0, -5])
def test_max_steps_is_whole_epochs_or_a_positive_count(tmp_path, max_steps):
    doc = minimal()
    doc["profiles"]["p"]["train"] = {"max_steps": max_steps}
    with pytest.raises(ConfigError, match=rf"profiles\.p\.train\.max_steps: must be -1 \(whole "
                                          rf"epochs\) or at least 1, not {max_steps}$"):
        load_params(write(tmp_path, doc))
    for allowed in (-1, 1):
        doc["profiles"]["p"]["train"] = {"max_steps": allowed}
        assert load_params(write(tmp_path, doc)).active.train.max_steps == allowed


def test_minillm_generations_must_fill_the_generation_batch(tmp_path):
    doc = with_experiments(m={"method": "minillm", "num_generations": 3})
    doc["profiles"]["p"]["train"] = {"batch_size": 4}
    with pytest.raises(ConfigError, match=r"experiments\.m\.num_generations 3 does not divide the "
                                          r"generation batch, train\.batch_size 4 x "
                                          r"train\.grad_accum 1 = 4"):
        load_params(write(tmp_path, doc))
    doc["profiles"]["p"]["train"] = {"batch_size": 2, "grad_accum": 3}  # TRL's batch: 2 * 3
    assert load_params(write(tmp_path, doc)).experiments["m"].num_generations == 3


def with_experiments(**experiments) -> dict:
    return {**minimal(), "experiments": experiments}


def test_repository_experiments_are_typed_by_method(tmp_path):
    from dvc.utils.hydra import compose_and_dump

    full = tmp_path / "params.yaml"  # the paper's lists: `dvc exp run -S suite=full`
    compose_and_dump(full, str(REPO / "conf"), None, "config", "", ["suite=full"])
    experiments = load_params(full).experiments
    assert isinstance(experiments["akd"], AKD) and experiments["akd"].variant == "m3"
    assert isinstance(experiments["seqkd"], SeqKD) and isinstance(experiments["sft"], SFT)
    assert isinstance(experiments["beta_04"], FixedBeta) and experiments["beta_04"].beta == 0.4
    assert experiments["akd_lora"].lora is not None and experiments["kd"].lora is None


@pytest.mark.parametrize("experiment,key", [
    ({"method": "kd", "beta": 0.7}, "beta"),
    ({"method": "rkd", "beta": 0.7}, "beta"),
    ({"method": "sft", "beta": 0.7}, "beta"),
    ({"method": "sft", "tail_mode": "uniform"}, "tail_mode"),
    ({"method": "seqkd", "tail_mode": "bucket"}, "tail_mode"),
    ({"method": "sft", "ce_weight": 0.5}, "ce_weight"),
    ({"method": "fixed_beta", "variant": "m1"}, "variant"),
    ({"method": "kd", "beta_reset": "uniform"}, "beta_reset"),
    ({"method": "sft", "online": True}, "online"),
    ({"method": "seqkd", "online": True}, "online"),
    ({"method": "minillm", "online": True}, "online"),
    ({"method": "minillm", "beta": 0.5}, "beta"),
])
def test_a_setting_the_method_does_not_have_is_an_error_naming_it(tmp_path, experiment, key):
    with pytest.raises(ConfigError, match=rf"yaml: experiments\.x\.{key}: Extra inputs"):
        load_params(write(tmp_path, with_experiments(x=experiment)))


def test_an_unknown_method_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"experiments\.x: Input tag 'ppo' found using "
                                          r"'method' does not match any of the expected tags"):
        load_params(write(tmp_path, with_experiments(x={"method": "ppo"})))


def test_settings_that_apply_are_accepted(tmp_path):
    experiments = load_params(write(tmp_path, with_experiments(
        a={"method": "akd", "variant": "m1", "beta": 0.3, "beta_reset": "uniform",
           "ce_weight": 0.5, "tail_mode": "uniform", "lora": {"rank": 4}},
        k={"method": "kd", "ce_weight": 0.2, "tail_mode": "renormalize"},
    ))).experiments
    assert experiments["a"].ce_weight == 0.5 and experiments["a"].lora.rank == 4
    assert experiments["k"].tail_mode == "renormalize"


@pytest.mark.parametrize("experiment,schedule", [
    (KD(), ("fixed", 0.0, "choice")),
    (RKD(), ("fixed", 1.0, "choice")),
    (FixedBeta(beta=0.6), ("fixed", 0.6, "choice")),
    (AKD(variant="m2", beta=0.2, beta_reset="uniform"), ("m2", 0.2, "uniform")),
    (SFT(), ("fixed", 0.0, "choice")),
])
def test_each_method_gives_its_beta_schedule(experiment, schedule):
    assert tuple(experiment.beta_schedule) == schedule


@pytest.mark.parametrize("method", ["kd", "rkd", "akd", "fixed_beta"])
def test_distillation_methods_can_run_online_without_a_tail_mode(tmp_path, method):
    experiments = load_params(write(tmp_path, with_experiments(
        x={"method": method, "online": True}))).experiments
    assert experiments["x"].online
    with pytest.raises(ConfigError, match=r"yaml: experiments\.x: tail_mode does not apply to "
                                          "an online teacher"):
        load_params(write(tmp_path, with_experiments(
            x={"method": method, "online": True, "tail_mode": "bucket"})))


def test_tail_shape_is_measured_by_the_hf_backend_only(tmp_path):
    doc = minimal(tail_shape=True)
    assert load_params(write(tmp_path, doc)).active.cache.tail_shape
    doc["profiles"]["p"]["teacher"]["backend"] = "vllm"
    with pytest.raises(ConfigError, match="cache.tail_shape needs teacher.backend 'hf'"):
        load_params(write(tmp_path, doc))


def test_the_shape_tail_mode_needs_a_cache_with_a_shape(tmp_path):
    doc = with_experiments(kd={"method": "kd", "tail_mode": "shape"})
    with pytest.raises(ConfigError, match="experiments.kd: tail_mode 'shape' needs "
                                          "cache.tail_shape: true"):
        load_params(write(tmp_path, doc))
    doc["profiles"]["p"]["cache"] = {"tail_shape": True}
    assert load_params(write(tmp_path, doc)).experiments["kd"].tail_mode == "shape"
    profile_wide = minimal()
    profile_wide["profiles"]["p"]["train"] = {"tail_mode": "shape"}
    with pytest.raises(ConfigError, match="train: tail_mode 'shape' needs cache.tail_shape"):
        load_params(write(tmp_path, profile_wide))
    online = with_experiments(kd={"method": "kd", "online": True})
    online["profiles"]["p"]["train"] = {"tail_mode": "shape"}
    online["profiles"]["p"]["cache"] = {"tail_shape": True}
    assert load_params(write(tmp_path, online)).experiments["kd"].online


def test_the_shape_tail_mode_is_not_tempered(tmp_path):
    doc = minimal(tail_shape=True)
    doc["profiles"]["p"]["train"] = {"tail_mode": "shape", "temperature": 2.0,
                                     "temper_cache": True}
    with pytest.raises(ConfigError, match="does not apply with train.temper_cache"):
        load_params(write(tmp_path, doc))


def test_the_lowrank_tail_mode_needs_a_tail_code_from_the_hf_backend(tmp_path):
    doc = with_experiments(kd={"method": "kd", "tail_mode": "lowrank"})
    with pytest.raises(ConfigError, match="experiments.kd: tail_mode 'lowrank' needs "
                                          "cache.tail_rank > 0"):
        load_params(write(tmp_path, doc))
    doc["profiles"]["p"]["cache"] = {"tail_rank": 32}
    assert load_params(write(tmp_path, doc)).experiments["kd"].tail_mode == "lowrank"
    doc["profiles"]["p"]["teacher"]["backend"] = "vllm"
    with pytest.raises(ConfigError, match="cache.tail_rank needs teacher.backend 'hf'"):
        load_params(write(tmp_path, doc))
    tempered = minimal()
    tempered["profiles"]["p"]["cache"] = {"tail_rank": 32}
    tempered["profiles"]["p"]["train"] = {"tail_mode": "lowrank", "temperature": 2.0,
                                          "temper_cache": True}
    with pytest.raises(ConfigError, match="'lowrank' does not apply with train.temper_cache"):
        load_params(write(tmp_path, tempered))


@pytest.mark.parametrize(("section", "backend", "key", "owner"), [
    ("teacher", "vllm", {"batch_tokens": 2048}, "hf"),
    ("teacher", "hf", {"vllm_memory_utilization": 0.5}, "vllm"),
    ("eval", "vllm", {"device": "cuda"}, "hf"),
    ("eval", "vllm", {"batch_size": 4}, "hf"),
    ("eval", "hf", {"vllm_memory_utilization": 0.5}, "vllm"),
])
def test_a_setting_only_the_other_backend_reads_is_an_error(tmp_path, section, backend, key,
                                                             owner):
    doc = minimal()
    block = doc["profiles"]["p"].setdefault(section, {})
    block.update(backend=backend, **key)
    (name,) = key
    with pytest.raises(ConfigError, match=rf"{section}\.{name} applies to {section}\.backend "
                                          rf"'{owner}' only, not '{backend}'"):
        load_params(write(tmp_path, doc))
    del block[name]
    assert getattr(load_params(write(tmp_path, doc)).active, section).backend == backend


def test_generate_batch_size_is_the_hf_teachers_only(tmp_path):
    doc = minimal()
    doc["profiles"]["p"]["teacher"]["backend"] = "vllm"
    doc["profiles"]["p"]["generate"] = {"batch_size": 16}
    with pytest.raises(ConfigError, match=r"generate\.batch_size applies to teacher\.backend "
                                          r"'hf' only, not 'vllm'"):
        load_params(write(tmp_path, doc))
    doc["profiles"]["p"]["teacher"]["backend"] = "hf"
    assert load_params(write(tmp_path, doc)).active.generate.batch_size == 16


def test_several_greedy_samples_are_refused_at_load(tmp_path):
    doc = minimal()
    doc["profiles"]["p"]["eval"] = {"n_samples": 4}
    with pytest.raises(ConfigError, match=r"eval.n_samples 4 at eval.temperature 0 \(greedy\)"):
        load_params(write(tmp_path, doc))
    doc["profiles"]["p"]["eval"]["temperature"] = 0.8
    assert load_params(write(tmp_path, doc)).active.eval.n_samples == 4
