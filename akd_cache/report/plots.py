"""The report's plots (held-out divergence from the teacher, beta per step, training loss,
pass@1, the teacher's tail mass) and the markdown section that shows them. A plot with nothing
to draw is left out."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path

from matplotlib.figure import Figure

from akd_cache.config import Params
from akd_cache.report.markdown import NOT_RUN, PERCENT
from akd_cache.report.rows import TEACHER, model_order
from akd_cache.report.runs import RunData
from akd_cache.report.tables import DATASETS

PLOT_SIZE = (7.0, 4.0)
PLOT_DPI = 120
BAR_WIDTH = 0.4
BETA_RANGE = (0.0, 1.0)  # beta is clamped to [0, 1]: the whole range shows where it sits
BETA_METHODS = ("akd", "fixed_beta")
PLOT_FILES = {
    "fidelity": "fidelity.png",
    "beta": "beta_trajectory.png",
    "loss": "loss_curves.png",
    "pass": "pass_at_1.png",
    "tail": "tail_mass_hist.png",
}
PLOT_TITLES = {
    "fidelity": "held-out divergence from the teacher",
    "beta": "beta per step",
    "loss": "training loss",
    "pass": "pass@1 per model",
    "tail": "teacher tail mass",
}


def series(log: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged quantity; lines without it (the train summary) are skipped
    and a step logged twice (a resumed run) keeps its last value."""
    by_step = {row["step"]: row[key] for row in log if "step" in row and row.get(key) is not None}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=PLOT_DPI)
    return path


def line_plot(
    lines: dict[str, tuple[list[int], list[float]]],
    ylabel: str,
    title: str,
    path: Path,
    ylim: tuple[float, float] | None = None,
) -> Path | None:
    lines = {name: xy for name, xy in lines.items() if xy[0]}
    if not lines:
        return None
    fig = Figure(figsize=PLOT_SIZE)
    ax = fig.add_subplot()
    for name, (steps, values) in lines.items():
        ax.plot(steps, values, label=name)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def fidelity_plot(models: Sequence[str], fidelity: dict[str, dict], path: Path) -> Path | None:
    """Grouped bars with bootstrap 95% intervals: exact held-out FKL and RKL per model."""
    models = [m for m in models if "fkl" in fidelity[m]["metrics"]]
    if not models:
        return None
    fig = Figure(figsize=PLOT_SIZE)
    ax = fig.add_subplot()
    xs = range(len(models))
    for i, key in enumerate(("fkl", "rkl")):
        stats = [fidelity[m]["metrics"][key] for m in models]
        means = [s["mean"] for s in stats]
        errors = [[s["mean"] - s["ci_low"] for s in stats],
                  [s["ci_high"] - s["mean"] for s in stats]]
        ax.bar([x + (i - 0.5) * BAR_WIDTH for x in xs], means, BAR_WIDTH, yerr=errors,
               capsize=3, label=f"{key.upper()} (exact)")
    ax.set_xticks(list(xs), models, rotation=30, ha="right")
    ax.set(ylabel="nat/token", title="held-out divergence from the live teacher (95% CI)")
    ax.legend()
    return _save(fig, path)


def pass_plot(models: Sequence[str], evals: dict[str, dict], path: Path) -> Path | None:
    """Grouped bars: base pass@1 (%) on HumanEval and MBPP per model."""
    models = [m for m in models if evals[m].get("datasets")]
    if not models:
        return None
    fig = Figure(figsize=PLOT_SIZE)
    ax = fig.add_subplot()
    xs = range(len(models))
    for i, (key, name) in enumerate(DATASETS):
        values = [PERCENT * evals[m]["datasets"].get(key, {}).get("base_pass_at_1", math.nan)
                  for m in models]
        ax.bar([x + (i - 0.5) * BAR_WIDTH for x in xs], values, BAR_WIDTH, label=name)
    ax.set_xticks(list(xs), models, rotation=30, ha="right")
    ax.set(ylabel="pass@1 (%)", title="pass@1 per model (base tests)")
    ax.legend()
    return _save(fig, path)


def tail_label(lo: float, hi: float, first: bool) -> str:
    return f"< 1e{hi:g}" if first else f"1e{lo:g}..1e{hi:g}"


def tail_plot(hist: dict | None, path: Path) -> Path | None:
    """The teacher's mass outside its top k, per decade (the first bin holds everything below)."""
    if not hist or not hist.get("counts"):
        return None
    edges, counts = hist["edges"], hist["counts"]
    labels = [tail_label(lo, hi, i == 0) for i, (lo, hi) in enumerate(pairwise(edges))]
    fig = Figure(figsize=PLOT_SIZE)
    ax = fig.add_subplot()
    ax.bar(labels, counts)
    ax.set(xlabel="teacher tail mass", ylabel="rows", title="teacher mass outside the top k")
    ax.tick_params(axis="x", rotation=30)
    return _save(fig, path)


def write_plots(params: Params, data: RunData, plot_dir: Path) -> dict[str, Path | None]:
    """Each plot's path, or None where there was nothing to draw (an old file is removed)."""
    beta_runs = [n for n, e in params.experiments.items() if e.method in BETA_METHODS]
    makers: dict[str, Callable[[Path], Path | None]] = {
        "fidelity": lambda p: fidelity_plot(
            [n for n in model_order(params, data.fidelity) if n != TEACHER], data.fidelity, p),
        "beta": lambda p: line_plot(
            {n: series(data.logs[n], "beta_used") for n in beta_runs if n in data.logs},
            "beta used", "beta per step (AKD and fixed beta)", p, BETA_RANGE),
        "loss": lambda p: line_plot(
            {n: series(data.logs[n], "loss") for n in model_order(params, data.logs)},
            "training loss", "training loss per step", p),
        "pass": lambda p: pass_plot(model_order(params, data.evals), data.evals, p),
        "tail": lambda p: tail_plot(data.tail_hist, p),
    }
    written = {}
    for name, make in makers.items():
        path = plot_dir / PLOT_FILES[name]
        path.unlink(missing_ok=True)
        written[name] = make(path)
    return written


def plots_section(plots: dict[str, Path | None], report_dir: Path) -> str:
    lines = ["## Plots", ""]
    for name, path in plots.items():
        title = PLOT_TITLES[name]
        if path is None:
            lines.append(f"- {title}: {NOT_RUN}")
        else:
            lines += [f"### {title}", "", f"![{title}]({path.relative_to(report_dir).as_posix()})",
                      ""]
    return "\n".join(lines) + "\n"
