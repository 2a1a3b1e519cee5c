"""The teacher-cache format: one Zarr v3 group, its arrays, and how top-k rows are coded.

Layout (R = loss rows, padded so that every shard holds whole samples; S = samples):

    rows/ids            [R, k] uint16|uint32  top-k ids, renumbered by `vocab_rank`, sorted
                                              ascending, delta-coded along k
    rows/codes          [R, k] uint8          round(sqrt(p) * CODE_MAX) in the same order
    rows/tail_logmass   [R]    float32        log(1 - sum of the top-k p), exact
    rows/target_logprob [R]    float32        log p of the actual next token, exact
    tokens              [T]    uint16|uint32  every sample's prompt + response (+ EOS) ids
    samples/{row_start, n_rows, seq_start, seq_len, prompt_len, sample_id}
    vocab_rank          [V]    uint16|uint32  token id -> rank by frequency in the teacher's top-k
                                              over a calibration batch, then in `tokens`
    tail_shape          [V]    float32        log s, the tail shape (only with the `tail_shape`
                                              ingredient): how Stage 2's `shape` tail mode
                                              spreads each row's tail mass over its tail ids
    rows/tail_code      [R, r] int16          z / step rounded: the row's hidden state in r
                                              dimensions (only with `tail_rank` = r > 0)
    tail_code/{encoder [H, r], mean [H], basis [V, r], bias [V], step [1]}  float32: `TailCode`
    shard_done          [n_shards] uint8      1 once a shard is written whole (chunk of 1 each)
    attrs["akd_cache"]  `CacheMeta`: the key and its ingredients, sizes, `complete` (written last,
                        with the `CacheStats`)

Every stored chunk (every inner chunk of a shard, and each shard's index) ends in a crc32c that
zarr verifies on read, and every chunk is written even when it holds only fill values, so a
missing file is always damage (zarr itself would read it as fill values), and so is one shorter
than its shard index or checksum (`min_file_bytes`; zarr reads an empty shard as fill values too):
`store.integrity`.

Why this coding (measured in docs/benchmarks.md): a top-k set in probability order costs its
order on top of its members (~log2(k!) bits); sorted and delta-coded ids after renumbering the
vocabulary so that the tokens the teacher ranks high most often get small numbers leave small
gaps that zstd packs well. The renumbering is calibrated once, at init, on the teacher's top-k
over the first `CALIBRATION_ROWS` rows, and stored, so every worker and every resume uses it. Values
are quantised in sqrt(p): the KL cost of an error in log p is weighted by p, and a uniform step
in sqrt(p) makes every entry's contribution equal, about k * step^2 / 6 nat per row in all. The
tail log-mass and the target log-prob stay float32 because the tail is often below 1e-3.

The tail shape s is the teacher's mean distribution over the ids outside its top-k (each row's
tail normalised to 1, averaged over the calibration rows), mixed with `TAIL_SHAPE_UNIFORM_MIX`
of uniform so that no id is impossible. Spreading a row's exact tail mass in proportion to s
instead of evenly brings the cache's distribution closer to the full teacher: 0.043 instead of
0.069 nat/token at k = 64 with SmolLM2 (docs/benchmarks.md), for V float32 once per cache.

The tail code goes further, per row: the teacher's tail logits are W h (W its lm head, h the
final hidden state), so r numbers per row that keep most of W h's variance rebuild them well.
z = (h - mean) @ encoder, and the tail logits are bias + basis @ z (`TailCode`; the basis has
orthonormal columns, so that one step in z moves the logits by a known amount), with the encoder
and basis fitted to the tails' KL on the calibration rows (`teacher.tail_code_fit`). Stage 2's
`lowrank` tail mode spreads each row's exact tail mass as softmax(bias + basis @ z) over the ids
outside its top-k: 0.017 nat/token at k = 64 and r = 48 for 123 B/token, against 0.064
(uniform) and 0.041 (shape) for 90 B/token with SmolLM2 (docs/benchmarks.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from pydantic import BaseModel, ConfigDict, ValidationError
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.errors import MetadataValidationError

from akd_cache.errors import DamageError

# 2: a crc32c on every chunk (4 B each, < 0.01 B per row at the default shard and chunk sizes),
# every chunk written even when empty. 3: the optional `tail_shape`. 4: the optional tail code.
# 5: the `tail_code_fit` ingredient. The key hashes this, so caches of older formats are not
# reused.
FORMAT_VERSION = 5
ATTRS = "akd_cache"
CODE_MAX = 100  # 7.7e-4 nat mean KL with SmolLM2, k = 64 (docs/benchmarks.md)
CALIBRATION_ROWS = 4096
# sqrt(p) below half a step decodes to the mean of p over that interval: E[u^2], u ~ U(0, h)
ZERO_CODE_P = (0.5 / CODE_MAX) ** 2 / 3
CODE_BITS = 8  # codes fit a uint8
CODE_MASK = (1 << CODE_BITS) - 1
_CODE_P = (np.arange(CODE_MAX + 1, dtype=np.float64) / CODE_MAX) ** 2
_CODE_P[0] = ZERO_CODE_P
_CODE_LOGP = np.log(_CODE_P)
INNER_CHUNK_ROWS = 4096
TOKEN_CHUNK = 1 << 16
BLOSC_BLOCK_BYTES = 1 << 20
# zstd-3 on the ids, the bulk of the bytes (zstd-1 or bit shuffling would write 10% faster for
# 1.5-3.3 B/token more: docs/benchmarks.md); zstd-1 elsewhere compresses as well and 10x faster.
# The codec is in each array's metadata, so a cache written with another one still reads.
ID_COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", blocksize=BLOSC_BLOCK_BYTES)
COMPRESSOR = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", blocksize=BLOSC_BLOCK_BYTES)
CHECKSUM = Crc32cCodec()  # last, so it covers the compressed bytes and is checked first on read
CHECKSUM_BYTES = 4  # what `CHECKSUM` appends to every chunk
# zarr's shard index, at the end of every shard file: a uint64 offset and length per inner chunk,
# then its own crc32c
SHARD_INDEX_ENTRY_BYTES = 16
ID_CODECS = (ID_COMPRESSOR, CHECKSUM)
CODECS = (COMPRESSOR, CHECKSUM)
# an all-fill-value chunk is still stored: a missing one then always means damage
WRITE_EVERY_CHUNK = {"write_empty_chunks": True}
# what zarr raises on a `zarr.json` it cannot read: not JSON (a torn write), or JSON that is not
# zarr metadata
METADATA_ERRORS = (json.JSONDecodeError, MetadataValidationError, TypeError)
UINT16_LIMIT = 1 << 16
TAIL_SHAPE = "tail_shape"
TAIL_SHAPE_UNIFORM_MIX = 0.01
TAIL_CODE = "tail_code"
TAIL_CODE_ROWS = f"rows/{TAIL_CODE}"
TAIL_CODE_PARTS = ("encoder", "mean", "basis", "bias", "step")
# z's coordinates are orthonormal in logit space, so rounding z to a step s moves each tail
# logit by s * sqrt(r / (12 V)) RMS over the vocabulary; the step is chosen for this error.
# With SmolLM2 at r = 64 that is a step of ~14 (z's spread runs from ~1400 in its first
# coordinate to ~5 at rank 64), and steps from 8 to 32 move the KL from the full teacher by
# < 0.001 nat/token while the code's bytes fall from 52 to 37 B/token (docs/benchmarks.md)
TAIL_CODE_LOGIT_RMS = 0.15
# which fit made a cache's tail code, an ingredient of its key: 2, fitted to the tails' KL
# (`teacher.tail_code_fit`; 1, in format 4, was the plain principal directions of the logits)
TAIL_CODE_FIT = 2
TAIL_CODE_DTYPE = np.int16
ROW_ARRAYS = ("rows/ids", "rows/codes", "rows/tail_logmass", "rows/target_logprob")
SAMPLE_TABLES = ("row_start", "n_rows", "seq_start", "seq_len", "prompt_len")
SAMPLE_ARRAYS = (*(f"samples/{name}" for name in SAMPLE_TABLES), "samples/sample_id")


class _Attrs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TailHistogram(_Attrs):
    edges: list[int]  # log10 of the tail mass
    counts: list[int]


class CacheStats(_Attrs):
    """Summary numbers of a finished cache (`store.stats.cache_stats`)."""

    rows: int
    mean_topk_mass: float
    mean_entropy_nat: float
    tail_mass_log10_hist: TailHistogram
    row_bytes: int
    bytes_per_row: float
    total_bytes: int


class CacheMeta(_Attrs):
    """The group's attributes: what the cache is (key, ingredients) and its sizes."""

    key: str
    ingredients: dict[str, Any]
    tool_version: str
    created: str  # ISO 8601, UTC
    n_samples: int
    n_rows: int
    n_tokens: int
    k: int
    vocab_size: int
    shard_rows: int
    n_shards: int
    complete: bool
    stats: CacheStats | None = None  # set together with `complete`

    @classmethod
    def read(cls, group: zarr.Group, location: str) -> CacheMeta | None:
        """None for a group that holds no akd-cache attributes (not a cache, or not yet one)."""
        raw = group.attrs.get(ATTRS)
        if raw is None:
            return None
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(map(str, first["loc"])) or ATTRS
            raise DamageError(
                f"{location}: damaged '{ATTRS}' attributes ({field}: {first['msg']}); run "
                "`akd cache-teacher` to restore them"
            ) from None

    def write(self, group: zarr.Group) -> None:
        group.attrs[ATTRS] = self.model_dump(mode="json", exclude_none=True)


def open_cache_group(location: str, mode: str) -> zarr.Group:
    """A local path or any fsspec URL; local fsspec writes need their folders made on the way."""
    options = {"auto_mkdir": True} if location.startswith("file://") else None
    return zarr.open_group(location, mode=mode, storage_options=options)


def min_file_bytes(array: zarr.Array) -> int:
    """The fewest bytes any stored file of `array` holds: a shard its index, a chunk its crc32c.
    zarr reads a shard file shorter than its index (an empty one too) as fill values, silently."""
    if array.shards is None:
        return CHECKSUM_BYTES
    inner_chunks = int(np.prod([s // c for s, c in zip(array.shards, array.chunks)]))
    return inner_chunks * SHARD_INDEX_ENTRY_BYTES + CHECKSUM_BYTES


def writable(group: zarr.Group, path: str) -> zarr.Array:
    """An array of `group` opened to store every chunk it is given (`WRITE_EVERY_CHUNK`)."""
    return group[path].with_config(WRITE_EVERY_CHUNK)


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= UINT16_LIMIT else np.uint32)


@dataclass(frozen=True)
class EncodedRows:
    ids: np.ndarray  # [n, k] delta-coded renumbered ids
    codes: np.ndarray  # [n, k] uint8
    tail_logmass: np.ndarray  # [n] float32
    target_logprob: np.ndarray  # [n] float32


def vocab_rank(topk_ids: np.ndarray, tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Rank of each id: by how often it is in the calibration top-k, then in the data, then id."""
    topk_counts = np.bincount(topk_ids.ravel(), minlength=vocab_size)
    token_counts = np.bincount(tokens, minlength=vocab_size)
    order = np.lexsort((np.arange(vocab_size), -token_counts, -topk_counts))
    rank = np.empty(vocab_size, dtype=np.int64)
    rank[order] = np.arange(vocab_size)
    return rank.astype(id_dtype(vocab_size))


def encode_rows(
    topk_ids: np.ndarray,
    topk_logprobs: np.ndarray,
    tail_logmass: np.ndarray,
    target_logprob: np.ndarray,
    vocab_rank: np.ndarray,
) -> EncodedRows:
    """Each row's (rank, code) pairs sorted by rank: packed into one integer and sorted, which
    is several times faster than an argsort and two gathers (the ranks in a row are distinct)."""
    sqrt_p = np.exp(0.5 * topk_logprobs.astype(np.float32))
    codes = np.clip(np.rint(sqrt_p * CODE_MAX), 0, CODE_MAX).astype(np.int64)
    packed = np.sort((vocab_rank[topk_ids].astype(np.int64) << CODE_BITS) | codes, axis=1)
    sorted_ranks = packed >> CODE_BITS
    deltas = np.diff(sorted_ranks, axis=1, prepend=0).astype(vocab_rank.dtype)
    return EncodedRows(
        deltas, (packed & CODE_MASK).astype(np.uint8), tail_logmass.astype(np.float32),
        target_logprob.astype(np.float32),
    )


def log_tail_shape(mean_tail: np.ndarray) -> np.ndarray:
    """The stored tail shape: log of the mean normalised tail [V] mixed with a little uniform."""
    mean_tail = np.asarray(mean_tail, dtype=np.float64)
    shape = (1 - TAIL_SHAPE_UNIFORM_MIX) * mean_tail / mean_tail.sum()
    return np.log(shape + TAIL_SHAPE_UNIFORM_MIX / len(mean_tail)).astype(np.float32)


@dataclass(frozen=True)
class TailCode:
    """The per-cache half of the tail code: z = (h - mean) @ encoder, tail logits
    bias + z @ basis.T, all at the cache's temperature (`format` docstring)."""

    encoder: np.ndarray  # [H, r] float32
    mean: np.ndarray  # [H] float32
    basis: np.ndarray  # [V, r] float32
    bias: np.ndarray  # [V] float32
    step: np.ndarray  # [1] float32, `tail_code_step`

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def encode(self, hidden: np.ndarray) -> np.ndarray:
        """[n, H] final hidden states -> [n, r] stored codes."""
        z = (hidden.astype(np.float32) - self.mean) @ self.encoder / self.step
        limit = np.iinfo(TAIL_CODE_DTYPE).max
        return np.clip(np.rint(z), -limit, limit).astype(TAIL_CODE_DTYPE)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Stored codes [n, r] -> z [n, r] float32."""
        return codes.astype(np.float32) * self.step

    def write(self, group: zarr.Group) -> None:
        parts = group.create_group(TAIL_CODE, overwrite=True)
        for name in TAIL_CODE_PARTS:
            parts.create_array(name, data=getattr(self, name).astype(np.float32),
                               compressors=CODECS, config=WRITE_EVERY_CHUNK, overwrite=True)

    @classmethod
    def read(cls, group: zarr.Group) -> TailCode:
        return cls(**{name: group[f"{TAIL_CODE}/{name}"][:] for name in TAIL_CODE_PARTS})


def tail_code_step(vocab_size: int, rank: int) -> np.ndarray:
    """The step that moves the rebuilt tail logits by `TAIL_CODE_LOGIT_RMS` RMS."""
    return np.array([TAIL_CODE_LOGIT_RMS * np.sqrt(12 * vocab_size / rank)], dtype=np.float32)


def decode_ids(deltas: np.ndarray, vocab_order: np.ndarray) -> np.ndarray:
    """`vocab_order` is the inverse of `vocab_rank`: rank -> token id."""
    return vocab_order[np.cumsum(deltas.astype(np.int64), axis=1)].astype(np.int64)


def decode_logprobs(codes: np.ndarray, tail_logmass: np.ndarray) -> np.ndarray:
    """Log-probs of the stored top-k, rescaled so that top-k + tail sum to exactly 1.

    Table lookups: a code has only `CODE_MAX + 1` values, so neither exp nor log runs per entry.
    """
    topk_mass = -np.expm1(tail_logmass.astype(np.float64))
    with np.errstate(divide="ignore"):
        log_scale = np.log(topk_mass / _CODE_P[codes].sum(axis=1))
        return (_CODE_LOGP[codes] + log_scale[:, None]).astype(np.float32)


def create_layout(
    group: zarr.Group,
    *,
    n_rows_padded: int,
    shard_rows: int,
    n_shards: int,
    k: int,
    vocab_size: int,
    n_tokens: int,
    tail_rank: int = 0,
) -> None:
    ids = id_dtype(vocab_size)
    inner = min(INNER_CHUNK_ROWS, shard_rows)
    rows = group.create_group("rows", overwrite=True)
    common = {"fill_value": 0, "overwrite": True, "config": WRITE_EVERY_CHUNK}
    for name, dtype, codecs in (("ids", ids, ID_CODECS), ("codes", np.uint8, CODECS)):
        rows.create_array(
            name, shape=(n_rows_padded, k), dtype=dtype, chunks=(inner, k),
            shards=(shard_rows, k), compressors=codecs, **common,
        )
    for name in ("tail_logmass", "target_logprob"):
        rows.create_array(
            name, shape=(n_rows_padded,), dtype=np.float32, chunks=(inner,),
            shards=(shard_rows,), compressors=CODECS, **common,
        )
    if tail_rank:
        rows.create_array(
            TAIL_CODE, shape=(n_rows_padded, tail_rank), dtype=TAIL_CODE_DTYPE,
            chunks=(inner, tail_rank), shards=(shard_rows, tail_rank), compressors=CODECS,
            **common,
        )
    group.create_array(
        "tokens", shape=(n_tokens,), dtype=ids, chunks=(min(TOKEN_CHUNK, max(n_tokens, 1)),),
        compressors=CODECS, **common,
    )
    group.create_array(
        "shard_done", shape=(n_shards,), dtype=np.uint8, chunks=(1,), compressors=CHECKSUM,
        **common,
    )
