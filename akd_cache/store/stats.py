"""Summary numbers of a finished cache, computed once at finalize and shown by `akd inspect`."""

from __future__ import annotations

import fsspec
import numpy as np
import zarr

from akd_cache.store import format as fmt

# log10 of the tail mass; anything below 1e-7, an empty tail included, counts in the first bin
TAIL_HIST_EDGES = (-8, -7, -6, -5, -4, -3, -2, -1, 0)


def real_row_mask(row_start: np.ndarray, n_rows: np.ndarray, n_rows_padded: int) -> np.ndarray:
    mask = np.zeros(n_rows_padded + 1, dtype=np.int64)
    np.add.at(mask, row_start, 1)
    np.add.at(mask, row_start + n_rows, -1)
    return np.cumsum(mask[:-1]).astype(bool)


def row_entropy(logprobs: np.ndarray, tail_logmass: np.ndarray) -> np.ndarray:
    """Entropy in nats of each row's top-k + tail buckets: a lower bound of the teacher's."""
    lp = logprobs.astype(np.float64)
    tail = tail_logmass.astype(np.float64)
    tail_p = np.exp(tail)
    finite_tail = np.where(tail_p > 0, tail, 0.0)  # an empty tail (-inf) adds 0, not 0 * -inf
    return -(np.exp(lp) * lp).sum(1) - tail_p * finite_tail


def cache_stats(group: zarr.Group, location: str) -> fmt.CacheStats:
    samples = group["samples"]
    codes_arr = group["rows/codes"]
    mask = real_row_mask(samples["row_start"][:], samples["n_rows"][:], codes_arr.shape[0])
    shard_rows = codes_arr.shards[0]
    topk_mass, entropy, hist = 0.0, 0.0, np.zeros(len(TAIL_HIST_EDGES) - 1, dtype=np.int64)
    for start in range(0, codes_arr.shape[0], shard_rows):
        window = slice(start, start + shard_rows)
        keep = mask[window]
        tail = group["rows/tail_logmass"][window][keep].astype(np.float64)
        lp = fmt.decode_logprobs(codes_arr[window][keep], tail).astype(np.float64)
        tail_p = np.exp(tail)
        topk_mass += float((1 - tail_p).sum())
        entropy += float(row_entropy(lp, tail).sum())
        with np.errstate(divide="ignore"):
            log10_tail = np.clip(np.log10(tail_p), TAIL_HIST_EDGES[0], TAIL_HIST_EDGES[-1])
        hist += np.histogram(log10_tail, bins=TAIL_HIST_EDGES)[0]
    n = int(mask.sum())
    fs, root = fsspec.core.url_to_fs(location)
    # s3fs caches listings per process (for a path, not below it): one made before this run's
    # writes, by a resume's damage scan, lacks the objects written since
    fs.invalidate_cache()
    row_bytes = int(fs.du(f"{root.rstrip('/')}/rows"))
    return fmt.CacheStats(
        rows=n,
        mean_topk_mass=topk_mass / n,
        mean_entropy_nat=entropy / n,
        tail_mass_log10_hist=fmt.TailHistogram(edges=list(TAIL_HIST_EDGES), counts=hist.tolist()),
        row_bytes=row_bytes,
        bytes_per_row=row_bytes / n,
        total_bytes=int(fs.du(root)),
    )
