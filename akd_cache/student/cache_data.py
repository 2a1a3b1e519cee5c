"""The teacher cache as Stage 2 reads it: at the training temperature, or refused.

A cache holds the teacher at its `cache.temperature`. Training at another temperature on those
rows would mix two temperatures without a word, so it is refused, unless `train.temper_cache`
asks to temper a T = 1 cache with `temper_teacher` (exact within the top-k; the tail is assumed
spread evenly over the other V - k ids, see its docstring).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from akd_cache.config import DistillationExperiment, Experiment, TrainConfig
from akd_cache.errors import ConfigError
from akd_cache.store.reader import CacheDataset, CachedSample, TeacherCache
from akd_cache.student.loss import temper_teacher


class TemperedCacheDataset(CacheDataset):
    """A T = 1 cache's samples with their teacher rows tempered to `temperature`."""

    def __init__(self, cache: TeacherCache, temperature: float) -> None:
        super().__init__(cache)
        self.temperature = temperature

    def __getitem__(self, index: int) -> CachedSample:
        sample = self.cache[index]
        top, tail = temper_teacher(
            torch.from_numpy(sample.topk_logprobs), torch.from_numpy(sample.tail_logmass),
            self.temperature, self.cache.meta.vocab_size,
        )
        return replace(sample, topk_logprobs=top.numpy(), tail_logmass=tail.numpy())


def cache_dataset(
    cache: TeacherCache, experiment: Experiment, train: TrainConfig
) -> CacheDataset:
    """The dataset an experiment trains on; refuses a cache at another temperature when the
    experiment reads the cached teacher rows (a cached distillation run)."""
    cached = cache.ingredients["temperature"]
    reads_rows = isinstance(experiment, DistillationExperiment) and not experiment.online
    if not reads_rows:
        return CacheDataset(cache)
    if train.temper_cache:
        if cached != 1.0:
            raise ConfigError(
                f"train.temper_cache tempers a T = 1 cache, and {cache.location} is at T = "
                f"{cached}: remove train.temper_cache and set train.temperature to {cached}, or "
                "build the cache at train.temperature"
            )
        return TemperedCacheDataset(cache, train.temperature)
    if train.temperature != cached:
        raise ConfigError(
            f"train.temperature={train.temperature} differs from the temperature of the cache "
            f"{cache.location} (T = {cached}): set cache.temperature to {train.temperature} and "
            f"run `akd cache-teacher`, or set train.temperature to {cached}"
            + (", or temper it with train.temper_cache: true (approximate tail)"
               if cached == 1.0 else "")
        )
    return CacheDataset(cache)
