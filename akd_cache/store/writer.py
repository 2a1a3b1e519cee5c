"""Fill a teacher cache shard by shard: resumable, shardable across workers, locked.

Every sample's loss rows go to exactly one shard, planned up front from the tokenised lengths,
so shards hold whole samples and any worker can compute any shard alone. A shard is written with
one call per array (zarr's sharding loses concurrent partial writes into one shard, and here
there are none), then its `shard_done` flag is set. A re-run skips done shards and recomputes
the rest from the same samples in the same batches, so the result equals an uninterrupted run.
The group's `complete` flag is written last, by `finalize`, once every shard is done.

Opening an existing cache checks it in full first (`store.integrity`): damaged row shards get
their `shard_done` flag cleared and are computed again, damaged sample tables are rewritten from
the samples, and damaged attributes that still name this cache are restored, so a repaired
cache equals an undamaged one bit for bit.
"""

from __future__ import annotations

import datetime
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import zarr
from tqdm.auto import tqdm

from akd_cache import __version__
from akd_cache.errors import CacheError, ConfigError, DamageError, DataError, ModelError
from akd_cache.store import format as fmt
from akd_cache.store import integrity
from akd_cache.store.key import CacheIngredients, hash_key
from akd_cache.store.lock import WriterLock
from akd_cache.store.rows import (
    Calibration,
    TailModelBackend,
    TeacherBackend,
    TeacherRows,
    TokenizedSample,
)
from akd_cache.store.stats import cache_stats

SCORE_BATCH_SAMPLES = 64
INIT_WAIT_S = 3600.0
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardPlan:
    row_start: np.ndarray  # [S] int64, padded row axis
    shard_of: np.ndarray  # [S] int64
    shard_rows: int
    n_shards: int

    @property
    def n_rows_padded(self) -> int:
        return self.n_shards * self.shard_rows

    def samples_in(self, shard: int) -> np.ndarray:
        return np.flatnonzero(self.shard_of == shard)


def plan_shards(n_rows: Sequence[int], shard_rows: int) -> ShardPlan:
    """Greedy in sample order: a sample that does not fit the current shard opens the next."""
    row_start = np.zeros(len(n_rows), dtype=np.int64)
    shard_of = np.zeros(len(n_rows), dtype=np.int64)
    shard, used = 0, 0
    for i, n in enumerate(n_rows):
        if n > shard_rows:
            raise ConfigError(f"sample {i} has {n} loss rows, more than shard_rows={shard_rows}; "
                              "raise cache.shard_tokens above cache.max_length")
        if used + n > shard_rows:
            shard, used = shard + 1, 0
        row_start[i], shard_of[i] = shard * shard_rows + used, shard
        used += n
    return ShardPlan(row_start, shard_of, shard_rows, shard + 1 if n_rows else 0)


class IncompatibleCacheError(CacheError):
    pass


def calibration_samples(samples: Sequence[TokenizedSample]) -> list[TokenizedSample]:
    """The first samples, up to `CALIBRATION_ROWS` loss rows (at least one sample)."""
    rows = np.cumsum([s.n_loss_rows for s in samples])
    return list(samples[: max(1, int(np.searchsorted(rows, fmt.CALIBRATION_ROWS)))])


def open_or_init(
    location: str,
    samples: Sequence[TokenizedSample],
    ingredients: CacheIngredients,
    vocab_size: int,
    shard_rows: int,
    teacher: Callable[[], TeacherBackend],
) -> tuple[zarr.Group, ShardPlan]:
    """Open the cache at `location` (checked, and repaired where it can be), creating its layout
    and sample tables if it is new.

    Only a new cache calls `teacher`, to calibrate the vocabulary renumbering.
    """
    group = integrity.open_group(location, mode="a")
    raw = group.attrs.get(fmt.ATTRS)
    stored_rows = stored_shard_rows(group) if raw is not None else None
    if stored_rows is not None and stored_rows != shard_rows:
        log.warning("%s: laid out in shards of %d rows; it continues in them (cache.shard_tokens "
                    "%d lays out new caches only)", location, stored_rows, shard_rows)
        shard_rows = stored_rows
    plan = plan_shards([s.n_loss_rows for s in samples], shard_rows)
    fresh = new_meta(ingredients, samples, plan, vocab_size)
    if raw is not None:
        meta = stored_meta(group, location, raw, fresh)
        repair(group, location, meta, samples, plan, vocab_size)
        return group, plan
    top = max((max(s.input_ids) for s in samples if s.input_ids), default=-1)
    if top >= vocab_size:
        raise ModelError(f"token id {top} is outside the vocabulary of {vocab_size}; "
                         "the tokenizer does not belong to the model")
    backend = teacher()  # before the layout: a teacher that cannot load leaves nothing behind
    fmt.create_layout(
        group, n_rows_padded=plan.n_rows_padded, shard_rows=shard_rows, n_shards=plan.n_shards,
        k=ingredients.k, vocab_size=vocab_size, n_tokens=fresh.n_tokens,
        tail_rank=ingredients.tail_rank,
    )
    tokens = write_tables(group, samples, plan, vocab_size)
    calibration = calibrate(backend, calibration_samples(samples), ingredients)
    calibration_ids = np.concatenate([r.topk_ids for r in calibration.rows])
    common = {"compressors": fmt.CODECS, "config": fmt.WRITE_EVERY_CHUNK, "overwrite": True}
    group.create_array(
        "vocab_rank", data=fmt.vocab_rank(calibration_ids, tokens, vocab_size), **common
    )
    if calibration.mean_tail is not None:
        group.create_array(fmt.TAIL_SHAPE, data=fmt.log_tail_shape(calibration.mean_tail),
                           **common)
    if calibration.tail_code is not None:
        calibration.tail_code.write(group)
    fresh.write(group)
    return group, plan


def calibrate(backend: TeacherBackend, samples: Sequence[TokenizedSample],
              ingredients: CacheIngredients) -> Calibration:
    """One pass of the teacher over the calibration samples, with what the cache's tail model
    needs from them; a backend that sees only the top-k can calibrate a plain cache alone."""
    if not (ingredients.tail_shape or ingredients.tail_rank):
        return Calibration(backend.score(samples))
    if not isinstance(backend, TailModelBackend):
        setting, needs = (("tail_shape", "measure a tail shape") if ingredients.tail_shape
                          else ("tail_rank", "code hidden states"))
        raise ConfigError(f"cache.{setting}: the {type(backend).__name__} teacher backend "
                          f"cannot {needs}; use teacher.backend 'hf'")
    return backend.calibrate(samples, ingredients.tail_shape, ingredients.tail_rank)


def new_meta(
    ingredients: CacheIngredients, samples: Sequence[TokenizedSample], plan: ShardPlan,
    vocab_size: int,
) -> fmt.CacheMeta:
    return fmt.CacheMeta(
        key=ingredients.key(),
        ingredients=ingredients.to_dict(),
        tool_version=__version__,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        n_samples=len(samples),
        n_rows=sum(s.n_loss_rows for s in samples),
        n_tokens=sum(len(s.input_ids) for s in samples),
        k=ingredients.k,
        vocab_size=vocab_size,
        shard_rows=plan.shard_rows,
        n_shards=plan.n_shards,
        complete=False,
    )


def write_tables(
    group: zarr.Group, samples: Sequence[TokenizedSample], plan: ShardPlan, vocab_size: int
) -> np.ndarray:
    """`tokens` and the `samples/` tables, all decided by the samples; returns the tokens."""
    tokens = np.concatenate([np.asarray(s.input_ids) for s in samples])
    fmt.writable(group, "tokens")[:] = tokens.astype(fmt.id_dtype(vocab_size))
    seq_len = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
    tables = {
        "row_start": plan.row_start,
        "n_rows": np.array([s.n_loss_rows for s in samples], dtype=np.int64),
        "seq_start": np.concatenate([[0], np.cumsum(seq_len)[:-1]]).astype(np.int64),
        "seq_len": seq_len,
        "prompt_len": np.array([s.prompt_len for s in samples], dtype=np.int64),
    }
    sample_group = group.create_group("samples", overwrite=True)
    common = {"compressors": fmt.CODECS, "config": fmt.WRITE_EVERY_CHUNK, "overwrite": True}
    for name, values in tables.items():
        sample_group.create_array(name, data=values, **common)
    ids = sample_group.create_array(
        "sample_id", shape=(len(samples),), dtype=str, compressors=fmt.CHECKSUM,
        config=fmt.WRITE_EVERY_CHUNK, overwrite=True,
    )
    ids[:] = np.array([s.sample_id for s in samples], dtype=object)
    return tokens


def stored_shard_rows(group: zarr.Group) -> int | None:
    """The shard size the cache was laid out in, from its arrays (its attributes may be damaged):
    no key ingredient, so an experiment that asks for another one shares the cache, and its
    shards must go where the stored tables put each sample's rows. None if the array is
    missing or its metadata does not decode (damage, which `repair` names)."""
    try:
        return group["rows/ids"].shards[0]
    except (KeyError, *fmt.METADATA_ERRORS):
        return None


def check_layout(group: zarr.Group, location: str, fresh: fmt.CacheMeta) -> None:
    """Refuse a cache whose stored shard count is not what its own layout plans for these
    samples: writing into it would put samples' rows where the tables say other samples' are."""
    try:
        stored = group["shard_done"].shape[0]
    except (KeyError, *fmt.METADATA_ERRORS):
        return  # a missing or undecodable array is damage: `repair` names it
    if stored != fresh.n_shards:
        raise IncompatibleCacheError(
            f"{location}: shard_done has {stored} shards, but these samples in shards of "
            f"{fresh.shard_rows} rows take {fresh.n_shards}; move that folder away to rebuild it"
        )


def stored_meta(group: zarr.Group, location: str, raw: object, fresh: fmt.CacheMeta
                ) -> fmt.CacheMeta:
    """The stored attributes, if they are this cache's, laid out as `fresh` plans (in the stored
    shard size: `open_or_init`). Attributes that fail their checks but still name this cache
    (by the stored key, or by the hash of the stored ingredients) are restored from `fresh`,
    keeping their creation time."""
    raw = raw if isinstance(raw, dict) else {}
    stored = raw.get("ingredients")
    names = {raw.get("key"), hash_key(stored) if isinstance(stored, dict) else None}
    if fresh.key not in names:
        raise IncompatibleCacheError(
            f"{location}: holds cache {raw.get('key')}, not {fresh.key}; "
            "a cache location is tied to its key; move that folder away or change cache.root"
        )
    check_layout(group, location, fresh)
    try:
        meta = fmt.CacheMeta.read(group, location)
        integrity.check_identity(meta, location)
        if meta.key == fresh.key:
            return meta
        raise DamageError(f"{location}: attribute key {meta.key} is not {fresh.key}")
    except DamageError as err:
        log.warning("%s; restoring the attributes", err)
    kept = {name: raw[name] for name in ("created", "tool_version")
            if isinstance(raw.get(name), str)}
    restored = fresh.model_copy(update=kept)
    restored.write(group)
    return restored


def repair(
    group: zarr.Group, location: str, meta: fmt.CacheMeta, samples: Sequence[TokenizedSample],
    plan: ShardPlan, vocab_size: int,
) -> None:
    """Check every stored byte; mark damaged row shards to be computed again and rewrite damaged
    sample tables. A damaged `vocab_rank`, `tail_shape`, `tail_code/` part or array definition
    cannot be restored exactly."""
    damage = integrity.find_damage(group, location, meta, full=True)
    if not damage:
        return
    for d in damage:
        log.warning("%s; rewriting it", d.line(location))
    if not all(d.rewritable for d in damage):
        raise integrity.damage_error(location, damage)
    if any(d.array == "tokens" or d.array in fmt.SAMPLE_ARRAYS for d in damage):
        write_tables(group, samples, plan, vocab_size)
    flags = fmt.writable(group, "shard_done")
    for shard in sorted({d.shard for d in damage if d.shard is not None}):
        flags[shard] = 0
    meta.model_copy(update={"complete": False, "stats": None}).write(group)


def write_shard(
    group: zarr.Group, plan: ShardPlan, shard: int, rows: Sequence[TeacherRows]
) -> None:
    vocab_rank = group["vocab_rank"][:]
    k = group["rows/ids"].shape[1]
    ids = np.zeros((plan.shard_rows, k), dtype=vocab_rank.dtype)
    codes = np.zeros((plan.shard_rows, k), dtype=np.uint8)
    tail = np.zeros(plan.shard_rows, dtype=np.float32)
    target = np.zeros(plan.shard_rows, dtype=np.float32)
    coded = fmt.TAIL_CODE_ROWS in group
    if coded:
        tail_code = np.zeros((plan.shard_rows, group[fmt.TAIL_CODE_ROWS].shape[1]),
                             dtype=fmt.TAIL_CODE_DTYPE)
    base = shard * plan.shard_rows
    for sample, r in zip(plan.samples_in(shard), rows):
        enc = fmt.encode_rows(r.topk_ids, r.topk_logprobs, r.tail_logmass, r.target_logprob,
                              vocab_rank)
        lo = plan.row_start[sample] - base
        hi = lo + len(r)
        ids[lo:hi], codes[lo:hi], tail[lo:hi], target[lo:hi] = (
            enc.ids, enc.codes, enc.tail_logmass, enc.target_logprob
        )
        if coded:
            tail_code[lo:hi] = r.tail_code
    window = slice(base, base + plan.shard_rows)
    for path, values in zip(fmt.ROW_ARRAYS, (ids, codes, tail, target)):
        fmt.writable(group, path)[window] = values
    if coded:
        fmt.writable(group, fmt.TAIL_CODE_ROWS)[window] = tail_code
    fmt.writable(group, "shard_done")[shard] = 1


def worker_shards(n_shards: int, worker_index: int, num_workers: int) -> list[int]:
    return list(range(worker_index, n_shards, num_workers))


def fill_shard(
    group: zarr.Group,
    plan: ShardPlan,
    shard: int,
    samples: Sequence[TokenizedSample],
    teacher: TeacherBackend,
    progress: Callable[[int], object] = lambda rows: None,
) -> None:
    """Score one shard's samples, in the batches every run uses, and write the shard whole: any
    process holding the samples can do it alone, so a shard is the unit workers share out."""
    members = [samples[i] for i in plan.samples_in(shard)]
    code = fmt.TailCode.read(group) if fmt.TAIL_CODE in group else None
    if isinstance(teacher, TailModelBackend):  # also clears a code left by another cache
        teacher.use_tail_code(code)
    elif code is not None:
        raise ConfigError(f"cache.tail_rank: the {type(teacher).__name__} teacher backend "
                          "cannot code hidden states; use teacher.backend 'hf'")
    rows: list[TeacherRows] = []
    for start in range(0, len(members), SCORE_BATCH_SAMPLES):
        batch = members[start : start + SCORE_BATCH_SAMPLES]
        rows.extend(teacher.score(batch))
        progress(sum(s.n_loss_rows for s in batch))
    write_shard(group, plan, shard, rows)


ShardRunner = Callable[[ShardPlan, list[int]], None]
"""Fills the given shards of the cache being filled (each with `fill_shard`), elsewhere than in
this process: `teacher.ray_pool.RayTeacherPool` runs them on Ray actors."""


def fill(
    location: str,
    samples: Sequence[TokenizedSample],
    ingredients: CacheIngredients,
    vocab_size: int,
    backend: Callable[[], TeacherBackend],
    shard_rows: int,
    worker_index: int = 0,
    num_workers: int = 1,
    break_lock: bool = False,
    shard_runner: ShardRunner | None = None,
) -> bool:
    """Compute this worker's missing shards; finalize when every shard is done. True if complete.

    `backend` is a factory, called at most once, so a cache that is already full never loads the
    teacher. Workers starting together wait for whichever of them initialises the cache. With a
    `shard_runner` the shards are filled by it, while this process holds the lock and finalizes.
    """
    if not samples:
        raise DataError(f"{location}: no samples to cache; was every one dropped by tokenisation "
                        "(cache.max_length, cache.truncation)?")
    if num_workers < 1:
        raise ConfigError(f"--num-workers {num_workers}: at least one worker fills the shards")
    if not 0 <= worker_index < num_workers:
        raise ConfigError(f"--worker-index {worker_index} is not in [0, {num_workers}), the "
                          f"workers of --num-workers {num_workers}")
    if shard_rows > fmt.INNER_CHUNK_ROWS and shard_rows % fmt.INNER_CHUNK_ROWS:
        raise ConfigError(f"cache.shard_tokens {shard_rows}: a shard holds whole chunks of "
                          f"{fmt.INNER_CHUNK_ROWS} rows; use at most {fmt.INNER_CHUNK_ROWS} or a "
                          "multiple of it")
    teacher = functools.cache(backend)
    lock_name = f"worker-{worker_index}-of-{num_workers}"
    with WriterLock(location, lock_name, break_lock):
        with WriterLock(location, "init", break_lock, wait_s=INIT_WAIT_S):
            group, plan = open_or_init(
                location, samples, ingredients, vocab_size, shard_rows, teacher
            )
        if fmt.CacheMeta.read(group, location).complete:
            return True
        done = group["shard_done"][:]
        todo = [s for s in worker_shards(plan.n_shards, worker_index, num_workers) if not done[s]]
        if todo and shard_runner is not None:
            shard_runner(plan, todo)
        elif todo:
            total = sum(samples[i].n_loss_rows for s in todo for i in plan.samples_in(s))
            with tqdm(total=total, unit="tok", desc=f"teacher cache {lock_name}") as bar:
                for shard in todo:
                    fill_shard(group, plan, shard, samples, teacher(), bar.update)
        return finalize(group, location)


def finalize(group: zarr.Group, location: str) -> bool:
    """Mark the cache complete once every shard is done; the stats go in with the marker."""
    meta = fmt.CacheMeta.read(group, location)
    if meta.complete:
        return True
    if not group["shard_done"][:].all():
        return False
    meta.model_copy(update={"stats": cache_stats(group, location), "complete": True}).write(group)
    return True
