"""The report's tables, one function per table: `(params, runs) -> markdown`, or None when
nothing in the runs fills it (the section then says "not run")."""

from __future__ import annotations

import math
from collections.abc import Sequence

from akd_cache.config import Params
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
from akd_cache.report.markdown import MISSING, PERCENT, md_table, number, pct
from akd_cache.report.rows import (
    STUDENT,
    TEACHER,
    Row,
    ablation_rows,
    cache_twins,
    fixed_beta_rows,
    is_online,
    lora_rows,
    main_rows,
    model_order,
    teacher_source,
)
from akd_cache.report.runs import RunData

DATASETS: tuple[tuple[str, str], ...] = (("humaneval", "HumanEval"), ("mbpp", "MBPP"))
JSON_DIGITS = 4  # percent values in summary.json, rounded to drop float noise
TEMPLATE_DIGITS = 4
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


# ------------------------------------------------------------------------ fidelity and parity

FIDELITY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("fkl", "FKL exact"), ("rkl", "RKL exact"), ("fkl_bucket", "FKL bucket"),
    ("fkl_uniform", "FKL uniform"), ("fkl_shape", "FKL shape"), ("fkl_lowrank", "FKL lowrank"),
    ("rkl_bucket", "RKL bucket"), ("rkl_uniform", "RKL uniform"), ("rkl_shape", "RKL shape"),
    ("rkl_lowrank", "RKL lowrank"), ("nll", "NLL ref"), ("top1_agreement", "top-1 agree"),
    ("student_tail_mass", "tail mass"),
)
"""Every column any model can have; a table shows those that some model has (the shape and
lowrank views exist only for a held-out cache with a tail shape or a tail code)."""


def interval(summary: dict | None) -> str:
    """`mean [low, high]` of a bootstrap summary, 3 decimals."""
    if summary is None:
        return MISSING
    return f"{summary['mean']:.3f} [{summary['ci_low']:.3f}, {summary['ci_high']:.3f}]"


def fidelity_names(params: Params, data: RunData) -> list[str]:
    return [n for n in model_order(params, data.fidelity) if n != TEACHER]


def fidelity_table(params: Params, data: RunData) -> str | None:
    """Held-out fidelity: exact divergences against the live teacher, the held-out cache's view
    of the same, and the reference NLL, each a mean over samples with its 95% interval."""
    names = fidelity_names(params, data)
    if not names:
        return None
    columns = [(key, title) for key, title in FIDELITY_COLUMNS
               if any(key in data.fidelity[name]["metrics"] for name in names)]
    header = ["model", "method", "teacher in training", *(title for _, title in columns)]
    body = []
    for name in names:
        exp = params.experiments.get(name)
        metrics = data.fidelity[name]["metrics"]
        body.append([
            f"`{name}`", exp.method if exp else "untrained", teacher_source(params, exp),
            *(interval(metrics.get(key)) for key, _ in columns),
        ])
    return md_table(header, body)


def relative_gap(cache: float, online: float) -> str:
    return MISSING if online == 0 else f"{PERCENT * (cache - online) / online:+.1f}%"


def parity_table(params: Params, data: RunData) -> str | None:
    """Each online run beside each of its cache twins: held-out exact FKL / RKL and the relative
    gap of the cache run to the online one (the paper's setting, and the limit a cache can
    reach)."""
    body = []
    pairs = [(cache, online) for online, e in params.experiments.items() if is_online(e)
             for cache in cache_twins(params.experiments, online)]
    for cache, online in pairs:
        if cache not in data.fidelity or online not in data.fidelity:
            continue
        row = [f"`{cache}` vs `{online}`", params.experiments[online].method,
               teacher_source(params, params.experiments[cache])]
        for key in ("fkl", "rkl"):
            c = data.fidelity[cache]["metrics"].get(key)
            o = data.fidelity[online]["metrics"].get(key)
            if c is None or o is None:
                row += [MISSING] * 3
                continue
            row += [f"{c['mean']:.3f}", f"{o['mean']:.3f}", relative_gap(c["mean"], o["mean"])]
        betas = [data.train.get(n, {}).get("final_beta") for n in (cache, online)]
        row.append(" / ".join(number(b, ".3f") for b in betas))
        body.append(row)
    if not body:
        return None
    header = ["cache vs online", "method", "cache run's teacher", "FKL cache", "FKL online",
              "FKL gap", "RKL cache", "RKL online", "RKL gap", "final beta cache / online"]
    return md_table(header, body)


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


def main_table(params: Params, data: RunData) -> str | None:
    """Table 5."""
    return pass_table(main_rows(params, data.evals), data.evals)


def lora_table(params: Params, data: RunData) -> str | None:
    """Table 6."""
    return pass_table(lora_rows(params, data.evals), data.evals)


def ablation_table(params: Params, data: RunData) -> str | None:
    """Table 11."""
    return pass_table(ablation_rows(params, data.evals), data.evals)


def fixed_beta_table(params: Params, data: RunData) -> str | None:
    """Table 12."""
    return pass_table(fixed_beta_rows(params, data.evals), data.evals)


def main_summary(params: Params, data: RunData) -> dict[str, dict[str, float]]:
    """Table 5 for `dvc metrics`: percent, keyed by run name."""
    return {
        row.model: {k: round(PERCENT * v, JSON_DIGITS) for k, v in
                    pass_numbers(row.model, data.evals).items()}
        for row in main_rows(params, data.evals)
    }


# ------------------------------------------------------------------------- resources, templates


def resources_table(params: Params, data: RunData) -> str | None:
    """Table 7: what each trained run cost, and whether the teacher was in memory for it."""
    names = [n for n in model_order(params, data.train) if n not in (TEACHER, STUDENT)]
    if not names:
        return None
    header = ["run", "method", "teacher", "steps", "peak memory MB", "wall s", "tokens/s"]
    body = []
    for name in names:
        m = data.train[name]
        body.append([
            f"`{name}`", str(m.get("method", MISSING)),
            teacher_source(params, params.experiments.get(name)), str(m.get("steps", MISSING)),
            number(m.get("peak_memory_mb"), ",.0f"), number(m.get("wall_s"), ",.0f"),
            number(m.get("tokens_per_s"), ",.1f"),
        ])
    return md_table(header, body)


def template_table(params: Params, data: RunData) -> str | None:
    """Table 9: each template's teacher probability and entropy, and its wins."""
    analysis = data.templates
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


# ----------------------------------------------------------------------------- error taxonomy


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


def dataset_taxonomy_table(models: Sequence[str], summaries: Sequence[dict]) -> str:
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


def taxonomy_table(params: Params, data: RunData) -> str | None:
    """Table 13, for each dataset that has a taxonomy."""
    evals = data.evals
    parts = []
    for key, name in DATASETS:
        models = [m for m in model_order(params, evals) if key in evals[m].get("taxonomy", {})]
        if models:
            summaries = [evals[m]["taxonomy"][key] for m in models]
            parts.append(f"**{name}**\n\n{dataset_taxonomy_table(models, summaries)}")
    return "\n\n".join(parts) or None
