"""Stage 2 loss against the peers a user would pick: peak memory and time of one forward +
backward (lm-head weight gradient included), as ratios against the naive full-logits path.

Shapes and inputs are `loss_memory.py`'s (batch 8 x seq 512, V 49152, H 576, k 64, float32,
synthetic teacher top-k + tail), and so is the measurement: each method runs once in its own
subprocess for the rise of ru_maxrss over the resident size once the inputs exist, and one more
subprocess runs all methods interleaved, `--repeats` rounds, for each one's best time.

Peers (benchmark-only, never project dependencies), installed with

    pip install --no-deps --target /work/peers-site axolotl==0.19.0 torchtune==0.6.1 \
        liger-kernel==0.8.5

and found through `--peers-site`. Their package `__init__`s pull in training stacks that are not
installed, so the loss modules are loaded by file path under empty parent packages. A peer that
does not load is skipped with the reason printed.

- axolotl top-k: `integrations/kd/topk_logprob/forward_kl.loss` (top-k forward KL over the top-k
  renormalised teacher) on materialised [B, S, V] logits, as axolotl's KD trainer calls it.
- axolotl top-k, Liger: `integrations/kd/kernels/liger.LigerFusedLinearKLTopKLogprobLoss`, the
  same loss chunked through the lm head (torch.func per chunk; compiled=False: no inductor here).
- torchtune: `ForwardKLWithChunkedOutputLoss` (8 output chunks, its default). It needs dense
  teacher logits, so a cache user must build them: top-k log-probs + the tail mass spread evenly
  over the other V - k ids, one chunk per output chunk, built inside the timed step.
- Liger JSD (TRL's GKD with use_liger_kernel): `chunked_loss.LigerFusedLinearJSDLoss`, beta 0.5
  (TRL's default), compiled=False. It takes a live teacher (hidden states + lm head), so it is
  compared with our `fused_live_divergence_loss` on the same random teacher as well.

Also timed: the lm head's three products alone (the logits, and both gradients through them,
chunk by chunk, with a loss that is one elementwise pass over the logits): the time below which
no lm-head loss can go. Its memory is not a loss's and is not compared.

    python benchmarks/loss_peers.py --chunk-sizes 1024 512 256
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_memory import (  # a sibling script, not a package
    MIB,
    SEED,
    add_shape_args,
    build_inputs,
    current_rss_bytes,
    peak_rss_bytes,
    step,
)

from akd_cache.student.loss import fused_live_divergence_loss

DEFAULT_PEERS_SITE = "/work/peers-site"
TORCHTUNE_CHUNKS = 8  # ForwardKLWithChunkedOutputLoss's default
PEER_CHUNK = 1024  # the Liger losses' default chunk size
JSD_BETA = 0.5  # TRL GKD's default
FLOOR_CHUNK = 1024
FLOOR = "floor"
WARM_SIDE = 256  # the matrices that make cuBLAS allocate its workspace before a measurement


def load_by_path(site: str, module: str) -> types.ModuleType:
    """Import `module` from `site` by file, with empty parent packages in place of the real ones."""
    parts = module.split(".")
    for depth in range(1, len(parts)):
        name = ".".join(parts[:depth])
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [os.path.join(site, *parts[:depth])]
            sys.modules[name] = package
    spec = importlib.util.spec_from_file_location(module, os.path.join(site, *parts) + ".py")
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    spec.loader.exec_module(loaded)
    return loaded


def teacher_inputs(x: dict[str, torch.Tensor], args: argparse.Namespace) -> None:
    """A live teacher for the JSD comparison: its hidden states and lm head, no grad."""
    gen = torch.Generator().manual_seed(SEED + 1)
    n = args.batch * args.seq
    x["t_hidden"] = torch.randn(n, args.hidden, generator=gen)
    x["t_weight"] = torch.randn(args.vocab, args.hidden, generator=gen).mul_(0.05)
    x["labels"] = torch.randint(args.vocab, (args.batch, args.seq), generator=gen)


def axolotl_topk(site: str) -> Callable:
    loss = load_by_path(site, "axolotl.integrations.kd.topk_logprob.forward_kl").loss

    def run(x: dict, args: argparse.Namespace) -> torch.Tensor:
        shape = (args.batch, args.seq)
        logits = (x["hidden"] @ x["weight"].T).view(*shape, -1)
        renormalised = x["top_lp"] - x["top_lp"].logsumexp(-1, keepdim=True)
        return loss(logits, x["ids"].view(*shape, -1), renormalised.view(*shape, -1),
                    torch.ones(*shape, args.k, dtype=torch.bool, device=logits.device))

    return run


def axolotl_liger(site: str) -> Callable:
    load_by_path(site, "axolotl.integrations.kd.utils")
    sys.path.insert(0, site)  # liger_kernel itself imports cleanly
    module = load_by_path(site, "axolotl.integrations.kd.kernels.liger")
    fn = module.LigerFusedLinearKLTopKLogprobLoss(
        weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, compiled=False,
        chunk_size=PEER_CHUNK, compute_ce_loss=False,
    )

    def run(x: dict, args: argparse.Namespace) -> torch.Tensor:
        shape = (args.batch, args.seq)
        return fn(x["weight"], x["hidden"].view(*shape, -1), x["ids"].view(*shape, -1),
                  x["top_lp"].view(*shape, -1),
                  torch.ones(*shape, args.k, dtype=torch.bool, device=x["hidden"].device),
                  x["labels"])

    return run


def torchtune_fkl(site: str) -> Callable:
    module = load_by_path(site, "torchtune.modules.loss.kd_losses")
    fn = module.ForwardKLWithChunkedOutputLoss(num_output_chunks=TORCHTUNE_CHUNKS)

    def run(x: dict, args: argparse.Namespace) -> torch.Tensor:
        hidden = x["hidden"].view(args.batch, args.seq, -1)
        student = [h @ x["weight"].T for h in hidden.chunk(TORCHTUNE_CHUNKS, dim=1)]
        teacher = []
        with torch.no_grad():
            per_tail_id = x["tail"] - math.log(args.vocab - args.k)
            rows_all = torch.arange(len(per_tail_id), device=per_tail_id.device)
            for rows in rows_all.view(args.batch, args.seq).chunk(TORCHTUNE_CHUNKS, dim=1):
                dense = per_tail_id[rows, None].expand(*rows.shape, args.vocab).clone()
                teacher.append(dense.scatter_(-1, x["ids"][rows], x["top_lp"][rows]))
        return fn(student, teacher, x["labels"])

    return run


def liger_jsd(site: str) -> Callable:
    sys.path.insert(0, site)
    from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDLoss

    fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=JSD_BETA,
                                 compiled=False, chunk_size=PEER_CHUNK)

    def run(x: dict, args: argparse.Namespace) -> torch.Tensor:
        return fn(x["hidden"], x["weight"], x["t_hidden"], x["t_weight"], x["labels"].view(-1))

    return run


def liger_triton_jsd(site: str) -> Callable:
    sys.path.insert(0, site)
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

    fn = LigerFusedLinearJSD(jsd_beta=JSD_BETA)

    def run(x: dict, args: argparse.Namespace) -> torch.Tensor:
        return fn(x["hidden"], x["weight"], x["t_hidden"], x["t_weight"], None)

    return run


def fused_live(chunk_size: int) -> Callable:
    def run(x: dict, args: argparse.Namespace) -> torch.Tensor:
        loss, _ = fused_live_divergence_loss(
            x["hidden"], x["weight"], None, x["t_hidden"], x["t_weight"], None,
            fkl_coef=x["fkl_coef"], rkl_coef=x["rkl_coef"], chunk_size=chunk_size,
        )
        return loss

    return run


def matmul_floor(x: dict, args: argparse.Namespace) -> torch.Tensor:
    total = x["hidden"].new_zeros(())
    for start in range(0, len(x["hidden"]), FLOOR_CHUNK):
        logits = x["hidden"][start : start + FLOOR_CHUNK] @ x["weight"].T
        total = total + (logits * x["floor_grad"][: len(logits)]).sum()
    return total


PEERS: dict[str, tuple[str, Callable[[str], Callable]]] = {
    "axolotl": ("axolotl top-k KD (materialised logits)", axolotl_topk),
    "axolotl_liger": (f"axolotl top-k KD, Liger chunked (chunk {PEER_CHUNK})", axolotl_liger),
    "torchtune": ("torchtune ForwardKLWithChunkedOutputLoss (dense teacher from top-k + tail)",
                  torchtune_fkl),
    "liger_jsd": (f"Liger/TRL chunked JSD, live teacher (chunk {PEER_CHUNK})", liger_jsd),
    "liger_triton_jsd": ("Liger fused linear JSD (Triton kernel; GPU only), live teacher",
                         liger_triton_jsd),
}


def method(name: str, args: argparse.Namespace) -> Callable:
    """One forward + backward of the named method; returns the loss value."""
    if name.startswith(("naive", "fused:")):
        variant, chunk = name.split(":") if ":" in name else (name, "0")
        return lambda x: step(variant, int(chunk), args.mode, x)
    if name.startswith("fused_live:"):
        body = fused_live(int(name.split(":")[1]))
    elif name == FLOOR:
        body = matmul_floor
    else:
        body = PEERS[name][1](args.peers_site)

    def run(x: dict) -> float:
        x["hidden"].grad = None
        x["weight"].grad = None
        loss = body(x, args)
        loss.backward()
        return loss.item()

    return run


def on_device(value: object, device: str) -> object:
    """The inputs moved to the device; the leaves that take a gradient stay leaves."""
    if isinstance(value, dict):
        return {name: on_device(item, device) for name, item in value.items()}
    if isinstance(value, tuple):
        return tuple(on_device(item, device) for item in value)
    if isinstance(value, torch.Tensor):
        return value.detach().to(device).requires_grad_(value.requires_grad)
    return value


def inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    x = build_inputs(args)
    teacher_inputs(x, args)
    x["floor_grad"] = torch.randn(FLOOR_CHUNK, args.vocab,
                                  generator=torch.Generator().manual_seed(SEED + 2))
    return on_device(x, args.device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def warm_matmul_workspace(device: str) -> None:
    """cuBLAS allocates its workspace at a process's first products (forward and backward) and
    keeps it; made before the peak is reset, it is counted against no method."""
    a = torch.randn(WARM_SIDE, WARM_SIDE, device=device, requires_grad=True)
    (a @ a.T).sum().backward()
    del a


def measure_memory(args: argparse.Namespace) -> None:
    """On the CPU, the rise of the process's peak RSS; on a GPU, of the allocator's peak."""
    run = method(args.child_methods[0], args)
    x = inputs(args)
    gc.collect()
    if args.device.startswith("cuda"):
        warm_matmul_workspace(args.device)
        synchronize(args.device)
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        loss = run(x)
        synchronize(args.device)
        peak, slack = torch.cuda.max_memory_allocated() - baseline, 0
    else:
        baseline = current_rss_bytes()
        slack = peak_rss_bytes() - baseline
        loss = run(x)
        peak = peak_rss_bytes() - baseline
    print(json.dumps({"peak_mib": peak / MIB, "baseline_slack_mib": slack / MIB, "loss": loss}))


def measure_time(args: argparse.Namespace) -> None:
    runs = {name: method(name, args) for name in args.child_methods}
    x = inputs(args)
    for run in runs.values():  # warm-up: first-touch allocations, kernel compilation
        run(x)
    best = dict.fromkeys(runs, math.inf)
    for _ in range(args.repeats):
        for name, run in runs.items():
            synchronize(args.device)
            start = time.perf_counter()
            run(x)
            synchronize(args.device)
            best[name] = min(best[name], time.perf_counter() - start)
    print(json.dumps(best))


def run_child(args: argparse.Namespace, what: str, methods: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--child-methods", *methods]
    for name in ("batch", "seq", "vocab", "hidden", "k", "repeats", "threads", "mode",
                 "peers_site", "device"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}, no output"])
        raise RuntimeError(f"{what} {methods}: {last[-1]}")
    return json.loads(lines[-1])


def timed(args: argparse.Namespace, methods: list[str]) -> dict[str, float]:
    """All methods interleaved in one process; if that process dies (a method out of device or
    host memory), each method alone, so one failure costs only its own row's time."""
    try:
        return run_child(args, "time", [*methods, FLOOR])
    except RuntimeError as err:
        print(f"the interleaved timing failed ({err}); timing each method alone")
    times = {}
    for name in [*methods, FLOOR]:
        try:
            times.update(run_child(args, "time", [name]))
        except RuntimeError as err:
            print(f"no time for {name}: {err}")
            times[name] = math.nan
    return times


def label(name: str) -> str:
    if name == "naive":
        return "naive (full [N, V] logits, topk_divergences)"
    if name.startswith("fused:"):
        return f"fused_divergence_loss, chunk {name.split(':')[1]}"
    if name.startswith("fused_live:"):
        return f"fused_live_divergence_loss (live teacher), chunk {name.split(':')[1]}"
    if name == FLOOR:
        return f"the lm head's three products alone (time floor), chunk {FLOOR_CHUNK}"
    return PEERS[name][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(parser)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[1024, 512, 256])
    parser.add_argument("--live-chunk-size", type=int, default=PEER_CHUNK)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--peers-site", default=DEFAULT_PEERS_SITE)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", choices=["memory", "time"], help=argparse.SUPPRESS)
    parser.add_argument("--child-methods", nargs="+", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        (measure_memory if args.child == "memory" else measure_time)(args)
        return

    methods = ["naive", *(f"fused:{c}" for c in args.chunk_sizes)]
    for name in PEERS:
        try:
            method(name, args)
            methods.append(name)
        except (ImportError, AttributeError, OSError) as err:  # reported, not fatal
            print(f"skipped {name}: {type(err).__name__}: {err}")
    methods.append(f"fused_live:{args.live_chunk_size}")
    memory = {}
    for name in list(methods):
        try:
            memory[name] = run_child(args, "memory", [name])
        except RuntimeError as err:
            print(f"skipped {name}: {err}")
            methods.remove(name)
    times = timed(args, methods)
    where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
             else f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads")
    print(f"{where}, "
          f"torch {torch.__version__}; N = {args.batch * args.seq}, V = {args.vocab}, "
          f"H = {args.hidden}, k = {args.k}, tail mode {args.mode}, best of {args.repeats}")
    print("| method | peak MiB | x naive | best s | x naive | loss | baseline slack MiB |")
    print("|---|---|---|---|---|---|---|")
    base_mem, base_time = memory["naive"]["peak_mib"], times["naive"]
    for name in methods:
        mem = memory[name]
        print(f"| {label(name)} | {mem['peak_mib']:.0f} | {mem['peak_mib'] / base_mem:.2f} "
              f"| {times[name]:.2f} | {times[name] / base_time:.2f} | {mem['loss']:.6g} "
              f"| {mem['baseline_slack_mib']:.0f} |")
    print(f"| {label(FLOOR)} | - | - | {times[FLOOR]:.2f} | {times[FLOOR] / base_time:.2f} | - "
          "| - |")


if __name__ == "__main__":
    main()
