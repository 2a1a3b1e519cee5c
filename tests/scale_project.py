"""A tiny akd project on disk for the scale-out tests: params for the tiny models, prepared data,
and how two caches are compared (decoded samples and every stored byte)."""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import yaml

from akd_cache.store.reader import TeacherCache

K = 16
MAX_LENGTH = 128
SHARD_TOKENS = 1024  # the smallest allowed: several shards from a few dozen samples


def write_params(workdir: Path, tiny_models: dict[str, Path], dataset: Path, cache_root: str,
                 n_train: int, cache: dict[str, object] | None = None, **train: object) -> Path:
    doc = {"profile": "tiny", "profiles": {"tiny": {
        "data": {"dataset": str(dataset), "heldout": 4, "max_train_samples": n_train},
        "teacher": {"model": str(tiny_models["llama"]), "batch_tokens": 2048},
        "student": {"model": str(tiny_models["gpt_bigcode"])},
        "cache": {"k": K, "max_length": MAX_LENGTH, "shard_tokens": SHARD_TOKENS,
                  "template": "alpaca", "root": cache_root, **(cache or {})},
        "train": {"batch_size": 4, "max_steps": 2, "lr": 1e-3, "save_steps": 100, **train},
    }}, "experiments": {"kd": {"method": "kd"}}}
    path = workdir / "params.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def stored_bytes(location: str) -> dict[str, bytes]:
    """Every object of a cache by its path inside it, the group's attributes left out: they
    hold the creation time."""
    fs, root = fsspec.core.url_to_fs(location)
    root = root.rstrip("/")
    return {path[len(root):]: fs.cat_file(path) for path in fs.find(root)
            if path != f"{root}/zarr.json"}


def assert_same_cache(location: str, reference: str) -> None:
    """The same stored bytes, chunk by chunk, the same attributes but the creation time, and the
    same decoded samples."""
    got, want = stored_bytes(location), stored_bytes(reference)
    assert sorted(got) == sorted(want)
    assert [name for name in want if got[name] != want[name]] == []
    a, b = TeacherCache(location), TeacherCache(reference)
    assert a.meta.model_copy(update={"created": ""}) == b.meta.model_copy(update={"created": ""})
    for i in range(len(b)):
        x, y = a[i], b[i]
        for field in ("input_ids", "topk_ids", "topk_logprobs", "tail_logmass", "target_logprob"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field), err_msg=field)
    assert a.meta.complete
