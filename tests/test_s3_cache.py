"""Caches on S3 for real: a moto server (conftest's `s3_endpoint`) reached through s3fs. A cache
is built there, resumed after kill -9, read for training and by `akd inspect`, and its lock is a
conditional write that moto honours."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import fsspec
import pytest
import torch
import zarr
from safetensors.torch import load_file
from scale_project import assert_same_cache, write_params
from shard_kill import kill_when_paused, shards_done

import stages.cache_teacher
import stages.prepare
from akd_cache.cli import main as akd
from akd_cache.config import KD, TrainConfig
from akd_cache.store.lock import CacheLockedError, WriterLock
from akd_cache.student.run import train_experiment

pytest.importorskip("s3fs")  # an extra; CI installs it, so nothing is skipped there

REPO = Path(__file__).resolve().parents[1]
N_TRAIN = 160  # 2 shards
ROOT = "s3://bucket/caches"
REFERENCE_ROOT = "s3://bucket/reference"
# `akd cache-teacher` whose teacher pauses for good after the first shard (tests/shard_kill.py)
PAUSING_CACHE_TEACHER = """
import sys
from shard_kill import pause_after_first_shard
from akd_cache.teacher.hf_backend import HFTeacher
location, marker = sys.argv[1:]
HFTeacher.score = pause_after_first_shard(HFTeacher.score, location, marker)
from akd_cache.cli import main
main(["cache-teacher"])
"""


@pytest.fixture(scope="module")
def s3_cache(s3_endpoint, tiny_models, codealpaca_path, tmp_path_factory):
    """Stage 1 into s3://bucket/caches killed with SIGKILL after its first shard, then re-run;
    and an uninterrupted build of the same cache under another root."""
    workdir = tmp_path_factory.mktemp("s3-project")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        write_params(workdir, tiny_models, codealpaca_path, REFERENCE_ROOT, N_TRAIN)
        stages.prepare.main([])
        stages.cache_teacher.main([])
        reference = json.loads(Path("runs/teacher_cache.json").read_text())["location"]
        key = reference.rsplit("/", 1)[1]
        location = f"{ROOT}/{key}"
        write_params(workdir, tiny_models, codealpaca_path, ROOT, N_TRAIN)
        marker = workdir / "paused"
        child = subprocess.Popen(
            [sys.executable, "-c", PAUSING_CACHE_TEACHER, location, str(marker)], cwd=workdir,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        kill_when_paused(child, marker)
        interrupted = shards_done(location)
        fs = fsspec.filesystem("s3")
        lock_left = fs.exists(f"{location}/locks/worker-0-of-1.lock")
        stages.cache_teacher.main([])  # the dead writer's lock (this host, no such pid) is stale
        assert json.loads(Path("runs/teacher_cache.json").read_text())["location"] == location
    return {"location": location, "reference": reference, "interrupted": interrupted,
            "lock_left": lock_left, "n_shards": zarr.open_group(location)["shard_done"].shape[0]}


def test_s3_cache_resumed_after_sigkill_equals_an_uninterrupted_build(s3_cache):
    assert s3_cache["interrupted"] == 1 < s3_cache["n_shards"], "the kill lands after shard 1"
    assert s3_cache["lock_left"]
    assert_same_cache(s3_cache["location"], s3_cache["reference"])
    assert not fsspec.filesystem("s3").exists(f"{s3_cache['location']}/locks/worker-0-of-1.lock")


def test_s3_training_from_the_cache_equals_training_from_a_local_copy(s3_cache, tiny_models,
                                                                      tmp_path):
    local = tmp_path / "cache"
    fsspec.filesystem("s3").get(s3_cache["location"], str(local), recursive=True)
    train = TrainConfig(batch_size=4, max_steps=2, lr=1e-3, save_steps=100)
    student = str(tiny_models["gpt_bigcode"])
    from_s3 = train_experiment(s3_cache["location"], student, KD(), train, tmp_path / "a", "kd")
    from_disk = train_experiment(str(local), student, KD(), train, tmp_path / "b", "kd")
    assert from_s3["steps"] == 2 and from_s3["train_loss"] == from_disk["train_loss"] > 0
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_s3_inspect_and_verify_describe_the_cache(s3_cache, capsys):
    location = s3_cache["location"]
    key = location.rsplit("/", 1)[1]
    akd(["inspect", location])
    out = capsys.readouterr().out
    assert f"cache      {location}" in out and f"key        {key}" in out and "complete" in out
    akd(["verify", location])
    assert f"{location}: ok (complete; key {key} re-derived" in capsys.readouterr().out


def test_s3_lock_is_a_conditional_write_that_moto_honours(s3_endpoint):
    fs = fsspec.filesystem("s3")
    fs.pipe_file("bucket/conditional", b"first", mode="create")
    with pytest.raises(FileExistsError):
        fs.pipe_file("bucket/conditional", b"second", mode="create")
    assert fs.cat_file("bucket/conditional") == b"first"


def test_s3_second_writer_is_refused_even_when_racing(s3_endpoint):
    location = f"{ROOT}/racing"
    racers = 8
    start = threading.Barrier(racers)
    won, refused = [], []

    def race() -> None:
        lock = WriterLock(location, "worker-0-of-1")
        start.wait()
        try:
            won.append(lock.__enter__())
        except CacheLockedError:
            refused.append(lock)

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(refused) == racers - 1
    with pytest.raises(CacheLockedError, match="another writer"):
        WriterLock(location, "worker-0-of-1").__enter__()
    won[0].__exit__()
    with WriterLock(location, "worker-0-of-1"):
        pass
