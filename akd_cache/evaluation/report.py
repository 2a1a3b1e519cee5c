"""The report: the paper's tables 5, 6, 7, 9, 11, 12 and 13 and four plots, from the run files.

Everything is read from what the stages left under `runs/`; a method that was not run (no
`runs/eval/<model>/metrics.json`) is left out of its table, and a table with nothing in it says
"not run", so a partial pipeline still gets a report. Experiment names are mapped to the
paper's rows through params.yaml's `experiments` (method, variant, LoRA), never by guessing from
the name, except `seqkd`: an experiment of that name is SeqKD whatever its method (SeqKD is SFT on
the teacher's generations), and never stands for another row.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from matplotlib.figure import Figure

from akd_cache import jsonl
from akd_cache.config import Experiment, Params
from akd_cache.evaluation.score import accuracy_loss
from akd_cache.evaluation.taxonomy import (
    CATEGORIES,
    CUT_OFF,
    EMPTY_FUNCTION,
    MISSING_IMPORT,
    NOT_REPRODUCED,
    NOTHING_GENERATED,
    OTHER,
    UNBALANCED,
    WRONG_NAME,
)

TEACHER = "teacher"
STUDENT = "student"
SEQKD = "seqkd"
DATASETS: tuple[tuple[str, str], ...] = (("humaneval", "HumanEval"), ("mbpp", "MBPP"))
MISSING = "-"
NOT_RUN = "_not run_"
PERCENT = 100.0
JSON_DIGITS = 4  # percent values in summary.json, rounded to drop float noise
TEMPLATE_DIGITS = 4
PLOT_SIZE = (7.0, 4.0)
PLOT_DPI = 120
BAR_WIDTH = 0.4
BETA_RANGE = (0.0, 1.0)  # beta is clamped to [0, 1]: the whole range shows where it sits
PLOT_FILES = {
    "beta": "beta_trajectory.png",
    "loss": "loss_curves.png",
    "pass": "pass_at_1.png",
    "tail": "tail_mass_hist.png",
}
# Where each subcategory of the automated taxonomy belongs (the eval files key them by name alone).
SUBCATEGORY_PARENT = {
    EMPTY_FUNCTION: "AssertionError",
    WRONG_NAME: "NameError",
    NOTHING_GENERATED: "NameError",
    MISSING_IMPORT: "NameError",
    UNBALANCED: "SyntaxError",
    CUT_OFF: "SyntaxError",
    NOT_REPRODUCED: OTHER,
}
SUBCATEGORY_SEPARATORS = (": ", "/")


# ----------------------------------------------------------------------------- reading the runs


@dataclass
class RunData:
    """Everything the report reads, keyed by model / experiment name."""

    evals: dict[str, dict] = field(default_factory=dict)
    train: dict[str, dict] = field(default_factory=dict)
    logs: dict[str, list[dict]] = field(default_factory=dict)
    templates: dict | None = None
    cache_pointer: dict | None = None
    tail_hist: dict | None = None


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def read_log(path: Path) -> list[dict]:
    """The JSON lines of a training log; a line cut short by a run still writing is skipped."""
    return [row for row in jsonl.read_lines(path) if not isinstance(row, jsonl.BadLine)]


def _per_folder(root: Path, name: str) -> dict[str, Path]:
    if not root.is_dir():
        return {}
    return {p.parent.name: p for p in sorted(root.glob(f"*/{name}")) if p.is_file()}


def load_tail_histogram(pointer_path: Path) -> dict | None:
    """The cache's tail-mass histogram (`{"edges", "counts"}`), or None when there is no
    finished cache to read it from. Imported lazily: the reader pulls in torch."""
    pointer = read_json(pointer_path)
    if pointer is None:
        return None
    from akd_cache.store.reader import CacheError, TeacherCache

    try:
        meta = TeacherCache(pointer["location"], allow_incomplete=True).meta
    except CacheError:
        return None
    return None if meta.stats is None else meta.stats.tail_mass_log10_hist.model_dump()


def load_runs(runs_dir: Path, train_dir: Path | None = None) -> RunData:
    train_dir = runs_dir / "train" if train_dir is None else train_dir
    pointer_path = runs_dir / "teacher_cache.json"
    return RunData(
        evals={m: json.loads(p.read_text()) for m, p in
               _per_folder(runs_dir / "eval", "metrics.json").items()},
        train={e: json.loads(p.read_text()) for e, p in
               _per_folder(train_dir, "metrics.json").items()},
        logs={e: read_log(p) for e, p in _per_folder(train_dir, "log.jsonl").items()},
        templates=read_json(runs_dir / "template_analysis.json"),
        cache_pointer=read_json(pointer_path),
        tail_hist=load_tail_histogram(pointer_path),
    )


# ----------------------------------------------------------------- mapping runs to the paper's rows


@dataclass(frozen=True)
class Row:
    label: str
    model: str  # the folder under runs/eval (and runs/train for a trained model)


def find_experiment(
    experiments: dict[str, Experiment],
    available: Iterable[str],
    method: str,
    *,
    lora: bool = False,
    variant: str | None = None,
    preferred: str | None = None,
) -> str | None:
    """The evaluated experiment standing for one paper row: `preferred` when it qualifies, else
    the first qualifying one in params order. `seqkd` only ever stands for SeqKD."""
    available = set(available)
    candidates = [
        name for name, exp in experiments.items()
        if name in available and name != SEQKD and exp.method == method
        and (exp.lora is not None) == lora and (variant is None or exp.variant == variant)
    ]
    if preferred in candidates:
        return preferred
    return candidates[0] if candidates else None


def _rows(specs: Sequence[tuple[str, str | None]]) -> list[Row]:
    return [Row(label, model) for label, model in specs if model is not None]


def main_rows(params: Params, evals: dict[str, dict]) -> list[Row]:
    """Table 5: teacher, untrained student, SFT, SFT+LoRA, KD, RKD, SeqKD, AKD."""
    exps, have = params.experiments, evals.keys()
    return _rows([
        ("Teacher", TEACHER if TEACHER in have else None),
        ("Student, untrained", STUDENT if STUDENT in have else None),
        ("SFT", find_experiment(exps, have, "sft", preferred="sft")),
        ("SFT+LoRA", find_experiment(exps, have, "sft", lora=True, preferred="sft_lora")),
        ("KD", find_experiment(exps, have, "kd", preferred="kd")),
        ("RKD", find_experiment(exps, have, "rkd", preferred="rkd")),
        ("SeqKD", SEQKD if SEQKD in exps and SEQKD in have
         else find_experiment(exps, have, SEQKD, preferred=SEQKD)),
        ("AKD", find_experiment(exps, have, "akd", variant="m3", preferred="akd")),
    ])


def lora_rows(params: Params, evals: dict[str, dict]) -> list[Row]:
    """Table 6: AKD with full fine-tuning against AKD with LoRA."""
    exps, have = params.experiments, evals.keys()
    return _rows([
        ("AKD", find_experiment(exps, have, "akd", variant="m3", preferred="akd")),
        ("AKD+LoRA", find_experiment(exps, have, "akd", lora=True, variant="m3",
                                     preferred="akd_lora")),
    ])


def ablation_rows(params: Params, evals: dict[str, dict]) -> list[Row]:
    """Table 11: the AKD variants M1, M2, M3 (no LoRA)."""
    exps, have = params.experiments, evals.keys()
    preferred = {"m1": "akd_m1", "m2": "akd_m2", "m3": "akd"}
    return _rows([
        (variant.upper(), find_experiment(exps, have, "akd", variant=variant, preferred=name))
        for variant, name in preferred.items()
    ])


def fixed_beta_rows(params: Params, evals: dict[str, dict]) -> list[Row]:
    """Table 12: KD as beta 0, each fixed-beta experiment by beta, RKD as beta 1."""
    exps, have = params.experiments, evals.keys()
    fixed = sorted(
        (exp.beta, name) for name, exp in exps.items()
        if exp.method == "fixed_beta" and exp.lora is None and name in have
    )
    return _rows([
        ("β = 0 (KD)", find_experiment(exps, have, "kd", preferred="kd")),
        *[(f"β = {beta:g}", name) for beta, name in fixed],
        ("β = 1 (RKD)", find_experiment(exps, have, "rkd", preferred="rkd")),
    ])


def model_order(params: Params, names: Iterable[str]) -> list[str]:
    """Teacher, student, then experiments in params order, then anything else by name."""
    names = set(names)
    first = [TEACHER, STUDENT, *params.experiments]
    return [n for n in first if n in names] + sorted(names - set(first))


# ------------------------------------------------------------------------------------ formatting


def pct(value: float | None) -> str:
    """A fraction as percent with one decimal, as the paper prints pass@1 and accuracy loss."""
    if value is None or math.isnan(value):
        return MISSING
    return f"{PERCENT * value:.1f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def section(title: str, caption: str, body: str | None) -> str:
    return f"## {title}\n\n{caption}\n\n{body if body else NOT_RUN}\n"


# ------------------------------------------------------------------------------ pass@1 tables


def pass_numbers(model: str, evals: dict[str, dict]) -> dict[str, float]:
    """pass@1 and accuracy loss per dataset as fractions; a number that cannot be had is left
    out (the teacher has no loss; a loss against a teacher that solved nothing is undefined)."""
    out: dict[str, float] = {}
    teacher = evals.get(TEACHER, {}).get("datasets", {})
    for key, _ in DATASETS:
        scores = evals[model].get("datasets", {}).get(key)
        if scores is None:
            continue
        out[key] = scores["base_pass_at_1"]
        out[f"{key}_plus"] = scores["plus_pass_at_1"]
        if model != TEACHER and key in teacher:
            loss = accuracy_loss(teacher[key]["base_pass_at_1"], scores["base_pass_at_1"])
            if not math.isnan(loss):
                out[f"{key}_loss"] = loss
    return out


PASS_COLUMNS: tuple[tuple[str, str], ...] = tuple(
    column for key, name in DATASETS for column in (
        (key, f"{name} pass@1"), (f"{key}_loss", "acc. loss"), (f"{key}_plus", f"{name}+ pass@1"),
    )
)


def pass_table(rows: Sequence[Row], evals: dict[str, dict]) -> str | None:
    """pass@1 (%) and accuracy loss (%) against this run's teacher, one row per method."""
    if not rows:
        return None
    header = ["method", "run", *(title for _, title in PASS_COLUMNS)]
    body = []
    for row in rows:
        numbers = pass_numbers(row.model, evals)
        body.append([row.label, f"`{row.model}`",
                     *(pct(numbers.get(key)) for key, _ in PASS_COLUMNS)])
    return md_table(header, body)


def main_summary(rows: Sequence[Row], evals: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Table 5 for `dvc metrics`: percent, keyed by run name."""
    return {
        row.model: {k: round(PERCENT * v, JSON_DIGITS) for k, v in
                    pass_numbers(row.model, evals).items()}
        for row in rows
    }


# ------------------------------------------------------------------------------- other tables


def resources_table(params: Params, train: dict[str, dict]) -> str | None:
    """Table 7: what each trained run cost, the student alone against the cache."""
    names = [n for n in model_order(params, train) if n not in (TEACHER, STUDENT)]
    if not names:
        return None
    header = ["run", "method", "steps", "peak memory MB", "wall s", "tokens/s"]
    body = []
    for name in names:
        m = train[name]
        body.append([
            f"`{name}`", str(m.get("method", MISSING)), str(m.get("steps", MISSING)),
            _number(m.get("peak_memory_mb"), ",.0f"), _number(m.get("wall_s"), ",.0f"),
            _number(m.get("tokens_per_s"), ",.1f"),
        ])
    return md_table(header, body)


def _number(value: float | None, spec: str) -> str:
    return MISSING if value is None else format(value, spec)


def template_table(analysis: dict | None) -> str | None:
    """Table 9: each template's teacher probability and entropy, and its wins."""
    if not analysis or not analysis.get("templates"):
        return None
    n = analysis.get("n_samples", 0)
    wins = analysis.get("wins", {})
    header = ["template", "mean probability", "mean entropy", "wins (probability)",
              "wins (entropy)"]
    body = []
    for name, scores in analysis["templates"].items():
        body.append([
            f"`{name}`",
            f"{scores['mean_probability']:.{TEMPLATE_DIGITS}f}",
            f"{scores['mean_entropy']:.{TEMPLATE_DIGITS}f}",
            *(f"{wins.get(kind, {}).get(name, 0)} / {n}" for kind in ("probability", "entropy")),
        ])
    return md_table(header, body)


def _split_subcategory(key: str) -> tuple[str, str]:
    """(category, subcategory) of a subcategory key: `"empty function"`, or with its category
    in front (`"NameError: missing import"`), or unknown (filed under `other`)."""
    for sep in SUBCATEGORY_SEPARATORS:
        head, found, tail = key.partition(sep)
        if found and (head in CATEGORIES or head == OTHER):
            return head, tail
    return SUBCATEGORY_PARENT.get(key, OTHER), key


def taxonomy_row_keys(summaries: Sequence[dict]) -> list[tuple[str, str | None]]:
    """(category, subcategory or None) rows, in the paper's category order, each category
    followed by its subcategories."""
    categories = {c for s in summaries for c in s.get("categories", {})}
    subs: dict[str, set[str]] = {}
    for s in summaries:
        for key in s.get("subcategories", {}):
            category, sub = _split_subcategory(key)
            categories.add(category)
            subs.setdefault(category, set()).add(sub)
    known = [*CATEGORIES, OTHER]
    ordered = [c for c in known if c in categories] + sorted(categories - set(known))
    return [row for c in ordered for row in [(c, None), *((c, s) for s in sorted(subs.get(c, ())))]]


def _subcategory_count(summary: dict, category: str, sub: str) -> int:
    return sum(n for key, n in summary.get("subcategories", {}).items()
               if _split_subcategory(key) == (category, sub))


def taxonomy_table(models: Sequence[str], summaries: Sequence[dict]) -> str:
    """One dataset's Table 13: one column per model."""
    rows: list[list[str]] = [
        [label, *(str(s.get(key, MISSING)) for s in summaries)]
        for key, label in (("total", "solutions"), ("correct", "correct"),
                           ("complete", "complete"), ("incomplete", "incomplete"))
    ]
    rows.append(["pass rate among complete (%)",
                 *(pct(s.get("pass_rate_complete")) for s in summaries)])
    for category, sub in taxonomy_row_keys(summaries):
        if sub is None:
            rows.append([category, *(str(s.get("categories", {}).get(category, 0))
                                     for s in summaries)])
        else:
            rows.append([f"{category}: {sub}",
                         *(str(_subcategory_count(s, category, sub)) for s in summaries)])
    return md_table(["", *(f"`{m}`" for m in models)], rows)


def taxonomy_tables(params: Params, evals: dict[str, dict]) -> str | None:
    """Table 13 for each dataset that has a taxonomy."""
    parts = []
    for key, name in DATASETS:
        models = [m for m in model_order(params, evals)
                  if key in evals[m].get("taxonomy", {})]
        if models:
            summaries = [evals[m]["taxonomy"][key] for m in models]
            parts.append(f"**{name}**\n\n{taxonomy_table(models, summaries)}")
    return "\n\n".join(parts) or None


# ------------------------------------------------------------------------------------------ plots


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


def write_plots(
    params: Params, data: RunData, plot_dir: Path
) -> dict[str, Path | None]:
    """Each plot's path, or None where there was nothing to draw (an old file is removed)."""
    beta_runs = [n for n, e in params.experiments.items() if e.method in ("akd", "fixed_beta")]
    makers: dict[str, Callable[[Path], Path | None]] = {
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


# --------------------------------------------------------------------------------------- report

CAPTIONS = {
    5: "Paper Table 5: pass@1 (%) of the teacher, the untrained student and each method on "
       "HumanEval(+) and MBPP(+); accuracy loss (%) = (teacher - student) / teacher, "
       "against this run's teacher.",
    6: "Paper Table 6: AKD with full fine-tuning against AKD with LoRA (the paper found LoRA "
       "worse).",
    7: "Paper Table 7: training resources per run (the paper ran the teacher online in the same "
       "process; here the student trains alone against the teacher cache).",
    9: "Paper Table 9: prompt templates judged by the teacher's mean probability and mean entropy "
       "over the expected output tokens, and on how many samples each template wins.",
    11: "Paper Table 11: ablation of AKD's beta update: M1 plain descent, M2 with the negative "
        "loss (ascent), M3 with the per-epoch reset (full AKD).",
    12: "Paper Table 12: fixed beta, from KD (beta = 0) to RKD (beta = 1).",
    13: "Paper Table 13: error taxonomy of the generated solutions under the base tests, one "
        "column per model.",
}
PLOT_TITLES = {
    "beta": "beta per step",
    "loss": "training loss",
    "pass": "pass@1 per model",
    "tail": "teacher tail mass",
}


def n_tasks(evals: dict[str, dict]) -> str:
    """Tasks per dataset, from the teacher's evaluation (else any model's)."""
    for model in [TEACHER, *sorted(evals)]:
        datasets = evals.get(model, {}).get("datasets")
        if datasets:
            return ", ".join(f"{name} {datasets[key]['n_tasks']}"
                             for key, name in DATASETS if key in datasets)
    return MISSING


def header(params: Params, data: RunData) -> str:
    profile = params.active
    key = (data.cache_pointer or {}).get("key", MISSING)
    return "\n".join([
        "# akd-cache report",
        "",
        f"- profile: `{params.profile}`",
        f"- teacher: `{profile.teacher.model}`",
        f"- student: `{profile.student.model}`",
        f"- teacher cache: `{key}`",
        f"- tasks: {n_tasks(data.evals)}",
        "",
    ])


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


def render_markdown(params: Params, data: RunData, plots: dict[str, Path | None],
                    report_dir: Path) -> str:
    evals = data.evals
    parts = [
        header(params, data),
        section("Table 5: main results", CAPTIONS[5], pass_table(main_rows(params, evals), evals)),
        section("Table 6: LoRA", CAPTIONS[6], pass_table(lora_rows(params, evals), evals)),
        section("Table 7: resources", CAPTIONS[7], resources_table(params, data.train)),
        section("Table 9: prompt templates", CAPTIONS[9], template_table(data.templates)),
        section("Table 11: ablation", CAPTIONS[11],
                pass_table(ablation_rows(params, evals), evals)),
        section("Table 12: fixed beta", CAPTIONS[12],
                pass_table(fixed_beta_rows(params, evals), evals)),
        section("Table 13: error taxonomy", CAPTIONS[13], taxonomy_tables(params, evals)),
        plots_section(plots, report_dir),
    ]
    return "\n".join(parts)


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    plots: dict[str, Path | None]
    summary: dict


def build_report(
    params: Params, runs_dir: Path, report_dir: Path, train_dir: Path | None = None
) -> ReportFiles:
    """Read the runs, draw the plots, write `report.md`; the caller writes `summary`."""
    data = load_runs(runs_dir, train_dir)
    plots = write_plots(params, data, report_dir / "plots")
    markdown = report_dir / "report.md"
    report_dir.mkdir(parents=True, exist_ok=True)
    markdown.write_text(render_markdown(params, data, plots, report_dir))
    summary = {"table5": main_summary(main_rows(params, data.evals), data.evals)}
    return ReportFiles(markdown, plots, summary)
