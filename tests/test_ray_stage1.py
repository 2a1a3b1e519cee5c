"""Stage 1 on Ray: teacher actors fill the shards of one store, byte for byte the cache of a
single-process run, and the shards of a killed actor are redone."""

from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest
import torch
from scale_project import K, assert_same_cache, stored_bytes, write_params

import akd_cache.teacher.build
import stages.cache_teacher
import stages.prepare
from akd_cache.store import format as fmt
from akd_cache.store.reader import TeacherCache
from akd_cache.teacher.hf_backend import HFTeacher

ray = pytest.importorskip("ray")  # an extra; CI installs it, so nothing is skipped there

TESTS = Path(__file__).resolve().parent
N_TRAIN = 300  # about 3 shards of the tiny teacher's rows
N_TAILED = 120  # 2 shards


@pytest.fixture(scope="module")
def local_ray():
    """A local two-CPU cluster whose workers import the tests' modules like this process does."""
    path = os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0"}})
    yield
    ray.shutdown()


@contextmanager
def actor_threads():
    """The single-process reference at an actor's torch thread count (Ray gives an actor one
    thread per CPU it holds, one here): a float32 reduction split over another number of threads
    can end an ulp apart (seen in `target_logprob`), and the test compares bytes."""
    from akd_cache.teacher.ray_pool import RaySettings  # needs ray: after the importorskip

    before = torch.get_num_threads()
    torch.set_num_threads(RaySettings().cpus_per_actor)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class DyingTeacher:
    """The tiny teacher, logging which process scored which batch; the first process to score
    `victim`'s batch is killed there with SIGKILL, as a lost machine would be."""

    def __init__(self, model: str, victim: str, log: Path) -> None:
        self.teacher = HFTeacher(model, k=K, batch_tokens=2048)
        self.victim, self.log = victim, log

    def score(self, samples):
        first = samples[0].sample_id
        dies = first == self.victim and f" {first} killed" not in self.log.read_text()
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {first}{' killed' if dies else ''}\n")
        if dies:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.teacher.score(samples)


def test_ray_cache_teacher_equals_a_single_process_run_and_redoes_a_killed_actors_shards(
        local_ray, tiny_models, codealpaca_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, tiny_models, codealpaca_path, "single", N_TRAIN)
    stages.prepare.main([])
    with actor_threads():
        stages.cache_teacher.main([])
    single = json.loads(Path("runs/teacher_cache.json").read_text())["location"]
    reference = TeacherCache(single)
    assert reference.meta.n_shards >= 3
    # the first sample of shard 1: its actor dies while scoring it
    victim = str(reference.sample_ids[list(reference.sample_shards).index(1)])
    log = tmp_path / "scored.log"
    log.touch()
    monkeypatch.setattr(akd_cache.teacher.build, "backend_factory",
                        lambda teacher, path, cache: partial(DyingTeacher, path, victim, log))
    write_params(tmp_path, tiny_models, codealpaca_path, "on-ray", N_TRAIN)
    stages.cache_teacher.main(["--ray", "--actors", "2"])
    on_ray = json.loads(Path("runs/teacher_cache.json").read_text())["location"]
    assert on_ray.startswith("on-ray/")
    assert_same_cache(on_ray, single)
    scored = [line.split() for line in log.read_text().splitlines()]
    assert len({pid for pid, *_ in scored}) >= 3  # two actors and the restarted one
    attempts = [entry for entry in scored if entry[1] == victim]
    assert [entry[2:] for entry in attempts] == [["killed"], []]
    dead = attempts[0][0]
    assert attempts[1][0] != dead
    assert [entry for entry in scored if entry[0] == dead][-1] == attempts[0]  # it died there


def test_ray_builds_a_cache_with_a_tail_shape_and_code_like_a_single_process_run(
        local_ray, tiny_models, codealpaca_path, tmp_path, monkeypatch):
    """The driver calibrates through an actor: the shape and the code are measured there."""
    monkeypatch.chdir(tmp_path)
    tails = {"tail_shape": True, "tail_rank": 4}
    write_params(tmp_path, tiny_models, codealpaca_path, "single", N_TAILED, cache=tails)
    stages.prepare.main([])
    with actor_threads():
        stages.cache_teacher.main([])
    single = json.loads(Path("runs/teacher_cache.json").read_text())["location"]
    write_params(tmp_path, tiny_models, codealpaca_path, "on-ray", N_TAILED, cache=tails)
    stages.cache_teacher.main(["--ray", "--actors", "2"])
    on_ray = json.loads(Path("runs/teacher_cache.json").read_text())["location"]
    assert TeacherCache(on_ray).meta.n_shards >= 2
    stored = {path.split("/")[1] for path in stored_bytes(on_ray)}
    assert {fmt.TAIL_SHAPE, fmt.TAIL_CODE} <= stored
    assert_same_cache(on_ray, single)
