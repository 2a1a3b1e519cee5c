"""The report as an ordered list of sections: read the runs, draw the plots, write `report.md`.

A method that was not run (no `runs/eval/<model>/metrics.json`) is left out of its table, and a
table with nothing in it says "not run", so a partial pipeline still gets a report. Adding a
table is one function in `tables.py` and one `Section` in `SECTIONS`, where it should appear.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from akd_cache.config import Params
from akd_cache.report.markdown import MISSING, section
from akd_cache.report.plots import plots_section, write_plots
from akd_cache.report.rows import TEACHER, report_models
from akd_cache.report.runs import RunData, load_runs
from akd_cache.report.tables import (
    DATASETS,
    ablation_table,
    fidelity_table,
    fixed_beta_table,
    lora_table,
    main_summary,
    main_table,
    parity_table,
    resources_table,
    taxonomy_table,
    template_table,
)


@dataclass(frozen=True)
class Section:
    title: str
    caption: str
    table: Callable[[Params, RunData], str | None]


SECTIONS: tuple[Section, ...] = (
    Section(
        "Fidelity on the held-out split",
        "How close each student is to the teacher on held-out samples it never trained on "
        "(response positions only; nat/token, per-sample length-normalised means with a "
        "bootstrap 95% interval over samples). Exact FKL = KL(teacher || student) and RKL = "
        "KL(student || teacher) are over the full vocabulary against the live teacher; bucket, "
        "uniform, shape (for a cache with a tail shape) and lowrank (with a tail code) are the "
        "held-out cache's view of the same in each tail mode (what a user without the teacher "
        "sees); NLL ref is the student's NLL of the reference responses, top-1 agree the share "
        "of positions where both argmaxes agree, tail mass the student's mass outside the "
        "teacher's cached top-k.",
        fidelity_table,
    ),
    Section(
        "Parity: cache against online teacher",
        "The same experiment trained from the cache and against the live teacher (same data, "
        "order, seed and Trainer): held-out exact FKL and RKL, and the cache run's relative gap "
        "to the online run.",
        parity_table,
    ),
    Section(
        "Table 5: main results",
        "Paper Table 5: pass@1 (%) of the teacher, the untrained student and each method on "
        "HumanEval(+) and MBPP(+); accuracy loss (%) = (teacher - student) / teacher, "
        "against this run's teacher.",
        main_table,
    ),
    Section(
        "Table 6: LoRA",
        "Paper Table 6: AKD with full fine-tuning against AKD with LoRA (the paper found LoRA "
        "worse).",
        lora_table,
    ),
    Section(
        "Table 7: resources",
        "Paper Table 7: training resources per run. The paper ran the teacher online, in the "
        "same process; a `cache` run trains the student alone against the teacher cache, an "
        "`online` one holds the teacher beside it (as does MiniLLM). Peak memory is the "
        "busiest process's (GPU memory on a GPU, else RSS); wall time and tokens/s cover the "
        "last `akd train` call. tokens/s counts the loss positions (response tokens) of every "
        "process, and for MiniLLM the prompt and sampled tokens TRL counts.",
        resources_table,
    ),
    Section(
        "Table 9: prompt templates",
        "Paper Table 9: prompt templates judged by the teacher's mean probability and mean "
        "entropy over the expected output tokens, and on how many samples each template wins.",
        template_table,
    ),
    Section(
        "Table 11: ablation",
        "Paper Table 11: ablation of AKD's beta update: M1 plain descent, M2 with the negative "
        "loss (ascent), M3 with the per-epoch reset (full AKD).",
        ablation_table,
    ),
    Section(
        "Table 12: fixed beta",
        "Paper Table 12: fixed beta, from KD (beta = 0) to RKD (beta = 1).",
        fixed_beta_table,
    ),
    Section(
        "Table 13: error taxonomy",
        "Paper Table 13: error taxonomy of the generated solutions under the base tests, one "
        "column per model.",
        taxonomy_table,
    ),
)


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


def render_markdown(params: Params, data: RunData, plots: dict[str, Path | None],
                    report_dir: Path) -> str:
    parts = [
        header(params, data),
        *(section(s.title, s.caption, s.table(params, data)) for s in SECTIONS),
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
    data = load_runs(runs_dir, report_models(params), train_dir)
    plots = write_plots(params, data, report_dir / "plots")
    markdown = report_dir / "report.md"
    report_dir.mkdir(parents=True, exist_ok=True)
    markdown.write_text(render_markdown(params, data, plots, report_dir))
    return ReportFiles(markdown, plots, {"table5": main_summary(params, data)})
