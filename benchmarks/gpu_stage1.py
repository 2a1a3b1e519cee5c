"""Stage 1 throughput on a GPU: the hf backend scoring a StarCoder-7B-shaped GPTBigCode (random
weights, bf16) into a cache on local disk, against the bound of 2 x params FLOP per token.

    python benchmarks/gpu_stage1.py                      # on the GPU machine
    python benchmarks/gpu_stage1.py --tiny --device cpu  # the same code at tiny shapes

The model is built from its config on the device (no download, no checkpoint on disk). The
samples are random token sequences of `--seq` tokens, the last `--response` of them the
response (the rows the cache stores); the teacher runs over every token, so throughput is
sequence tokens per second through `writer.fill`, the whole of Stage 1 (teacher forward, lm head
top-k, encoding, compression, the zarr writes) but the data preparation. A warm-up fill of a
few samples runs first, outside the timing. Bound: `--peak-tflops` (the H200's dense bf16
matrix rate, measured by the device notes at about 790) / (2 x parameters) tokens per second;
the issue's target is half of it.

What the GPU machine lacks (zarr and its codecs, pydantic) travels as wheels:
`bash scripts/gpu_wheels.sh` here, then on the device
`pip install --no-index --no-deps --target /tmp/site .whl/*.whl` and `PYTHONPATH=/tmp/site:.`.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, GPTBigCodeConfig

from akd_cache.store.key import CacheIngredients
from akd_cache.store.reader import TeacherCache
from akd_cache.store.rows import TokenizedSample
from akd_cache.store.writer import fill
from akd_cache.teacher.hf_backend import HFTeacher

STARCODER_7B = {"n_layer": 42, "n_embd": 4096, "n_head": 32, "multi_query": True,
                "vocab_size": 49152, "n_positions": 8192, "bos_token_id": 0, "eos_token_id": 0}
TINY = {**STARCODER_7B, "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 512,
        "n_positions": 1024}
H200_BF16_TFLOPS = 790.0
TARGET_SHARE = 0.5
K = 64
WARMUP_SAMPLES = 4
SEED = 0


def random_samples(n: int, seq: int, response: int, vocab: int, prefix: str
                   ) -> list[TokenizedSample]:
    rng = np.random.default_rng(SEED)
    return [TokenizedSample(f"{prefix}{i}", rng.integers(vocab, size=seq).tolist(),
                            seq - response) for i in range(n)]


def ingredients(model_name: str, n_samples: int, seq: int) -> CacheIngredients:
    """A random model has no checkpoint or tokenizer to hash: every field names the run."""
    return CacheIngredients(
        teacher=model_name, teacher_revision=None, teacher_weights_sha256=None,
        teacher_dtype="bfloat16", tokenizer_sha256="none", dataset_sha256="random",
        samples_sha256=f"random-{n_samples}x{seq}", split="train", heldout=0, split_seed=SEED,
        max_train_samples=None, template="none", max_length=seq, truncation="none", k=K,
        temperature=1.0, tail_shape=False,
    )


def timed_fill(root: str, samples: list[TokenizedSample], teacher: HFTeacher,
               model_name: str, shard_rows: int) -> float:
    """Seconds to fill a new cache with the samples; checks that it reads back whole."""
    location = f"{root}/{samples[0].sample_id}"
    seq = len(samples[0].input_ids)
    if teacher.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fill(location, samples, ingredients(model_name, len(samples), seq),
         teacher.vocab_size, lambda: teacher, shard_rows=shard_rows)
    seconds = time.perf_counter() - start
    cache = TeacherCache(location)
    rows = sum(s.n_loss_rows for s in samples)
    if not cache.meta.complete or cache.meta.n_rows != rows:
        raise RuntimeError(f"{location}: {cache.meta.n_rows} rows read back, {rows} written")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU check")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--response", type=int, default=512)
    parser.add_argument("--batch-tokens", type=int, default=32768)
    parser.add_argument("--shard-rows", type=int, default=65536)
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS)
    parser.add_argument("--cache-root", help="where the caches go (default: a temporary folder)")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    config = GPTBigCodeConfig(**(TINY if args.tiny else STARCODER_7B))
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    name = f"random-gptbigcode-{params / 1e9:.2f}B"
    teacher = HFTeacher(model, k=K, dtype="bfloat16", device=args.device,
                        batch_tokens=args.batch_tokens)
    vocab = config.vocab_size
    with tempfile.TemporaryDirectory(dir=args.cache_root) as root:
        timed_fill(root, random_samples(WARMUP_SAMPLES, args.seq, args.response, vocab, "warm"),
                   teacher, name, args.shard_rows)
        samples = random_samples(args.samples, args.seq, args.response, vocab, "run")
        seconds = timed_fill(root, samples, teacher, name, args.shard_rows)
    tokens = args.samples * args.seq
    rate = tokens / seconds
    bound = args.peak_tflops * 1e12 / (2 * params)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"{device}, torch {torch.__version__}; {name} ({params:,} parameters, bf16), "
          f"k = {K}, {args.samples} samples x {args.seq} tokens ({args.response} response), "
          f"batch_tokens {args.batch_tokens}")
    print("| sequence tokens | seconds | tokens/s | bound tokens/s (2 x params FLOP at "
          f"{args.peak_tflops:.0f} TFLOP/s) | share of the bound | target {TARGET_SHARE:.0%} |")
    print("|---|---|---|---|---|---|")
    print(f"| {tokens:,} | {seconds:.2f} | {rate:,.0f} | {bound:,.0f} | {rate / bound:.1%} | "
          f"{'met' if rate >= TARGET_SHARE * bound else 'not met'} |")


if __name__ == "__main__":
    main()
