"""Stage 2 loss: peak memory and time of the fused chunked path against naive full logits.

naive: logits = hidden @ W.T as one [N, V] float32 tensor -> topk_divergences -> weighted sum
-> backward. fused: fused_divergence_loss with the same coefficients. Both train the lm head
(the worst case for fused: it also builds the weight gradient).

Memory: each variant runs once in its own subprocess, so allocator state cannot leak between
them; peak = rise of ru_maxrss over the resident size measured after the inputs are built.
Time: one further subprocess runs the variants in turn, `--repeats` rounds, and keeps each
variant's best forward + backward; interleaving gives every variant the same share of a machine
whose cores other jobs may be using. Run by hand from the repository root:

    python benchmarks/loss_memory.py --chunk-sizes 2048 1024 512 256
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

import torch

from akd_cache.student.loss import fused_divergence_loss, topk_divergences

TEACHER_LOGIT_SCALE = 2.0  # spread of the synthetic teacher's top-k + tail logits
BETA = 0.3  # AKD mix used for the coefficients; any value in (0, 1) costs the same
WEIGHT_SCALE = 0.05  # keeps the synthetic student logits in a realistic range
SEED = 0
KIB = 1024
MIB = 1024 * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB  # Linux reports KiB


def build_inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Random inputs built without any [N, V] temporary, so the baseline peak stays low."""
    gen = torch.Generator().manual_seed(SEED)
    n, vocab, k = args.batch * args.seq, args.vocab, args.k
    # Distinct top-k ids per row: a random offset plus an even stride through the vocabulary.
    offset = torch.randint(vocab, (n, 1), generator=gen)
    ids = (offset + torch.arange(k) * (vocab // k)) % vocab
    teacher = torch.log_softmax(torch.randn(n, k + 1, generator=gen) * TEACHER_LOGIT_SCALE, -1)
    teacher = teacher.sort(-1, descending=True).values
    tokens_per_sample = torch.full((n,), float(args.seq))
    coef = 1.0 / (tokens_per_sample * args.batch)
    return {
        "hidden": torch.randn(n, args.hidden, generator=gen).requires_grad_(),
        "weight": torch.randn(vocab, args.hidden, generator=gen)
        .mul_(WEIGHT_SCALE)
        .requires_grad_(),
        "ids": ids,
        "top_lp": teacher[:, :k].contiguous(),
        "tail": teacher[:, k].contiguous(),
        "mask": torch.ones(n, dtype=torch.bool),
        "fkl_coef": (1 - BETA) * coef,
        "rkl_coef": BETA * coef,
        "tail_model": tail_model(args, gen),
    }


def tail_model(args: argparse.Namespace, gen: torch.Generator) -> dict:
    """What the 'shape' and 'lowrank' modes read besides the rows: a random tail shape, or a
    random rank-`--tail-rank` tail code (basis columns of unit norm, as the format's)."""
    n, vocab = args.batch * args.seq, args.vocab
    if args.mode == "shape":
        return {"log_tail_shape": torch.randn(vocab, generator=gen)}
    if args.mode == "lowrank":
        basis = torch.linalg.qr(torch.randn(vocab, args.tail_rank, generator=gen))[0]
        return {"tail_code": torch.randn(n, args.tail_rank, generator=gen) * vocab**0.5,
                "tail_code_basis": (basis, torch.randn(vocab, generator=gen))}
    return {}


def step(variant: str, chunk_size: int, mode: str, x: dict[str, torch.Tensor]) -> float:
    """One forward + backward; returns the loss value."""
    x["hidden"].grad = None
    x["weight"].grad = None
    if variant == "naive":
        logits = x["hidden"] @ x["weight"].T
        div = topk_divergences(logits, x["ids"], x["top_lp"], x["tail"], x["mask"], mode=mode,
                               **x["tail_model"])
        loss = (x["fkl_coef"] * div.fkl + x["rkl_coef"] * div.rkl).sum()
    else:
        loss, _ = fused_divergence_loss(
            x["hidden"],
            x["weight"],
            None,
            x["ids"],
            x["top_lp"],
            x["tail"],
            fkl_coef=x["fkl_coef"],
            rkl_coef=x["rkl_coef"],
            mode=mode,
            chunk_size=chunk_size,
            **x["tail_model"],
        )
    loss.backward()
    return loss.item()


def measure_memory(args: argparse.Namespace) -> None:
    variant, chunk_size = args.child_variants[0]
    x = build_inputs(args)
    gc.collect()
    baseline = current_rss_bytes()
    peak_before = peak_rss_bytes()
    loss = step(variant, chunk_size, args.mode, x)
    result = {
        "peak_mib": (peak_rss_bytes() - baseline) / MIB,
        # Positive slack would mean input building peaked above the baseline (then the peak
        # rise under-counts); it is reported so that a reader can check it stays near zero.
        "baseline_slack_mib": (peak_before - baseline) / MIB,
        "loss": loss,
    }
    print(json.dumps(result))


def measure_time(args: argparse.Namespace) -> None:
    x = build_inputs(args)
    for variant, chunk_size in args.child_variants:  # warm-up: first-touch allocations
        step(variant, chunk_size, args.mode, x)
    best = {f"{v}:{c}": math.inf for v, c in args.child_variants}
    for _ in range(args.repeats):
        for variant, chunk_size in args.child_variants:
            start = time.perf_counter()
            step(variant, chunk_size, args.mode, x)
            key = f"{variant}:{chunk_size}"
            best[key] = min(best[key], time.perf_counter() - start)
    print(json.dumps(best))


def run_child(args: argparse.Namespace, what: str, variants: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--child-variants", *variants]
    for name in ("batch", "seq", "vocab", "hidden", "k", "repeats", "threads", "mode",
                 "tail_rank"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    """The issue's loss shapes (batch 8 x seq 512, V 49152, k 64), shared with loss_peers.py."""
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--mode", default="bucket")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(parser)
    parser.add_argument("--tail-rank", type=int, default=64, help="for --mode lowrank")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--child", choices=["memory", "time"], help=argparse.SUPPRESS)
    parser.add_argument("--child-variants", nargs="+", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        args.child_variants = [(v, int(c)) for v, c in (s.split(":") for s in args.child_variants)]
        (measure_memory if args.child == "memory" else measure_time)(args)
        return

    variants = ["naive:0", *(f"fused:{c}" for c in args.chunk_sizes)]
    memory = {v: run_child(args, "memory", [v]) for v in variants}
    times = run_child(args, "time", variants)
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads, "
        f"torch {torch.__version__}; N = {args.batch * args.seq}, V = {args.vocab}, "
        f"H = {args.hidden}, k = {args.k}, mode = {args.mode}, best of {args.repeats}"
    )
    print("| variant | peak MiB | x naive | best s | x naive | loss | baseline slack MiB |")
    print("|---|---|---|---|---|---|---|")
    base_mem, base_time = memory["naive:0"]["peak_mib"], times["naive:0"]
    for v in variants:
        name = "naive" if v == "naive:0" else f"fused, chunk {v.split(':')[1]}"
        mem = memory[v]
        print(
            f"| {name} | {mem['peak_mib']:.0f} | {mem['peak_mib'] / base_mem:.2f} "
            f"| {times[v]:.2f} | {times[v] / base_time:.2f} | {mem['loss']:.6f} "
            f"| {mem['baseline_slack_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
