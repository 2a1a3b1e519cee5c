"""Stage 1 benchmark: cache bytes per token and reconstruction error, writer and reader speed,
teacher throughput of the hf and vllm backends, all with the real SmolLM2 teacher on CPU.

    python benchmarks/cache_bench.py --samples 300 [--vllm-samples 64]

The teacher runs once (hf, k = 64); the k = 16 cache is built from the same rows (the top 16 of
the top 64, the tail recomputed exactly from the dropped entries). Writer and reader speeds
replay those rows, so they exclude the teacher, on one thread, for each candidate ids codec at
k = 64 (best of `--repeats`); the reader also runs through the trainer's DataLoader with 0, 1
and 2 worker processes. Results go to stdout as Markdown.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from unittest.mock import patch

import numcodecs
import numpy as np
import torch
from transformers import AutoConfig
from zarr.codecs import BloscCodec

from akd_cache.config import CacheConfig, DataConfig, TeacherConfig
from akd_cache.data.instructions import prepare
from akd_cache.data.tokenize import tokenize_split
from akd_cache.models.smollm2 import ensure_smollm2
from akd_cache.store import format as fmt
from akd_cache.store.reader import (
    CacheDataset,
    ShardShuffleSampler,
    TeacherCache,
    collate,
    share_with_workers,
)
from akd_cache.store.rows import TeacherRows
from akd_cache.store.stats import cache_stats
from akd_cache.store.writer import fill
from akd_cache.teacher.build import load_tokenizer, make_ingredients
from akd_cache.teacher.hf_backend import HFTeacher

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO.parent / "shared" / "data" / "codealpaca" / "code_alpaca_2k.json"
TEACHER = REPO / "storage" / "models" / "smollm2-135m-instruct"
RAW_BYTES_PER_ENTRY = 2 + 2  # uint16 id + float16 value
SHARD_ROWS = 16384
LOADER_BATCH = 8


def id_codecs(level: int, shuffle: str) -> tuple:
    return (BloscCodec(cname="zstd", clevel=level, shuffle=shuffle,
                       blocksize=fmt.BLOSC_BLOCK_BYTES), fmt.CHECKSUM)


# candidates for the ids, the bulk of the bytes, each a writer baseline for the others; the
# format's own is marked in the table
ID_CODEC_OPTIONS = {
    "zstd-3, byte shuffle": id_codecs(3, "shuffle"),
    "zstd-2, byte shuffle": id_codecs(2, "shuffle"),
    "zstd-1, byte shuffle": id_codecs(1, "shuffle"),
    "zstd-1, bit shuffle": id_codecs(1, "bitshuffle"),
}


def top(rows: TeacherRows, k: int) -> TeacherRows:
    dropped = np.exp(rows.topk_logprobs[:, k:].astype(np.float64)).sum(1)
    tail = np.log(np.exp(rows.tail_logmass.astype(np.float64)) + dropped).astype(np.float32)
    return TeacherRows(rows.topk_ids[:, :k], rows.topk_logprobs[:, :k], tail, rows.target_logprob)


class Replay:
    def __init__(self, rows: dict[str, TeacherRows]) -> None:
        self.rows = rows

    def score(self, samples):
        return [self.rows[s.sample_id] for s in samples]


def reconstruction_kl(cache: TeacherCache, rows: dict[str, TeacherRows]) -> np.ndarray:
    """KL(exact top-k + tail || stored top-k + tail) per row; the tail is stored exactly."""
    kls = []
    for i in range(len(cache)):
        got = cache[i]
        exact = rows[got.sample_id]
        order_e, order_g = np.argsort(exact.topk_ids, 1), np.argsort(got.topk_ids, 1)
        p = np.exp(np.take_along_axis(exact.topk_logprobs, order_e, 1).astype(np.float64))
        q = np.exp(np.take_along_axis(got.topk_logprobs, order_g, 1).astype(np.float64))
        kls.append((p * (np.log(p) - np.log(q))).sum(1))
    return np.concatenate(kls)


def loader_rows_per_s(cache: TeacherCache, workers: int, epochs: int) -> float:
    """Loss rows per second through the trainer's DataLoader setup (sampler, collate)."""
    sampler = ShardShuffleSampler(cache)
    if workers:
        share_with_workers()  # as the trainer does
    loader = torch.utils.data.DataLoader(
        CacheDataset(cache), batch_size=LOADER_BATCH, sampler=sampler, collate_fn=collate,
        num_workers=workers, persistent_workers=workers > 0,
    )
    start = time.perf_counter()
    rows = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        rows += sum(int(batch["loss_mask"].sum()) for batch in loader)
    return rows / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--vllm-samples", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=5, help="DataLoader passes")
    parser.add_argument("--repeats", type=int, default=3, help="writer and reader: best of")
    args = parser.parse_args()
    teacher_dir = str(ensure_smollm2(TEACHER))
    data = prepare(DataConfig(dataset=str(DATASET), heldout=0))
    tokenizer = load_tokenizer(teacher_dir)
    split = tokenize_split(tokenizer, data.train[: args.samples], CacheConfig())
    samples = split.samples
    n_tokens = sum(len(s.input_ids) for s in samples)
    n_rows = sum(s.n_loss_rows for s in samples)
    vocab = AutoConfig.from_pretrained(teacher_dir).vocab_size
    print(f"{len(samples)} samples, {n_tokens} sequence tokens, {n_rows} response rows\n")

    hf = HFTeacher(teacher_dir, k=64, batch_tokens=4096)
    start = time.perf_counter()
    scored = hf.score(samples)
    hf_seconds = time.perf_counter() - start
    rows64 = {s.sample_id: r for s, r in zip(samples, scored)}

    torch.set_num_threads(1)
    numcodecs.blosc.set_nthreads(1)
    print("| k | ids codec | B/token stored | B/token raw (uint16 + fp16) | ratio | "
          "mean KL nat/token | max KL | writer tok/s | reader tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    reader_rows = []
    format_codec = next(name for name, codecs in ID_CODEC_OPTIONS.items()
                        if codecs[0].to_dict() == fmt.ID_CODECS[0].to_dict())
    configs = [(64, codecs, name) for name, codecs in ID_CODEC_OPTIONS.items()]
    configs.append((16, fmt.ID_CODECS, format_codec))
    for k, codecs, codec_name in configs:
        codec_name += " (the format's)" if codec_name == format_codec else ""
        rows = {sid: top(r, k) for sid, r in rows64.items()}
        cache_cfg = CacheConfig(k=k)
        ingredients = make_ingredients(
            teacher=TeacherConfig(model=teacher_dir), teacher_path=teacher_dir,
            tokenizer=tokenizer, data=DataConfig(dataset=str(DATASET), heldout=0),
            dataset_sha256=data.content_sha256, samples=samples, cache=cache_cfg,
        )
        with tempfile.TemporaryDirectory() as tmp, patch.object(fmt, "ID_CODECS", codecs):
            write_seconds, read_seconds = math.inf, math.inf
            for repeat in range(args.repeats):
                location = f"{tmp}/cache{repeat}"
                start = time.perf_counter()
                fill(location, samples, ingredients, vocab, lambda rows=rows: Replay(rows),
                     shard_rows=SHARD_ROWS)
                fill_seconds = time.perf_counter() - start
                start = time.perf_counter()
                cache_stats(fmt.open_cache_group(location, "r"), location)
                # without the finalize statistics pass
                write_seconds = min(write_seconds, fill_seconds - (time.perf_counter() - start))
                cache = TeacherCache(location)
                start = time.perf_counter()
                read_rows = sum(len(cache[i].tail_logmass) for i in ShardShuffleSampler(cache))
                read_seconds = min(read_seconds, time.perf_counter() - start)
                assert read_rows == n_rows
            kl = reconstruction_kl(cache, rows)
            stats = cache.meta.stats
            if k == 64 and codec_name.endswith("(the format's)"):
                reader_rows = [(workers, loader_rows_per_s(cache, workers, args.epochs))
                               for workers in (0, 1, 2)]
        print(f"| {k} | {codec_name} | {stats.bytes_per_row:.1f} | {k * RAW_BYTES_PER_ENTRY} | "
              f"{k * RAW_BYTES_PER_ENTRY / stats.bytes_per_row:.2f}x | {kl.mean():.2e} | "
              f"{kl.max():.2e} | {n_rows / write_seconds:,.0f} | {n_rows / read_seconds:,.0f} |")
    print(f"\nWriter: init, encoding and shard writes, without the finalize statistics pass. "
          f"Reader: every sample, decoded, in the trainer's shard-by-shard random order. Both "
          f"the best of {args.repeats}.\n")
    print(f"Reader through a DataLoader (k = 64, batches of {LOADER_BATCH} collated as the "
          f"trainer does, {args.epochs} epochs, persistent workers):\n")
    print("| workers | tok/s | vs 0 workers |")
    print("|---|---|---|")
    for workers, speed in reader_rows:
        print(f"| {workers} | {speed:,.0f} | {speed / reader_rows[0][1]:.2f}x |")
    print()

    torch.set_num_threads(torch.get_num_interop_threads())
    print("| backend | samples | sequence tokens | seconds | tokens/s |")
    print("|---|---|---|---|---|")
    print(f"| hf | {len(samples)} | {n_tokens} | {hf_seconds:.1f} | {n_tokens / hf_seconds:.0f} |")
    if args.vllm_samples:
        from akd_cache.teacher.vllm_backend import VLLMTeacher

        subset = samples[: args.vllm_samples]
        sub_tokens = sum(len(s.input_ids) for s in subset)
        start = time.perf_counter()
        hf.score(subset)
        hf_sub = time.perf_counter() - start
        vllm = VLLMTeacher(teacher_dir, k=64, max_model_len=512)
        start = time.perf_counter()
        vllm.score(subset)
        vllm_seconds = time.perf_counter() - start
        print(f"| hf | {len(subset)} | {sub_tokens} | {hf_sub:.1f} | {sub_tokens / hf_sub:.0f} |")
        print(f"| vllm | {len(subset)} | {sub_tokens} | {vllm_seconds:.1f} | "
              f"{sub_tokens / vllm_seconds:.0f} |")


if __name__ == "__main__":
    main()
