"""`akd` as a user meets it: an expected failure is one line naming what is wrong and what to do,
with exit code 2; `--debug` / AKD_DEBUG=1 show the traceback; a bug keeps its traceback."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch
import yaml
import zarr
from huggingface_hub import constants
from transformers import AutoConfig

import stages.prepare
from akd_cache.cli import main
from akd_cache.config import ConfigError
from akd_cache.errors import AkdError, CacheError, ModelNotFoundError
from akd_cache.models.resolve import resolve_model
from akd_cache.store.lock import WriterLock

REPO = Path(__file__).resolve().parents[1]
N_TRAIN = 8
UNREACHABLE_HUB = "http://127.0.0.1:9"  # the discard port: connection refused at once


def write_params(workdir: Path, codealpaca_path: Path, teacher: str, student: dict,
                 n_train: int = N_TRAIN, **cache) -> None:
    doc = {"profile": "mini", "profiles": {"mini": {
        "data": {"dataset": str(codealpaca_path), "heldout": 2, "max_train_samples": n_train},
        "teacher": {"model": teacher},
        "student": student,
        "cache": {"k": 8, "shard_tokens": 1024, "root": str(workdir / "cache"), **cache},
    }}, "experiments": {"kd": {"method": "kd"}}}
    (workdir / "params.yaml").write_text(yaml.safe_dump(doc))


def akd(capsys, *argv: str) -> tuple[int, str]:
    """Run `akd argv...` in-process; the exit code and the one error line it printed."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("akd")]
    assert len(lines) == 1, err
    return exit_info.value.code, lines[0]


@pytest.fixture
def tiny(tiny_models) -> str:
    return str(tiny_models["llama"])


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AKD_DEBUG", raising=False)
    return tmp_path


def test_config_error_is_one_line_with_exit_2(workdir, codealpaca_path, tiny, capsys):
    write_params(workdir, codealpaca_path, tiny, {"model": tiny}, topk=8)
    code, line = akd(capsys, "prepare")
    assert code == 2
    assert line.startswith("akd prepare: params.yaml: profiles.mini.cache.topk: Extra inputs")


def test_broken_yaml_is_a_config_error(workdir, capsys):
    (workdir / "params.yaml").write_text("profile: [unclosed\n")
    code, line = akd(capsys, "prepare")
    assert code == 2 and line.startswith("akd prepare: params.yaml: not valid YAML")


def test_a_params_file_that_cannot_be_read_is_one_line(workdir, capsys):
    assert akd(capsys, "prepare", "--params", str(workdir)) == (
        2, f"akd prepare: {workdir}: cannot read the params file (Is a directory)")
    (workdir / "params.yaml").write_bytes(b"profile: \xff\xfe\n")
    assert akd(capsys, "prepare") == (
        2, "akd prepare: params.yaml: not UTF-8 text at byte offset 9; a params file is YAML")


def test_a_duplicate_key_is_one_line(workdir, codealpaca_path, tiny, capsys):
    write_params(workdir, codealpaca_path, tiny, {"model": tiny})
    path = workdir / "params.yaml"
    doubled = re.sub(r"^( +)k: 8$", r"\1k: 8\n\1k: 9", path.read_text(), flags=re.MULTILINE)
    path.write_text(doubled)
    code, line = akd(capsys, "prepare")
    assert code == 2
    assert line.startswith("akd prepare: params.yaml: line ")
    assert line.endswith(": key 'k' is given twice in one mapping; keep one")


def test_an_unknown_profile_blames_where_it_came_from(workdir, codealpaca_path, tiny, capsys):
    write_params(workdir, codealpaca_path, tiny, {"model": tiny})
    assert akd(capsys, "prepare", "--profile", "nope") == (
        2, "akd prepare: --profile nope: not one of params.yaml's profiles ['mini']")
    path = workdir / "params.yaml"
    path.write_text(path.read_text().replace("profile: mini", "profile: nope"))
    assert akd(capsys, "prepare") == (
        2, "akd prepare: params.yaml: profile 'nope' is not one of ['mini']")


def test_debug_flag_and_env_show_the_traceback(workdir, codealpaca_path, tiny, monkeypatch):
    write_params(workdir, codealpaca_path, tiny, {"model": tiny}, topk=8)
    with pytest.raises(ConfigError, match="cache.topk"):
        main(["prepare", "--debug"])
    with pytest.raises(ConfigError, match="cache.topk"):
        main(["--debug", "prepare"])
    monkeypatch.setenv("AKD_DEBUG", "1")
    with pytest.raises(ConfigError, match="cache.topk"):
        main(["prepare"])


def test_unexpected_errors_keep_their_traceback(workdir, monkeypatch):
    def bug(argv):
        raise KeyError("a bug")

    monkeypatch.setattr(stages.prepare, "main", bug)
    with pytest.raises(KeyError, match="a bug"):
        main(["prepare"])


def test_a_path_the_machine_refuses_is_one_line_naming_it(workdir, codealpaca_path, tiny,
                                                          capsys, monkeypatch):
    write_params(workdir, codealpaca_path, tiny, {"model": tiny})
    (workdir / "data").write_text("a file where the prepared data's folder goes")
    assert akd(capsys, "prepare") == (
        2, ("akd prepare: data/prepared: Not a directory; fix the path's permissions or free "
           "space, or set another path"))

    def bug(argv):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "internal.json")

    monkeypatch.setattr(stages.prepare, "main", bug)  # a file the code itself expected: a bug
    with pytest.raises(FileNotFoundError, match="internal.json"):
        main(["prepare"])


def test_exit_code_and_one_line_through_python_m(workdir, codealpaca_path, tiny):
    write_params(workdir, codealpaca_path, tiny, {"model": tiny}, k=0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("AKD_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "akd_cache.cli", "prepare"], cwd=workdir,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [(
        "akd prepare: params.yaml: profiles.mini.cache.k: Input should be greater than or equal "
        "to 1"
    )]
    env["AKD_DEBUG"] = "1"
    proc = subprocess.run([sys.executable, "-m", "akd_cache.cli", "prepare"], cwd=workdir,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_unknown_command_and_experiment(workdir, codealpaca_path, tiny, capsys):
    assert akd(capsys, "trian") == (2, (
        "akd: unknown command 'trian'; choose one of cache-teacher, evaluate, fidelity, finalize, "
        "inspect, models, prepare, report, teacher-generate, template-analysis, train, verify"
    ))
    write_params(workdir, codealpaca_path, tiny, {"model": tiny})
    code, line = akd(capsys, "train", "--experiment", "nope")
    assert code == 2 and line == "akd train: params.yaml: no experiment 'nope'; known: kd"


def test_missing_dataset_file(workdir, tiny, capsys):
    write_params(workdir, workdir / "nowhere.json", tiny, {"model": tiny})
    code, line = akd(capsys, "prepare")
    assert code == 2
    assert line == (f"akd prepare: {workdir / 'nowhere.json'}: dataset file not found; "
                    "fix data.dataset in the params")


def test_a_stage_run_before_its_inputs_names_the_stage_to_run(workdir, codealpaca_path, tiny,
                                                              capsys):
    write_params(workdir, codealpaca_path, tiny, {"model": tiny})
    code, line = akd(capsys, "cache-teacher")
    assert code == 2
    assert line == ("akd cache-teacher: data/prepared/train.jsonl: not found; "
                    "run `akd prepare` first")
    code, line = akd(capsys, "train", "--experiment", "kd")
    assert code == 2
    assert line == "akd train: runs/teacher_cache.json: not found; run `akd cache-teacher` first"


@pytest.mark.parametrize("body,reason", [
    ('{"loc', "not valid JSON (Unterminated string starting at: line 1 column 2 (char 1))"),
    ("[]", "expected a JSON object, got list"),
    ('{"key": "x"}', "no 'location' key"),
])
def test_a_damaged_pointer_names_itself_and_the_stage_that_rewrites_it(
    workdir, codealpaca_path, tiny, capsys, body, reason
):
    write_params(workdir, codealpaca_path, tiny, {"model": tiny})
    (workdir / "runs").mkdir()
    (workdir / "runs" / "teacher_cache.json").write_text(body)
    code, line = akd(capsys, "train", "--experiment", "kd")
    assert code == 2
    assert line == (f"akd train: runs/teacher_cache.json: {reason}; run `akd cache-teacher` "
                    "again")


def test_inspect_of_a_missing_cache(workdir, capsys):
    code, line = akd(capsys, "inspect", str(workdir / "no-cache"))
    assert code == 2 and line == f"akd inspect: {workdir / 'no-cache'}: no teacher cache there"


def test_k_larger_than_the_vocabulary_is_refused_before_any_data_is_read(
    workdir, codealpaca_path, tiny, capsys
):
    vocab = AutoConfig.from_pretrained(tiny).vocab_size
    write_params(workdir, codealpaca_path, tiny, {"model": tiny}, k=vocab + 1)
    main(["prepare"])
    code, line = akd(capsys, "cache-teacher")
    assert code == 2
    assert line == (f"akd cache-teacher: cache.k={vocab + 1} is larger than the teacher's "
                    f"vocabulary ({vocab} tokens in {tiny}); set cache.k to at most {vocab}")
    assert not (workdir / "runs").exists()  # nothing tokenised, nothing written
    code, line = akd(capsys, "template-analysis")
    assert code == 2 and f"cache.k={vocab + 1} is larger than the teacher's vocabulary" in line


@pytest.fixture
def no_accelerator(monkeypatch):
    """This machine as a CPU-only one, whatever it has."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)


def test_a_teacher_device_this_machine_lacks_is_one_line_before_the_cache_is_made(
    workdir, codealpaca_path, tiny, capsys, no_accelerator
):
    write_params(workdir, codealpaca_path, tiny, {"model": tiny})
    doc = yaml.safe_load((workdir / "params.yaml").read_text())
    doc["profiles"]["mini"]["teacher"]["device"] = "cuda:0"
    (workdir / "params.yaml").write_text(yaml.safe_dump(doc))
    main(["prepare"])
    code, line = akd(capsys, "cache-teacher")
    assert code == 2
    assert line == ("akd cache-teacher: teacher.device 'cuda:0': this machine has no "
                    "accelerator; set teacher.device to a device it has (cpu)")
    # the cache's group and nothing in it: the teacher failed to load before the layout
    (group,) = [p.parent for p in (workdir / "cache").rglob("zarr.json")]
    assert list(zarr.open_group(str(group), mode="r").members()) == []


def test_lock_refused_and_incomplete_cache(workdir, codealpaca_path, tiny, capsys):
    write_params(workdir, codealpaca_path, tiny, {"model": tiny}, n_train=32)
    main(["prepare"])
    main(["cache-teacher", "--num-workers", "2", "--worker-index", "0"])
    location = str(next((workdir / "cache").iterdir()))
    code, line = akd(capsys, "finalize", location)
    assert code == 2
    assert line == (f"akd finalize: {location}: shards are still missing; run the remaining "
                    "workers first")
    with WriterLock(location, "worker-1-of-2"):
        code, line = akd(capsys, "cache-teacher", "--num-workers", "2", "--worker-index", "1")
    assert code == 2
    assert line.startswith(f"akd cache-teacher: {location}/locks/worker-1-of-2.lock: another "
                           f"writer holds this cache (host ")
    assert line.endswith("if it is gone, re-run with --break-lock")
    main(["cache-teacher", "--num-workers", "2", "--worker-index", "1"])
    for options, message in (
        (("--num-workers", "0"), "--num-workers 0: at least one worker fills the shards"),
        (("--num-workers", "2", "--worker-index", "5"),
         "--worker-index 5 is not in [0, 2), the workers of --num-workers 2"),
    ):  # refused on a complete cache too, where no worker has anything left to do
        code, line = akd(capsys, "cache-teacher", *options)
        assert (code, line) == (2, f"akd cache-teacher: {message}")


# --- model references (`teacher.model`, `student.model`) -----------------------------------


def test_a_missing_local_teacher_is_refused_by_models(workdir, codealpaca_path, tiny, capsys):
    for ref in ("./models/missing", str(workdir / "missing"), "a/b/c"):
        write_params(workdir, codealpaca_path, ref, {"model": tiny})
        code, line = akd(capsys, "models")
        assert code == 2
        assert line == (f"akd models: teacher.model: {ref!r} is neither a local folder nor a hub "
                        "id (`name` or `org/name`); fix the path")
    assert not (workdir / "storage" / "models" / "manifest.json").exists()


def test_a_folder_that_holds_no_model_is_refused_by_models(workdir, codealpaca_path, tiny,
                                                           capsys):
    (workdir / "weights").mkdir()
    (workdir / "weights" / "notes.txt").write_text("the model is elsewhere")
    write_params(workdir, codealpaca_path, "weights", {"model": tiny})
    code, line = akd(capsys, "models")
    assert code == 2
    assert line == ("akd models: teacher.model: 'weights' is a folder without a config.json, so "
                    "no model transformers can load; fix the path")


def test_a_relative_path_shaped_like_a_hub_id_is_reported_at_once(
    workdir, codealpaca_path, tiny, capsys, monkeypatch
):
    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE_HUB)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(workdir / "hub-cache"))
    write_params(workdir, codealpaca_path, "models/missing", {"model": tiny})
    waits: list[float] = []  # a client that retries the hub backs off by sleeping first
    monkeypatch.setattr(time, "sleep", waits.append)
    code, line = akd(capsys, "models")
    assert waits == []
    assert code == 2
    assert line.startswith("akd models: teacher.model: 'models/missing' is neither a local folder "
                           "nor a model in the local hub cache, and the hub could not be reached")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, line = akd(capsys, "models")
    assert code == 2
    assert line == ("akd models: teacher.model: 'models/missing' is neither a local folder nor a "
                    "model in the local hub cache (HF_HUB_OFFLINE is set); fix the setting or "
                    "download the model first")
    assert not (workdir / "storage" / "models" / "manifest.json").exists()


class NotOnHub(BaseHTTPRequestHandler):
    """A hub that knows no model: the hub's 404 for a missing repository."""

    def do_GET(self) -> None:
        body = json.dumps({"error": "Repository not found"}).encode()
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def empty_hub(monkeypatch, tmp_path):
    server = HTTPServer(("127.0.0.1", 0), NotOnHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    yield
    server.shutdown()


def test_a_student_that_is_not_on_the_hub(workdir, codealpaca_path, tiny, capsys, empty_hub):
    write_params(workdir, codealpaca_path, tiny, {"model": "someone/no-such-student"})
    for argv in (["models"], ["train", "--experiment", "kd"], ["evaluate", "--model", "student"]):
        code, line = akd(capsys, *argv)
        assert code == 2
        assert line == (f"akd {argv[0]}: student.model: 'someone/no-such-student' is neither a "
                        "local folder nor a model on the hub; fix the setting (a local path must "
                        "exist)")


def test_resolution_rule(tmp_path, monkeypatch, tiny, empty_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    with pytest.raises(ModelNotFoundError, match="'org/name' is a folder without a config.json"):
        resolve_model("org/name", "teacher.model")  # a folder wins, and must hold a model
    shutil.copy(Path(tiny) / "config.json", tmp_path / "org" / "name")
    assert resolve_model("org/name", "teacher.model") == "org/name"
    assert resolve_model(tiny, "teacher.model") == tiny
    with pytest.raises(ModelNotFoundError, match="not converted yet .* run `akd models` first"):
        resolve_model("embedded:smollm2", "teacher.model", models_dir=tmp_path / "models")
    with pytest.raises(ConfigError, match="teacher.model: unknown embedded model"):
        resolve_model("embedded:gpt5", "teacher.model")
    with pytest.raises(ModelNotFoundError, match="nor a model on the hub"):
        resolve_model("org/other", "teacher.model")


def test_expected_errors_keep_their_old_types():
    """Callers that caught the built-in types before still do."""
    from akd_cache.store.lock import CacheLockedError
    from akd_cache.store.reader import CacheError as ReaderCacheError
    from akd_cache.store.writer import IncompatibleCacheError

    assert ReaderCacheError is CacheError and issubclass(CacheError, ValueError)
    assert issubclass(CacheLockedError, AkdError) and issubclass(CacheLockedError, RuntimeError)
    assert issubclass(IncompatibleCacheError, CacheError)
    assert issubclass(ConfigError, AkdError) and issubclass(ConfigError, ValueError)
    assert issubclass(ModelNotFoundError, FileNotFoundError)
