"""Whether a cache is what it says it is: its key re-derived from its ingredients, every shard
and chunk file present, every chunk's crc32c valid, its sample tables consistent.

zarr reads a missing chunk as its fill value and says nothing (an empty shard file too), so
presence and size are checked against the store's listing; a flipped byte fails its chunk's
crc32c inside zarr (a `ValueError`), which `damage_error` turns into a `DamageError`. Each
damage names the array, the shard (or chunk) file and the samples it holds, so the writer can
rewrite exactly those shards (`akd cache-teacher`) and `akd verify` can list them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from itertools import product

import fsspec
import numpy as np
import zarr

from akd_cache.errors import CacheError, DamageError
from akd_cache.store import format as fmt
from akd_cache.store.key import CacheIngredients, hash_key

# what zarr and its codecs raise on bytes they cannot decode: crc32c mismatch, bad blosc or
# shard-index bytes, a truncated file
DECODE_ERRORS = (ValueError, RuntimeError, IndexError, EOFError)
REPAIR_HINT = "run `akd cache-teacher` to rewrite it (`akd verify {location}` lists all damage)"
REBUILD_HINT = ("this cannot be rewritten exactly: move {location} away and run "
                "`akd cache-teacher` again")
ALL_SAMPLES = "all samples"


@dataclass(frozen=True)
class Damage:
    """One damaged stored unit: a shard (row arrays) or chunk (the other arrays)."""

    array: str
    file: str  # relative to the cache root
    samples: str  # "samples 12-23", or ALL_SAMPLES
    problem: str
    shard: int | None = None  # the row shard to rewrite, for row arrays and `shard_done`

    def line(self, location: str) -> str:
        return f"{location}: array {self.array}, file {self.file} ({self.samples}): {self.problem}"

    @property
    def rewritable(self) -> bool:
        """Whether `akd cache-teacher` can restore it exactly: not the calibration's arrays
        (`vocab_rank`, `tail_shape`, `tail_code/`) and not an array's definition."""
        return not (self.array in ("vocab_rank", fmt.TAIL_SHAPE) or self.file.endswith("zarr.json")
                    or self.array.startswith(f"{fmt.TAIL_CODE}/"))


def decode_problem(err: Exception) -> str:
    message = " ".join(str(err).split())
    return ("fails its crc32c checksum" if "checksum" in message
            else f"does not decode ({type(err).__name__}: {message})")


def damage_error(location: str, damage: list[Damage]) -> DamageError:
    """One line: the first damage `akd cache-teacher` cannot restore if there is one (it refuses
    the cache then), else the first damage."""
    lost = [d for d in damage if not d.rewritable]
    more = f" (and {len(damage) - 1} more)" if len(damage) > 1 else ""
    hint = (REBUILD_HINT if lost else REPAIR_HINT).format(location=location)
    return DamageError(f"{(lost or damage)[0].line(location)}{more}; {hint}")


def open_group(location: str, mode: str) -> zarr.Group:
    """`fmt.open_cache_group`, or a one-line `DamageError` naming a group `zarr.json` that does not
    decode: it holds the attributes, so nothing says which cache it was."""
    try:
        return fmt.open_cache_group(location, mode=mode)
    except fmt.METADATA_ERRORS as err:
        raise DamageError(f"{location}: file zarr.json (the cache's attributes): "
                          f"{decode_problem(err)}; {REBUILD_HINT.format(location=location)}"
                          ) from None


def open_cache(location: str, mode: str = "r") -> tuple[zarr.Group, fmt.CacheMeta]:
    """The cache group at `location` and its attributes, checked to name a cache (`check_identity`),
    or a one-line `CacheError` naming the location: what every reader of a cache opens it with."""
    try:
        group = open_group(location, mode)
    except FileNotFoundError:  # zarr's GroupNotFoundError (an empty folder) included
        raise CacheError(f"{location}: no teacher cache there") from None
    meta = fmt.CacheMeta.read(group, location)
    if meta is None:
        raise CacheError(f"{location}: not an akd-cache teacher cache (no '{fmt.ATTRS}' attrs)")
    check_identity(meta, location)
    return group, meta


def check_identity(meta: fmt.CacheMeta, location: str) -> None:
    """Refuse a cache whose key is not the hash of its stored ingredients (an edited key or
    ingredient), or one written in another format version."""
    version = meta.ingredients.get("format_version")
    if version != fmt.FORMAT_VERSION:  # first: an older format has other ingredients too
        raise CacheError(f"{location}: a format-{version} cache; this akd reads format "
                         f"{fmt.FORMAT_VERSION}: run `akd cache-teacher` to build it anew")
    names = {f.name for f in fields(CacheIngredients)}
    if set(meta.ingredients) != names:
        odd = sorted(set(meta.ingredients) ^ names)
        raise DamageError(f"{location}: the stored ingredients do not match the cache format "
                          f"(differing: {', '.join(odd)}); run `akd cache-teacher` to restore them")
    derived = hash_key(meta.ingredients)
    if derived != meta.key:
        raise DamageError(
            f"{location}: attribute key {meta.key} is not the key of the stored ingredients "
            f"({derived}): the key or an ingredient was edited; run `akd cache-teacher` to "
            "restore them"
        )


class SampleIndex:
    """Which samples a range of rows, tokens or table entries belongs to."""

    def __init__(self, tables: dict[str, np.ndarray] | None, shard_rows: int) -> None:
        self.tables = tables
        self.shard_rows = shard_rows

    @staticmethod
    def _span(first: int, stop: int) -> str:
        return f"samples {first}-{stop - 1}" if stop > first else "no samples"

    def of_rows(self, lo: int, hi: int) -> str:
        if self.tables is None:
            return "samples unknown: the sample tables are damaged"
        starts = self.tables["row_start"]
        return self._span(int(np.searchsorted(starts, lo)), int(np.searchsorted(starts, hi)))

    def of_tokens(self, lo: int, hi: int) -> str:
        if self.tables is None:
            return "samples unknown: the sample tables are damaged"
        ends = self.tables["seq_start"] + self.tables["seq_len"]
        return self._span(int(np.searchsorted(ends, lo, side="right")),
                          int(np.searchsorted(self.tables["seq_start"], hi)))

    def of(self, path: str, lo: int, hi: int) -> tuple[str, int | None]:
        """The samples behind entries [lo, hi) of array `path`, and the row shard they are in."""
        if path in fmt.ROW_ARRAYS or path == fmt.TAIL_CODE_ROWS:
            return self.of_rows(lo, hi), lo // self.shard_rows
        if path == "shard_done":
            return self.of_rows(lo * self.shard_rows, hi * self.shard_rows), lo
        if path == "tokens":
            return self.of_tokens(lo, hi), None
        if path in fmt.SAMPLE_ARRAYS:
            return self._span(lo, hi), None
        return ALL_SAMPLES, None


def units(array: zarr.Array) -> Iterator[tuple[str, slice]]:
    """Each stored file of `array` (a shard, or a chunk if unsharded): its key and its window
    along the first axis (every array here is chunked whole along the others)."""
    unit = array.shards or array.chunks
    grid = [-(-size // step) for size, step in zip(array.shape, unit)]
    for coords in product(*map(range, grid)):
        lo = coords[0] * unit[0]
        yield array.metadata.encode_chunk_key(coords), slice(lo, min(lo + unit[0], array.shape[0]))


def stored_files(location: str) -> dict[str, int]:
    """Every file under `location` (relative to it) and its size in bytes, in one listing."""
    fs, root = fsspec.core.url_to_fs(location)
    prefix = root.rstrip("/") + "/"
    return {path[len(prefix):]: info["size"] for path, info in fs.find(root, detail=True).items()
            if path.startswith(prefix)}


def expected_arrays(meta: fmt.CacheMeta) -> dict[str, tuple[int, ...] | None]:
    shape = {fmt.TAIL_SHAPE: (meta.vocab_size,)} if meta.ingredients["tail_shape"] else {}
    rank = meta.ingredients.get("tail_rank", 0)
    code = {
        fmt.TAIL_CODE_ROWS: (meta.n_shards * meta.shard_rows, rank),
        f"{fmt.TAIL_CODE}/basis": (meta.vocab_size, rank),
        f"{fmt.TAIL_CODE}/bias": (meta.vocab_size,),
        f"{fmt.TAIL_CODE}/encoder": None,  # [H, r]: the teacher's hidden size is not in meta
        f"{fmt.TAIL_CODE}/mean": None,
        f"{fmt.TAIL_CODE}/step": (1,),
    } if rank else {}
    return {
        **{path: (meta.n_shards * meta.shard_rows, meta.k) for path in fmt.ROW_ARRAYS[:2]},
        **{path: (meta.n_shards * meta.shard_rows,) for path in fmt.ROW_ARRAYS[2:]},
        "tokens": (meta.n_tokens,),
        **{path: (meta.n_samples,) for path in fmt.SAMPLE_ARRAYS},
        "vocab_rank": (meta.vocab_size,),
        "shard_done": (meta.n_shards,),
        **shape,
        **code,
    }


def read_tables(group: zarr.Group) -> dict[str, np.ndarray]:
    return {name: group[f"samples/{name}"][:] for name in fmt.SAMPLE_TABLES}


def table_damage(tables: dict[str, np.ndarray], meta: fmt.CacheMeta) -> list[Damage]:
    """The sample tables against each other and the attributes."""
    t = tables
    checks = {
        "n_rows": (t["n_rows"] == t["seq_len"] - t["prompt_len"]).all()
        and int(t["n_rows"].sum()) == meta.n_rows,
        "seq_start": (t["seq_start"] == np.concatenate([[0], np.cumsum(t["seq_len"])[:-1]])).all()
        and int(t["seq_len"].sum()) == meta.n_tokens,
        "row_start": (np.diff(t["row_start"]) >= 0).all()
        and ((t["row_start"] + t["n_rows"] - 1) // meta.shard_rows
             == t["row_start"] // meta.shard_rows).all(),
    }
    return [Damage(f"samples/{name}", f"samples/{name}", ALL_SAMPLES,
                   "inconsistent with the other sample tables or the attributes")
            for name, ok in checks.items() if not ok]


def find_damage(
    group: zarr.Group, location: str, meta: fmt.CacheMeta, *, full: bool
) -> list[Damage]:
    """Every damage found: missing arrays and files, inconsistent tables, and with `full` every
    chunk decoded (so every crc32c checked). Row shards count only once marked done."""
    damage: list[Damage] = []
    arrays: dict[str, zarr.Array] = {}
    for path, shape in expected_arrays(meta).items():
        try:
            arrays[path] = group[path]
        except KeyError:
            damage.append(Damage(path, f"{path}/zarr.json", ALL_SAMPLES, "array missing"))
            continue
        except fmt.METADATA_ERRORS as err:
            damage.append(Damage(path, f"{path}/zarr.json", ALL_SAMPLES, decode_problem(err)))
            continue
        if shape is not None and arrays[path].shape != shape:
            damage.append(Damage(path, f"{path}/zarr.json", ALL_SAMPLES,
                                 f"shape {arrays[path].shape}, expected {shape}"))
    try:
        tables = read_tables(group)
    except (KeyError, *DECODE_ERRORS, *fmt.METADATA_ERRORS):
        tables = None
    index = SampleIndex(tables, meta.shard_rows)
    if tables is not None and all(len(v) == meta.n_samples for v in tables.values()):
        damage += table_damage(tables, meta)
    try:
        flags = arrays["shard_done"][:].astype(bool) if "shard_done" in arrays else None
    except DECODE_ERRORS:
        flags = None
    done = np.ones(meta.n_shards, dtype=bool) if meta.complete or flags is None else flags
    present = stored_files(location)
    for path, array in arrays.items():
        least = fmt.min_file_bytes(array)
        for key, window in units(array):
            samples, shard = index.of(path, window.start, window.stop)
            if shard is not None and not done[shard]:
                continue
            file = f"{array.path}/{key}"
            problem = None
            if file not in present:
                problem = "missing (it would read as fill values)"
            elif present[file] < least:
                problem = (f"truncated to {present[file]} B (a stored file of this array holds "
                           f"at least {least} B)")
            elif full:
                try:
                    array[window]
                except DECODE_ERRORS as err:
                    problem = decode_problem(err)
            if problem:
                damage.append(Damage(path, file, samples, problem, shard))
    if meta.complete and flags is not None and not flags.all() and not any(
        d.array == "shard_done" for d in damage
    ):
        damage.append(Damage("shard_done", "shard_done", ALL_SAMPLES,
                             "the cache is marked complete with shards not done"))
    return damage


def read_guarded(
    array: zarr.Array, window: slice, index: SampleIndex, location: str
) -> np.ndarray:
    """`array[window]`, or a `DamageError` naming the file and samples whose bytes fail."""
    try:
        return array[window]
    except DECODE_ERRORS as err:
        unit = (array.shards or array.chunks)[0]
        first, last = window.start // unit, (window.stop - 1) // unit
        keys = [array.metadata.encode_chunk_key((i, *[0] * (array.ndim - 1)))
                for i in range(first, last + 1)]
        samples, shard = index.of(array.path, window.start, window.stop)
        files = " or ".join(f"{array.path}/{key}" for key in keys)
        damage = Damage(array.path, files, samples, decode_problem(err), shard)
        raise damage_error(location, [damage]) from None
