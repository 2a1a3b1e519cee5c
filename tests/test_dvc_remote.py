"""Sharing a cache through a DVC remote on S3 (conftest's moto server): one clone runs Stage 1
and pushes, a second clone pulls and trains without ever loading the teacher."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import yaml
from scale_project import stored_bytes, write_params
from transformers import AutoModelForCausalLM

import akd_cache.teacher.build
import akd_cache.teacher.hf_backend
import stages.cache_teacher
import stages.prepare
import stages.train

pytest.importorskip("dvc_s3")  # an extra; CI installs it, so nothing is skipped there

N_TRAIN = 16
REMOTE = "s3://bucket/dvc-remote"
DVC = str(Path(sys.executable).parent / "dvc")
# the project's cache_teacher stage, cut down to what this repository holds
STAGE = {"cache_teacher": {
    "cmd": "akd cache-teacher",
    "deps": ["data/prepared"],
    "params": ["profiles.tiny.teacher", "profiles.tiny.cache"],
    "outs": [{"storage/teacher-cache": {"persist": True}},
             {"runs/teacher_cache.json": {"cache": False}}],
}}
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}


def sh(cwd: Path, *command: str) -> None:
    subprocess.run(command, cwd=cwd, check=True, env={**os.environ, **GIT_ENV},
                   stdout=subprocess.DEVNULL)


def test_dvc_remote_on_s3_shares_a_cache_that_a_second_clone_trains_from(
        s3_endpoint, tiny_models, codealpaca_path, tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    write_params(first, tiny_models, codealpaca_path, "storage/teacher-cache", N_TRAIN)
    (first / "dvc.yaml").write_text(yaml.safe_dump({"stages": STAGE}))
    sh(first, "git", "init", "-q")
    sh(first, DVC, "init", "-q")
    sh(first, DVC, "remote", "add", "-d", "shared", REMOTE)
    sh(first, DVC, "remote", "modify", "shared", "endpointurl", s3_endpoint)
    monkeypatch.chdir(first)
    stages.prepare.main([])
    stages.cache_teacher.main([])  # what `dvc repro cache_teacher` runs; `dvc commit` records it
    sh(first, DVC, "commit", "-q", "-f", "cache_teacher")
    sh(first, DVC, "push", "-q", "cache_teacher")
    assert fsspec.filesystem("s3").find(REMOTE)  # the objects are on the S3 server
    sh(first, "git", "add", "-A")
    sh(first, "git", "commit", "-q", "-m", "cache")
    pointer = json.loads((first / "runs" / "teacher_cache.json").read_text())

    sh(tmp_path, "git", "clone", "-q", str(first), str(second))
    assert not (second / "storage" / "teacher-cache").exists()
    sh(second, DVC, "pull", "-q", "cache_teacher")
    assert stored_bytes(str(second / pointer["location"])) == stored_bytes(
        str(first / pointer["location"]))
    shutil.rmtree(first / "storage")  # nothing of the first clone's cache is left to read

    def no_teacher(*args, **kwargs):
        raise AssertionError("the second clone loaded the teacher")

    teacher = str(tiny_models["llama"])
    load = AutoModelForCausalLM.from_pretrained

    def student_only(path, *args, **kwargs):
        assert str(path) != teacher, "the second clone loaded the teacher"
        return load(path, *args, **kwargs)

    monkeypatch.setattr(akd_cache.teacher.build, "build_cache", no_teacher)
    monkeypatch.setattr(akd_cache.teacher.hf_backend.HFTeacher, "__init__", no_teacher)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", student_only)
    monkeypatch.chdir(second)
    stages.train.main(["--experiment", "kd"])
    metrics = json.loads((second / "runs" / "train" / "kd" / "metrics.json").read_text())
    assert metrics["cache_key"] == pointer["key"] and metrics["steps"] == 2
