"""Scale-out benchmark: Stage 1 in one process vs on 1 and 2 Ray actors (CPU, the tests' tiny
Llama teacher), and the cache reader's speed from S3 (a local moto server) vs local disk.

    python benchmarks/scale_bench.py --samples 1500

The tiny teacher scores thousands of tokens per second, so these numbers show Ray's fixed costs
(cluster start, actor start, teacher load per actor) against a small amount of work; with a real
teacher each actor's share of the scoring dominates. Results go to stdout as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tiny models the tests use

from tiny_models import save_tiny
from transformers import AutoTokenizer

from akd_cache.config import CacheConfig, DataConfig, TeacherConfig
from akd_cache.data.instructions import Example
from akd_cache.data.tokenize import tokenize_split
from akd_cache.store.reader import TeacherCache
from akd_cache.store.writer import fill
from akd_cache.teacher.build import make_ingredients
from akd_cache.teacher.hf_backend import HFTeacher

DATASET = REPO.parent / "shared" / "data" / "codealpaca" / "code_alpaca_2k.json"
K = 16
SHARD_ROWS = 2048
BATCH_TOKENS = 2048
TINY_VOCAB = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_all(location: str) -> tuple[float, int]:
    start = time.perf_counter()
    cache = TeacherCache(location)
    rows = sum(len(cache[i].target_logprob) for i in range(len(cache)))
    return time.perf_counter() - start, rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=1500)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = Path(tempfile.mkdtemp())
    rows_json = json.loads(DATASET.read_text())
    texts = [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in rows_json]
    model = str(save_tiny("llama", texts, tmp / "llama", TINY_VOCAB))
    tokenizer = AutoTokenizer.from_pretrained(model)
    examples = [Example(f"row-{i}", r["instruction"], r["input"], r["output"])
                for i, r in enumerate(rows_json[: args.samples])]
    cache_cfg = CacheConfig(k=K, max_length=128, template="alpaca")
    samples = tokenize_split(tokenizer, examples, cache_cfg).samples
    ingredients = make_ingredients(
        teacher=TeacherConfig(model=model), teacher_path=model, tokenizer=tokenizer,
        data=DataConfig(dataset="x.json"), dataset_sha256="0" * 64, samples=samples,
        cache=cache_cfg,
    )
    n_rows = sum(s.n_loss_rows for s in samples)

    def backend():
        return HFTeacher(model, k=K, batch_tokens=BATCH_TOKENS)

    print(f"{len(samples)} samples, {n_rows} teacher rows, shards of {SHARD_ROWS} rows, "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| Stage 1 run | wall s | tokens/s | Ray cluster start s (not in wall) |")
    print("|---|---|---|---|")
    start = time.perf_counter()
    assert fill(str(tmp / "single"), samples, ingredients, len(tokenizer), backend, SHARD_ROWS)
    wall = time.perf_counter() - start
    print(f"| one process | {wall:.1f} | {n_rows / wall:.0f} | - |")

    import ray

    from akd_cache.teacher.ray_pool import RaySettings, RayTeacherPool

    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{REPO / 'tests'}:{REPO}"}})
    ray_start = time.perf_counter() - start
    for actors in (1, 2):
        location = str(tmp / f"ray{actors}")
        start = time.perf_counter()
        pool = RayTeacherPool(location, samples, backend, gpu=False,
                              settings=RaySettings(actors=actors,
                                                   cpus_per_actor=os.cpu_count() // actors))
        assert fill(location, samples, ingredients, len(tokenizer), pool.teacher, SHARD_ROWS,
                    shard_runner=pool)
        wall = time.perf_counter() - start
        print(f"| Ray, {actors} actor{'s' * (actors > 1)} | {wall:.1f} | {n_rows / wall:.0f} "
              f"| {ray_start:.1f} (cluster, once) |")
    ray.shutdown()

    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir("bench")
    fs.put(str(tmp / "single"), "bench/cache", recursive=True)
    print("\n| reader, every sample in order | wall s | tokens/s |")
    print("|---|---|---|")
    for name, location in (("local disk", str(tmp / "single")), ("S3 (moto, localhost)",
                                                                 "s3://bench/cache")):
        wall, rows = read_all(location)
        assert rows == n_rows
        print(f"| {name} | {wall:.2f} | {rows / wall:.0f} |")
    server.stop()


if __name__ == "__main__":
    main()
