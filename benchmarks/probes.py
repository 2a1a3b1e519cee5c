"""Helpers for the benchmarks that prototype cache codings on a real teacher
(`coding_bound.py`, `tail_model.py`, `teacher_error.py`)."""

from __future__ import annotations

import numpy as np
from numcodecs import Blosc
from zarr.codecs import BloscCodec

from akd_cache.store import format as fmt

SHUFFLES = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}


def as_numcodecs(codec: BloscCodec) -> Blosc:
    """The format's zarr codec as numcodecs' Blosc, which compresses one numpy array in memory."""
    return Blosc(cname=codec.cname.value, clevel=codec.clevel,
                 shuffle=SHUFFLES[codec.shuffle.value], blocksize=codec.blocksize)


ID_BLOSC = as_numcodecs(fmt.ID_COMPRESSOR)  # the ids' codec
BLOSC = as_numcodecs(fmt.COMPRESSOR)  # every other array's


def compressed_bytes(array: np.ndarray, codec: Blosc) -> int:
    """Bytes of `array` compressed as the writer stores it, in chunks of INNER_CHUNK_ROWS rows."""
    return sum(len(codec.encode(np.ascontiguousarray(array[start : start + fmt.INNER_CHUNK_ROWS])))
               for start in range(0, len(array), fmt.INNER_CHUNK_ROWS))


def rank_columns(ranks: list[int]) -> dict[int, np.ndarray]:
    """Each rank's columns in the z of `side_by_side`."""
    return dict(zip(ranks, np.split(np.arange(sum(ranks)), np.cumsum(ranks)[:-1])))


def side_by_side(codes: dict[int, fmt.TailCode], vocab: int) -> tuple[fmt.TailCode, np.ndarray]:
    """One code whose z holds every rank's z side by side (`rank_columns`), at step 1 (its
    basis is unused), so that one teacher pass gives them all; and the offsets to add to that
    z, since each rank's code has its own mean."""
    ranks = list(codes)
    base = codes[ranks[0]].mean
    combined = fmt.TailCode(
        encoder=np.concatenate([codes[r].encoder for r in ranks], axis=1), mean=base,
        basis=np.zeros((vocab, sum(ranks)), np.float32), bias=np.zeros(vocab, np.float32),
        step=np.ones(1, dtype=np.float32))
    offsets = np.concatenate([(base - codes[r].mean) @ codes[r].encoder for r in ranks])
    return combined, offsets
