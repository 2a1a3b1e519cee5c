"""Parity: does a student trained from the cache end where one trained against the live teacher
ends? And does distillation beat SFT on held-out samples?

For each method (kd, rkd, akd) and seed, the same experiment trains several ways: from the k = 64
cache with the bucket tail, with the uniform tail, with the stored tail shape (`--ways ... shape`,
for a cache built with `cache.tail_shape: true`), with the per-row tail code (`--ways ...
lowrank`: the same training split cached again with `cache.tail_rank: --tail-rank`, built here
once, next to the demo's cache), and online against the live teacher (same data order, seed and
Trainer; only the teacher's distribution differs). SFT trains
once per seed as the no-teacher baseline. Every student is then measured with `akd fidelity`'s
held-out exact FKL / RKL against the live teacher. Run from the repository root after the demo's
Stage 1 (`dvc repro cache_teacher cache_heldout`):

    python benchmarks/parity.py --seeds 0 1 2
    python benchmarks/parity.py --seeds 0 1 2 --max-steps 24   # a cheaper, shorter run

Training runs resume (a finished run is reused), so an interrupted benchmark continues where it
stopped. Results: `<out>/parity.json`, a Markdown table on stdout and `<out>/parity_beta.png`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from functools import partial
from pathlib import Path

import torch
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from akd_cache.config import AKD, KD, RKD, SFT, Experiment, ModelRef, Profile, load_params
from akd_cache.data.instructions import read_examples
from akd_cache.evaluation.fidelity import per_sample_fidelity
from akd_cache.models.resolve import resolve_model
from akd_cache.report.plots import series
from akd_cache.store.reader import TeacherCache
from akd_cache.student.run import train_experiment
from akd_cache.teacher.build import build_cache
from stages.common import HELDOUT_CACHE_POINTER, PREPARED_DIR, TEACHER_CACHE_POINTER
from stages.fidelity import load, load_teacher

METHODS = {"kd": KD, "rkd": RKD, "akd": AKD}
WAYS = ("bucket", "uniform", "shape", "lowrank", "online")
LOWRANK = "lowrank"
DEFAULT_TAIL_RANK = 64
DEFAULT_WAYS = ("bucket", "uniform", "online")
ONLINE = "online"
BASELINE = "sft"
PLOT_SIZE = (8, 4.5)
SIGMAS = 2  # kd must beat sft by more than this many seed standard deviations


def experiment(method: str, way: str) -> Experiment:
    if method == BASELINE:
        return SFT()
    if way == ONLINE:
        return METHODS[method](online=True)
    return METHODS[method](tail_mode=way)


def runs(methods: list[str], ways: list[str]) -> list[tuple[str, str]]:
    return [(BASELINE, "reference")] + [(m, w) for m in methods for w in ways]


def coded_cache(profile: Profile, rank: int) -> dict[str, str]:
    """The demo's training split cached with a tail code of `rank` (its own key: built once)."""
    examples = read_examples(PREPARED_DIR / "train.jsonl")
    summary = json.loads((PREPARED_DIR / "summary.json").read_text())
    cache = profile.cache.model_copy(update={"tail_rank": rank})
    built = build_cache(profile.teacher, profile.data, cache, examples, summary["dataset_sha256"])
    return {"key": built.key, "location": built.location}


def train_all(args: argparse.Namespace) -> dict[str, Path]:
    params = load_params(args.params)
    profile = params.active
    demo_cache = json.loads(TEACHER_CACHE_POINTER.read_text())
    caches = {way: demo_cache for way in args.ways}
    if LOWRANK in args.ways:
        caches[LOWRANK] = coded_cache(profile, args.tail_rank)
    caches[BASELINE] = caches[ONLINE]
    teacher = ModelRef(model=resolve_model(profile.teacher.model, "teacher.model",
                                           profile.teacher.revision),
                       revision=profile.teacher.revision)
    student = resolve_model(profile.student.model, "student.model")
    folders = {}
    for seed in args.seeds:
        train = profile.train.model_copy(update={"seed": seed, "max_steps": args.max_steps})
        for method, way in runs(args.methods, args.ways):
            name = f"{method}-{way}-s{seed}"
            out = args.out / name
            folders[name] = out
            if (out / "metrics.json").is_file():
                continue
            print(f"parity: training {name}", flush=True)
            cache = caches[BASELINE if method == BASELINE else way]
            metrics = train_experiment(cache["location"], student, experiment(method, way), train,
                                       out, name, cache_cfg=profile.cache, teacher=teacher,
                                       cache_key=cache["key"])
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return folders


def measure(args: argparse.Namespace, folders: dict[str, Path]) -> dict[str, dict]:
    """Held-out exact FKL / RKL of every trained student, a seed's students per teacher pass
    (one model at a time on the profile's fidelity device)."""
    params = load_params(args.params)
    profile = params.active
    heldout = TeacherCache(json.loads(HELDOUT_CACHE_POINTER.read_text())["location"])
    device = profile.fidelity.device
    teacher = partial(load_teacher, profile.teacher, device)
    results = {}
    for seed in args.seeds:
        names = [n for n in folders if n.endswith(f"-s{seed}")]
        students = {n: partial(load, str(folders[n] / "model"), device) for n in names}
        per_sample = per_sample_fidelity(students, heldout, teacher,
                                         temperature=profile.train.temperature, device=device)
        for name in names:
            metrics = json.loads((folders[name] / "metrics.json").read_text())
            results[name] = {
                "fkl": float(per_sample[name]["fkl"].mean()),
                "rkl": float(per_sample[name]["rkl"].mean()),
                "nll": float(per_sample[name]["nll"].mean()),
                "final_beta": metrics["final_beta"], "wall_s": metrics["wall_s"],
                "peak_memory_mb": metrics["peak_memory_mb"], "steps": metrics["steps"],
            }
    return results


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def table(args: argparse.Namespace, results: dict[str, dict]) -> str:
    def values(method: str, way: str, key: str) -> list[float]:
        return [results[f"{method}-{way}-s{s}"][key] for s in args.seeds]

    header = ("| method | teacher | held-out FKL | held-out RKL | FKL gap to online | "
              "RKL gap to online | wall s | peak MB |")
    lines = [header, "|" + "---|" * 8]
    for method, way in runs(args.methods, args.ways):
        gaps = []
        for key in ("fkl", "rkl"):
            if method == BASELINE or way == ONLINE:
                gaps.append("-")
                continue
            rel = [(c - o) / o for c, o in zip(values(method, way, key),
                                               values(method, ONLINE, key), strict=True)]
            worst = max(rel, key=abs)
            gaps.append(f"{100 * statistics.fmean(rel):+.1f}% (max {100 * worst:+.1f}%)")
        lines.append(
            f"| {method} | {way} | {mean_sd(values(method, way, 'fkl'))} | "
            f"{mean_sd(values(method, way, 'rkl'))} | {gaps[0]} | {gaps[1]} | "
            f"{statistics.fmean(values(method, way, 'wall_s')):.0f} | "
            f"{statistics.fmean(values(method, way, 'peak_memory_mb')):,.0f} |")
    if "kd" not in args.methods or "bucket" not in args.ways:
        return "\n".join(lines)
    sft, kd = values(BASELINE, "reference", "fkl"), values("kd", "bucket", "fkl")
    margin = statistics.fmean(sft) - statistics.fmean(kd)
    spread = max(statistics.stdev(sft), statistics.stdev(kd)) if len(args.seeds) > 1 else 0.0
    verdict = "holds" if margin > SIGMAS * spread else "does not hold"
    verdict_line = (f"kd (cache, bucket) vs sft, held-out FKL: sft - kd = {margin:.3f} nat/token; "
                    f"{SIGMAS} x the larger seed sd = {SIGMAS * spread:.3f}: the demo's target "
                    f"(b) {verdict}.")
    lines += ["", verdict_line]
    return "\n".join(lines)


def beta_plot(args: argparse.Namespace, folders: dict[str, Path]) -> Path | None:
    fig = Figure(figsize=PLOT_SIZE)
    ax = fig.add_subplot()
    for way in args.ways:
        for i, seed in enumerate(args.seeds):
            log = [json.loads(line) for line in
                   (folders[f"akd-{way}-s{seed}"] / "log.jsonl").read_text().splitlines()]
            steps, betas = series(log, "beta_used")
            ax.plot(steps, betas, color=f"C{WAYS.index(way)}", alpha=1.0 if i == 0 else 0.4,
                    label=way if i == 0 else None)
    cache_ways = ", ".join(w for w in args.ways if w != ONLINE)
    ax.set(xlabel="step", ylabel="beta used", ylim=(0, 1),
           title=f"AKD's beta: cache ({cache_ways} tail) vs online teacher, every seed")
    ax.legend()
    path = args.out / "parity_beta.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--ways", nargs="+", default=list(DEFAULT_WAYS), choices=list(WAYS),
                        help="where the teacher's distribution comes from; online is the "
                             "reference every cache way is compared with")
    parser.add_argument("--max-steps", type=int, default=-1, help="-1: the profile's epochs")
    parser.add_argument("--tail-rank", type=int, default=DEFAULT_TAIL_RANK,
                        help="the tail code's rank for the lowrank way")
    parser.add_argument("--out", type=Path, default=Path("runs/parity"))
    args = parser.parse_args()
    if ONLINE not in args.ways:
        parser.error("--ways needs online: it is what the cache ways are compared with")
    args.out.mkdir(parents=True, exist_ok=True)
    folders = train_all(args)
    results = measure(args, folders)
    (args.out / "parity.json").write_text(json.dumps(results, indent=2))
    plot = beta_plot(args, folders) if "akd" in args.methods else None
    print(f"\n{datetime.date.today()}, {platform.platform()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}; `python benchmarks/parity.py "
          f"{' '.join(sys.argv[1:])}`\n")
    print(table(args, results))
    print(f"\nbeta plot: {plot}")


if __name__ == "__main__":
    main()
