"""Stage 1 on Ray: teacher backends on actors, each filling whole shards of the one store.

The driver keeps what a single-process run does itself: the writer lock, initialising the cache
(its vocabulary calibration scored on the first actor) and finalizing it. Only the shards move
out, handed to idle actors by Ray's `ActorPool`; each actor scores a shard with the same samples
in the same batches as `store.writer.fill_shard` does in one process, so the cache is the same
bytes. An actor that dies (a killed process, a lost node) is restarted by Ray and its shard's
task is run again (`max_restarts`, `max_task_retries`); a shard is only marked done once it is
written whole, so a half-written one is simply rewritten.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import fsspec
import ray
from ray.util import ActorPool
from tqdm.auto import tqdm

from akd_cache.store.format import TailCode, open_cache_group
from akd_cache.store.rows import Calibration, TeacherBackend, TeacherRows, TokenizedSample
from akd_cache.store.writer import ShardPlan, fill_shard

ACTOR_RETRIES = 3  # restarts of a dead actor, and reruns of the shard it held


@dataclass(frozen=True)
class RaySettings:
    """How many teacher actors, and what each takes: one GPU for a GPU teacher, else CPUs."""

    address: str | None = None  # None: join the cluster in RAY_ADDRESS, or start a local one
    actors: int | None = None  # None: one per GPU (GPU teacher) or per `cpus_per_actor` CPUs
    cpus_per_actor: int = 1


def connect(address: str | None) -> None:
    if not ray.is_initialized():
        ray.init(address=address)


class ShardWorker:
    """One teacher backend (loaded on first use) filling shards of the cache at `location`."""

    def __init__(self, location: str, samples: Sequence[TokenizedSample],
                 backend: Callable[[], TeacherBackend]) -> None:
        self.location = location
        self.samples = samples
        self.teacher = functools.cache(backend)

    def score(self, samples: Sequence[TokenizedSample]) -> list[TeacherRows]:
        return self.teacher().score(samples)

    def calibrate(self, samples: Sequence[TokenizedSample], tail_shape: bool,
                  tail_rank: int) -> Calibration:
        return self.teacher().calibrate(samples, tail_shape, tail_rank)

    def fill(self, plan: ShardPlan, shard: int) -> int:
        group = open_cache_group(self.location, mode="r+")
        fill_shard(group, plan, shard, self.samples, self.teacher())
        return sum(self.samples[i].n_loss_rows for i in plan.samples_in(shard))


class RemoteTeacher:
    """The teacher on an actor, as the driver calibrates with it: it scores, or calibrates a
    modelled tail on the actor's backend (an hf teacher: the profile refuses those settings for
    any other), so the driver never loads a teacher."""

    def __init__(self, actor: ray.actor.ActorHandle) -> None:
        self.actor = actor

    def score(self, samples: Sequence[TokenizedSample]) -> list[TeacherRows]:
        return ray.get(self.actor.score.remote(samples))

    def calibrate(self, samples: Sequence[TokenizedSample], tail_shape: bool,
                  tail_rank: int) -> Calibration:
        return ray.get(self.actor.calibrate.remote(samples, tail_shape, tail_rank))

    def use_tail_code(self, code: TailCode | None) -> None:
        """Nothing to do: each actor reads the code from the cache before it fills a shard
        (`store.writer.fill_shard`)."""


class RayTeacherPool:
    """The `ShardRunner` of a Ray run, and the backend factory its driver calibrates with.

    Actors start on first use, so a cache that is already complete starts none."""

    def __init__(self, location: str, samples: Sequence[TokenizedSample],
                 backend: Callable[[], TeacherBackend], gpu: bool, settings: RaySettings) -> None:
        fs, path = fsspec.core.url_to_fs(location)
        # actors run in other folders, on a cluster on other machines: a local location is made
        # absolute, and must then be on a filesystem every node mounts (or use s3://...)
        self.location = fs.unstrip_protocol(path)
        self.samples = samples
        self.backend = backend
        self.gpu = gpu
        self.settings = settings

    def _actor_count(self) -> int:
        if self.settings.actors is not None:
            return self.settings.actors
        resources = ray.cluster_resources()
        if self.gpu:
            return max(1, int(resources.get("GPU", 0)))
        return max(1, int(resources.get("CPU", 1)) // self.settings.cpus_per_actor)

    @functools.cached_property
    def actors(self) -> list[ray.actor.ActorHandle]:
        connect(self.settings.address)
        resources = {"num_gpus": 1} if self.gpu else {"num_cpus": self.settings.cpus_per_actor}
        worker = ray.remote(ShardWorker).options(
            **resources, max_restarts=ACTOR_RETRIES, max_task_retries=ACTOR_RETRIES
        )
        # held here: a restarted actor is constructed from it again
        self._samples_ref = ray.put(list(self.samples))
        return [worker.remote(self.location, self._samples_ref, self.backend)
                for _ in range(self._actor_count())]

    def teacher(self) -> TeacherBackend:
        return RemoteTeacher(self.actors[0])

    def __call__(self, plan: ShardPlan, shards: list[int]) -> None:
        total = sum(self.samples[i].n_loss_rows for s in shards for i in plan.samples_in(s))
        plan_ref = ray.put(plan)
        pool = ActorPool(self.actors)
        try:
            with tqdm(total=total, unit="tok", desc=f"teacher cache, {len(self.actors)} "
                      "Ray actors") as bar:
                for rows in pool.map_unordered(lambda a, s: a.fill.remote(plan_ref, s), shards):
                    bar.update(rows)
        finally:
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
            del self.actors, self._samples_ref
