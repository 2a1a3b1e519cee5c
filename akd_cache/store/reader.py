"""Read a teacher cache: random access by sample, and a torch Dataset + collate for Stage 2.

The reader refuses an incomplete cache unless told otherwise, a cache whose key is not the hash
of its ingredients, one with a missing or truncated shard or chunk file (zarr would read fill
values), and a student whose tokenizer differs from the teacher's: top-k ids from another
vocabulary would train silently on the wrong tokens. Bytes that fail their crc32c raise a
`DamageError` when read.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
import zarr
from transformers import PreTrainedTokenizerBase

from akd_cache.errors import CacheError
from akd_cache.store import format as fmt
from akd_cache.store import integrity
from akd_cache.store.key import tokenizer_fingerprint


@dataclass(frozen=True)
class CachedSample:
    sample_id: str
    input_ids: np.ndarray  # [L] int64
    prompt_len: int
    topk_ids: np.ndarray  # [L - P, k] int64, ascending in the renumbered vocabulary
    topk_logprobs: np.ndarray  # [L - P, k] float32
    tail_logmass: np.ndarray  # [L - P] float32
    target_logprob: np.ndarray  # [L - P] float32
    tail_code: np.ndarray | None = None  # [L - P, r] float32 z, for a cache with a tail code


DenseTailMode = Literal["uniform", "shape", "lowrank", "renormalize"]
"""The tail modes that define a full-vocabulary teacher distribution (Stage 2's names).

``bucket`` is not one of them: it compares only the tail's total mass with the student's, so it
assumes nothing about how that mass splits over the V - k other ids and no dense form exists.
"""


def dense_logprobs(
    topk_ids: np.ndarray,
    topk_logprobs: np.ndarray,
    tail_logmass: np.ndarray,
    vocab_size: int,
    tail_mode: DenseTailMode,
    log_tail_shape: np.ndarray | None = None,
    tail_code: tuple[np.ndarray, fmt.TailCode] | None = None,
) -> np.ndarray:
    """The teacher distribution Stage 2 trains against, as [n, V] float32 log-probs.

    - ``uniform``: the exact tail mass spread evenly over the V - k ids outside the top-k.
      (Stage 2 floors an empty tail at float64 eps to keep RKL finite; here it stays -inf.)
    - ``shape``: the exact tail mass spread over the ids outside the row's top-k in proportion
      to the cache's tail shape s (`log_tail_shape` = log s, [V]).
    - ``lowrank``: the exact tail mass spread over the ids outside the row's top-k as
      softmax(bias + basis @ z) there (`tail_code` = (z [n, r], the cache's `TailCode`)).
    - ``renormalize``: the top-k alone, rescaled to sum to 1; every other id gets -inf, so the
      KL from a full teacher is infinite wherever the tail is not empty.
    """
    n, k = topk_ids.shape
    if (tail_mode == "shape") != (log_tail_shape is not None):
        raise ValueError("log_tail_shape is needed by the 'shape' tail mode and by no other")
    if (tail_mode == "lowrank") != (tail_code is not None):
        raise ValueError("tail_code is needed by the 'lowrank' tail mode and by no other")
    if tail_mode in ("shape", "lowrank"):
        # both give every row's tail ids log-weights, normalised over the ids outside its top-k
        if tail_mode == "shape":
            weights = np.repeat(log_tail_shape.astype(np.float64)[None, :], n, axis=0)
        else:
            z, code = tail_code
            weights = code.bias.astype(np.float64) + z.astype(np.float64) @ code.basis.T.astype(
                np.float64)
        np.put_along_axis(weights, topk_ids, -np.inf, axis=1)
        peak = weights.max(axis=1, keepdims=True)
        with np.errstate(invalid="ignore"):  # k = V: no tail ids; the top-k overwrites all
            log_norm = peak + np.log(np.exp(weights - peak).sum(axis=1, keepdims=True))
            dense = tail_logmass.astype(np.float64)[:, None] + weights - log_norm
        np.put_along_axis(dense, topk_ids, topk_logprobs.astype(np.float64), axis=1)
        return dense.astype(np.float32)
    if tail_mode == "uniform":
        fill = (tail_logmass.astype(np.float64) - math.log(vocab_size - k)
                if k < vocab_size else np.full(n, -np.inf))
        values = topk_logprobs
    elif tail_mode == "renormalize":
        fill = np.full(n, -np.inf)
        top = topk_logprobs.astype(np.float64)
        peak = top.max(axis=1, keepdims=True)
        values = top - peak - np.log(np.exp(top - peak).sum(axis=1, keepdims=True))
    else:
        raise ValueError(f"tail mode {tail_mode!r} has no full-vocabulary form; "
                         f"expected one of {get_args(DenseTailMode)}")
    dense = np.repeat(fill.astype(np.float32)[:, None], vocab_size, axis=1)
    np.put_along_axis(dense, topk_ids, values.astype(np.float32), axis=1)
    return dense


class TeacherCache:
    def __init__(
        self, location: str, allow_incomplete: bool = False, check_files: bool = True
    ) -> None:
        """`check_files=False` skips the presence check of every shard, for `akd inspect`,
        which reports damage itself."""
        self.group, meta = integrity.open_cache(location)
        if not meta.complete and not allow_incomplete:
            try:
                done = f"{int(self.group['shard_done'][:].sum())} of {meta.n_shards} shards"
            except (KeyError, *integrity.DECODE_ERRORS, *fmt.METADATA_ERRORS):
                done = f"{meta.n_shards} shards, its shard_done flags unreadable"
            raise CacheError(
                f"{location}: incomplete cache ({done}); resume the cache stage, or pass "
                "allow_incomplete=True"
            )
        if check_files:
            damage = integrity.find_damage(self.group, location, meta, full=False)
            if damage:
                raise integrity.damage_error(location, damage)
        self.location = location
        self.meta = meta
        try:
            self._tables = integrity.read_tables(self.group)
            self.sample_ids = self.group["samples/sample_id"][:]
            vocab_rank = self.group["vocab_rank"][:].astype(np.int64)
            # log of the tail shape [V] (`store.format`), or None for a cache without one
            self.log_tail_shape: np.ndarray | None = (
                self.group[fmt.TAIL_SHAPE][:] if meta.ingredients["tail_shape"] else None
            )
            # the per-cache half of the tail code, or None for a cache without one
            self.tail_code: fmt.TailCode | None = (
                fmt.TailCode.read(self.group) if meta.ingredients.get("tail_rank") else None
            )
            self._arrays = {name: self.group[f"rows/{name}"] for name in
                            ("ids", "codes", "tail_logmass", "target_logprob")}
            self._arrays["tokens"] = self.group["tokens"]
            if self.tail_code is not None:
                self._arrays[fmt.TAIL_CODE] = self.group[fmt.TAIL_CODE_ROWS]
        except (KeyError, *integrity.DECODE_ERRORS, *fmt.METADATA_ERRORS):
            damage = integrity.find_damage(self.group, location, meta, full=True)
            if not damage:
                raise
            raise integrity.damage_error(location, damage) from None
        self._index = integrity.SampleIndex(self._tables, meta.shard_rows)
        self._vocab_order = np.empty_like(vocab_rank)
        self._vocab_order[vocab_rank] = np.arange(len(vocab_rank))
        self.shard_rows = self._arrays["ids"].shards[0]
        # entries per decoded block: the arrays' chunks, as zarr decodes whole chunks anyway
        self._block_sizes = {name: array.chunks[0] for name, array in self._arrays.items()}
        row_blocks = self.shard_rows // self._block_sizes["ids"]
        self._block = functools.lru_cache(
            maxsize=(len(self._arrays) - 1) * row_blocks + self._token_blocks_per_shard()
        )(self._read_block)

    def _token_blocks_per_shard(self) -> int:
        """Most token chunks any one shard's samples touch (+1 for a range cut by the ends)."""
        starts, lengths = self._tables["seq_start"], self._tables["seq_len"]
        if not len(starts):
            return 1
        shards = self._tables["row_start"] // self.shard_rows
        first = np.full(shards.max() + 1, np.iinfo(np.int64).max)
        last = np.zeros(shards.max() + 1, dtype=np.int64)
        np.minimum.at(first, shards, starts)
        np.maximum.at(last, shards, starts + lengths)
        used = last > 0
        span = (last[used] - first[used]).max()
        return int(span) // self._block_sizes["tokens"] + 2

    def _read(self, array: zarr.Array, start: int, stop: int) -> np.ndarray:
        return integrity.read_guarded(array, slice(start, stop), self._index, self.location)

    def _read_block(self, name: str, block: int) -> np.ndarray:
        array, size = self._arrays[name], self._block_sizes[name]
        return self._read(array, block * size, min((block + 1) * size, array.shape[0]))

    def _rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Entries [start, stop) of a row array or `tokens`, through a cache of decoded chunks:
        zarr decodes a whole chunk per read anyway (and each read costs ~1 ms of overhead),
        and a sample's neighbours in the trainer's shard-by-shard order are in the same one."""
        size = self._block_sizes[name]
        first, last = start // size, (stop - 1) // size
        parts = [self._block(name, b) for b in range(first, last + 1)]
        joined = parts[0] if len(parts) == 1 else np.concatenate(parts)
        offset = first * size
        return joined[start - offset : stop - offset]

    @property
    def sample_shards(self) -> np.ndarray:
        return self._tables["row_start"] // self.shard_rows

    @property
    def key(self) -> str:
        return self.meta.key

    @property
    def k(self) -> int:
        return self.meta.k

    @property
    def ingredients(self) -> dict:
        return self.meta.ingredients

    def __len__(self) -> int:
        return len(self.sample_ids)

    def check_student(
        self, tokenizer: PreTrainedTokenizerBase, expected_key: str | None = None
    ) -> None:
        """Raise unless the student shares the teacher's tokenizer (and the key, if given)."""
        if expected_key is not None and expected_key != self.key:
            raise CacheError(
                f"{self.location}: cache key {self.key} differs from the expected {expected_key}; "
                "run `akd cache-teacher` for the current params"
            )
        theirs = self.ingredients["tokenizer_sha256"]
        ours = tokenizer_fingerprint(tokenizer)
        if ours != theirs:
            raise CacheError(
                f"{self.location}: the student's tokenizer ({tokenizer.name_or_path}, sha256 "
                f"{ours[:12]}) differs from the teacher's (sha256 {theirs[:12]}); a cache can "
                "only train a student with the teacher's vocabulary"
            )

    def __getitem__(self, index: int) -> CachedSample:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is outside [0, {len(self)})")
        t = {name: int(values[index]) for name, values in self._tables.items()}
        start, stop = t["row_start"], t["row_start"] + t["n_rows"]
        tail = self._rows("tail_logmass", start, stop)
        return CachedSample(
            sample_id=str(self.sample_ids[index]),
            input_ids=self._rows(
                "tokens", t["seq_start"], t["seq_start"] + t["seq_len"]
            ).astype(np.int64),
            prompt_len=t["prompt_len"],
            topk_ids=fmt.decode_ids(self._rows("ids", start, stop), self._vocab_order),
            topk_logprobs=fmt.decode_logprobs(self._rows("codes", start, stop), tail),
            tail_logmass=tail,
            target_logprob=self._rows("target_logprob", start, stop),
            tail_code=None if self.tail_code is None
            else self.tail_code.decode(self._rows(fmt.TAIL_CODE, start, stop)),
        )


    def dense_logprobs(self, index: int, tail_mode: DenseTailMode) -> np.ndarray:
        """Sample `index`'s teacher rows over the full vocabulary, [L - P, V] float32 log-probs,
        under `tail_mode`'s assumption about the tail (see `dense_logprobs`)."""
        if tail_mode == "shape" and self.log_tail_shape is None:
            raise CacheError(f"{self.location}: no tail shape stored (built without "
                             "cache.tail_shape), so the 'shape' tail mode has no distribution")
        if tail_mode == "lowrank" and self.tail_code is None:
            raise CacheError(f"{self.location}: no tail code stored (built without "
                             "cache.tail_rank), so the 'lowrank' tail mode has no distribution")
        sample = self[index]
        return dense_logprobs(
            sample.topk_ids, sample.topk_logprobs, sample.tail_logmass, self.meta.vocab_size,
            tail_mode, self.log_tail_shape if tail_mode == "shape" else None,
            (sample.tail_code, self.tail_code) if tail_mode == "lowrank" else None,
        )


class CacheDataset(torch.utils.data.Dataset):
    """Samples of a cache as tensors; use `collate` to batch them."""

    def __init__(self, cache: TeacherCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> CachedSample:
        return self.cache[index]


class ShardShuffleSampler(torch.utils.data.Sampler[int]):
    """A fresh random order every epoch that visits the shards one at a time (in random order),
    so each compressed chunk is decoded once per epoch instead of once per sample."""

    def __init__(self, cache: TeacherCache, seed: int = 0) -> None:
        self.shards = cache.sample_shards
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.shards)

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        for shard in rng.permutation(np.unique(self.shards)):
            yield from rng.permutation(np.flatnonzero(self.shards == shard)).tolist()


def share_with_workers() -> None:
    """Let DataLoader workers hand batches over as named files in shared memory rather than
    as passed file descriptors: 1.3x the rows per second through 1 or 2 workers on the
    project's machine (docs/benchmarks.md). Process-wide; for a process that reads with workers."""
    torch.multiprocessing.set_sharing_strategy("file_system")


def collate(samples: list[CachedSample], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded token tensors [B, W], and the teacher rows of the loss positions only.

    `loss_mask[b, j]` is true where position j predicts a response token or the EOS. The teacher
    tensors (`topk_ids`, `topk_logprobs` [R, k], `tail_logmass` [R], `tail_code` [R, r] for a
    cache with one) hold one row per such position, in `x[loss_mask]`'s order, so they line up
    with `hidden[loss_mask]`. Prompt and padding positions get no row and ids are int32 (`.long()`
    them to index): DataLoader workers hand over a third of the bytes of padded int64 rows
    (docs/benchmarks.md).
    """
    width = max(len(s.input_ids) for s in samples)
    batch = len(samples)
    out = {
        "input_ids": torch.full((batch, width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(batch, width, dtype=torch.long),
        "loss_mask": torch.zeros(batch, width, dtype=torch.bool),
        "labels": torch.zeros(batch, width, dtype=torch.long),
    }
    for b, s in enumerate(samples):
        length, rows = len(s.input_ids), slice(s.prompt_len - 1, len(s.input_ids) - 1)
        out["input_ids"][b, :length] = torch.from_numpy(s.input_ids)
        out["attention_mask"][b, :length] = 1
        out["loss_mask"][b, rows] = True
        out["labels"][b, rows] = torch.from_numpy(s.input_ids[s.prompt_len :])
    out["topk_ids"] = torch.from_numpy(np.concatenate([s.topk_ids for s in samples]).astype(
        np.int32))
    for name in ("topk_logprobs", "tail_logmass"):
        out[name] = torch.from_numpy(np.concatenate([getattr(s, name) for s in samples]))
    if samples[0].tail_code is not None:
        out["tail_code"] = torch.from_numpy(np.concatenate([s.tail_code for s in samples]))
    return out
