"""The report stage on a small synthetic set of run files: tables, numbers, plots, summary."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import yaml
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.image import imread

import stages.report
from akd_cache.config import MiniLLM, Params
from akd_cache.evaluation.run import taxonomy_json
from akd_cache.evaluation.taxonomy import TaxonomySummary
from akd_cache.report import plots as report_plots
from akd_cache.report import runs as report_runs
from akd_cache.report.markdown import NOT_RUN
from akd_cache.report.plots import PLOT_FILES, series
from akd_cache.report.rows import Row, fixed_beta_rows, main_rows, teacher_source
from akd_cache.report.tables import dataset_taxonomy_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIN_PNG_BYTES = 5_000  # an empty 7x4 inch canvas at 120 dpi is smaller than any real plot
N_HUMANEVAL, N_MBPP = 164, 500
TAIL_HIST = {"edges": [-8, -7, -6, -5, -4, -3, -2, -1, 0], "counts": [50, 3, 8, 20, 40, 30, 9, 2]}

# (HumanEval base, HumanEval+, MBPP base, MBPP+) pass@1; None: that dataset was not evaluated
PASS = {
    "teacher": (0.293, 0.233, 0.320, 0.280),
    "student": (0.134, 0.116, 0.141, 0.120),
    "sft": (0.140, 0.120, 0.202, 0.180),
    "kd": (0.171, 0.134, 0.246, 0.200),
    "rkd": (0.164, 0.140, 0.194, 0.170),
    "akd": (0.207, 0.171, 0.304, 0.280),
    "akd_m1": (0.189, 0.150, 0.253, 0.230),
    "akd_m2": (0.195, 0.160, None, None),
    "beta_02": (0.189, 0.152, 0.250, 0.226),
}
# The rows as the report must print them: pass@1 and (teacher - x) / teacher in percent, by hand.
# e.g. AKD on HumanEval: (0.293 - 0.207) / 0.293 = 0.2935 -> 29.4; on MBPP (0.32 - 0.304) / 0.32
EXPECTED = {
    "teacher": ["29.3", "-", "23.3", "32.0", "-", "28.0"],
    "student": ["13.4", "54.3", "11.6", "14.1", "55.9", "12.0"],
    "sft": ["14.0", "52.2", "12.0", "20.2", "36.9", "18.0"],
    "kd": ["17.1", "41.6", "13.4", "24.6", "23.1", "20.0"],
    "rkd": ["16.4", "44.0", "14.0", "19.4", "39.4", "17.0"],
    "akd": ["20.7", "29.4", "17.1", "30.4", "5.0", "28.0"],
    "akd_m1": ["18.9", "35.5", "15.0", "25.3", "20.9", "23.0"],
    "akd_m2": ["19.5", "33.4", "16.0", "-", "-", "-"],
    "beta_02": ["18.9", "35.5", "15.2", "25.0", "21.9", "22.6"],
}
TRAINED = ["sft", "kd", "rkd", "akd", "akd_m1", "akd_m2", "beta_02"]
BETA_RUNS = ["akd", "akd_m1", "akd_m2", "beta_02"]  # the runs whose beta adapts or is fixed
EXPERIMENTS = {
    "sft": {"method": "sft"},
    "sft_lora": {"method": "sft", "lora": {}},  # in params, never run
    "kd": {"method": "kd"},
    "rkd": {"method": "rkd"},
    "akd": {"method": "akd", "variant": "m3", "beta": 0.1},
    "akd_lora": {"method": "akd", "variant": "m3", "lora": {}},  # never run
    "akd_m1": {"method": "akd", "variant": "m1"},
    "akd_m2": {"method": "akd", "variant": "m2"},
    "beta_02": {"method": "fixed_beta", "beta": 0.2},
    "beta_04": {"method": "fixed_beta", "beta": 0.4},  # never run
    "kd_online": {"method": "kd", "online": True},  # trained and measured, not evaluated
    "kd_renorm": {"method": "kd", "tail_mode": "renormalize"},  # kd_online's second twin
}
# Held-out fidelity (mean, ci_low, ci_high) of exact FKL / RKL; the parity row's gap is by hand:
# kd's FKL (2.2 - 2.0) / 2.0 = +10.0%, its RKL (3.0 - 4.0) / 4.0 = -25.0%.
FIDELITY = {
    "student": {"fkl": (16.7, 16.0, 17.3), "rkl": (9.0, 8.5, 9.5)},  # asymmetric, as bootstraps are
    "kd": {"fkl": (2.2, 2.0, 2.4), "rkl": (3.0, 2.7, 3.3)},
    "kd_online": {"fkl": (2.0, 1.8, 2.2), "rkl": (4.0, 3.6, 4.4)},
    "kd_renorm": {"fkl": (2.5, 2.3, 2.7), "rkl": (5.0, 4.5, 5.5)},
}
TAXONOMY_HUMANEVAL = {
    "teacher": {"total": 164, "correct": 48, "complete": 150, "incomplete": 14,
                "pass_rate_complete": 0.32,
                "categories": {"AssertionError": 90, "NameError": 10, "SyntaxError": 16},
                "subcategories": {"empty function": 5, "missing import": 4,
                                  "output cut off": 12}},
    "akd": {"total": 164, "correct": 34, "complete": 120, "incomplete": 44,
            "pass_rate_complete": 0.2833,
            "categories": {"AssertionError": 86, "TypeError": 44},
            "subcategories": {"empty function": 20}},
}


def params_doc() -> dict:
    return {
        "profile": "mini",
        "profiles": {"mini": {
            "data": {"dataset": "data.json"},
            "teacher": {"model": "teacher-7b"},
            "student": {"model": "student-1b"},
            "train": {"tail_mode": "uniform"},  # not the default, so the tables must read it
        }},
        "experiments": EXPERIMENTS,
    }


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def eval_metrics(model: str) -> dict:
    he, he_plus, mbpp, mbpp_plus = PASS[model]
    datasets = {"humaneval": {"base_pass_at_1": he, "plus_pass_at_1": he_plus,
                              "n_tasks": N_HUMANEVAL}}
    if mbpp is not None:
        datasets["mbpp"] = {"base_pass_at_1": mbpp, "plus_pass_at_1": mbpp_plus, "n_tasks": N_MBPP}
    kind = {"teacher": "teacher", "student": "student"}.get(model, "trained")
    taxonomy = {"humaneval": TAXONOMY_HUMANEVAL[model]} if model in TAXONOMY_HUMANEVAL else {}
    return {"model": model, "kind": kind, "method": EXPERIMENTS.get(model, {}).get("method"),
            "datasets": datasets, "taxonomy": taxonomy}


def beta_used(step: int) -> float:
    return 0.1 + 0.02 * step


def train_log(name: str) -> str:
    """The beta the step trained with (`beta_used`) and the beta after its update differ, so a
    plot of the wrong one shows."""
    lines = [{"step": step, "loss": 3.0 / step, "fkl": 2.0 / step, "rkl": 1.0 / step,
              "beta": beta_used(step + 1), "beta_used": beta_used(step),
              "teacher_tail_mass": 0.01, "student_tail_mass": 0.5, "tokens_per_s": 30.0,
              "peak_memory_mb": 1600.0} for step in range(1, 6)]
    lines.insert(1, lines[0])  # a resumed run logs a step twice
    lines.append({"train_runtime": 12.0, "step": 5})  # the summary line: no loss, no beta
    return "\n".join(json.dumps(line) for line in lines) + "\n"


def write_runs(root: Path, models: list[str], with_extras: bool = True) -> None:
    runs = root / "runs"
    for model in models:
        write_json(runs / "eval" / model / "metrics.json", eval_metrics(model))
    if not with_extras:
        return
    for i, name in enumerate(TRAINED):
        write_json(runs / "train" / name / "metrics.json", {
            "experiment": name, "method": EXPERIMENTS[name]["method"], "cache_key": "abc123",
            "train_loss": 1.5, "final_fkl": 1.0, "final_rkl": 2.0, "final_beta": 0.2,
            "steps": 5, "wall_s": 100.0 + i, "tokens_per_s": 31.25, "peak_memory_mb": 1628.8,
        })
        (runs / "train" / name / "log.jsonl").write_text(train_log(name))
    write_json(runs / "template_analysis.json", {
        "n_samples": 200,
        "templates": {"starcoder": {"mean_probability": 0.61234, "mean_entropy": 1.5},
                      "instruct_eval": {"mean_probability": 0.7, "mean_entropy": 1.25},
                      "alpaca": {"mean_probability": 0.81234, "mean_entropy": 0.98765}},
        "wins": {"probability": {"alpaca": 171, "starcoder": 10, "instruct_eval": 19},
                 "entropy": {"alpaca": 189, "instruct_eval": 11}},
    })
    write_json(runs / "teacher_cache.json", {"key": "abc123", "location": "storage/nowhere"})
    for model, metrics in FIDELITY.items():
        write_json(runs / "fidelity" / f"{model}.json", {"model": model, "metrics": {
            name: {"mean": m, "ci_low": lo, "ci_high": hi} for name, (m, lo, hi) in metrics.items()
        }})


def run_stage(root: Path, monkeypatch: pytest.MonkeyPatch, tail: dict | None) -> str:
    (root / "params.yaml").write_text(yaml.safe_dump(params_doc(), sort_keys=False))
    monkeypatch.chdir(root)
    monkeypatch.setattr(report_runs, "load_tail_histogram", lambda pointer: tail)
    stages.report.main(["--params", "params.yaml"])
    return (root / "reports" / "report.md").read_text()


def sections(markdown: str) -> dict[str, str]:
    """Markdown by `## ` heading, keyed by the words before the colon ('Table 5', 'Plots')."""
    parts = markdown.split("\n## ")[1:]
    return {part.split("\n", 1)[0].split(":")[0]: part for part in parts}


def table(text: str) -> dict[str, list[str]]:
    """A section's table rows, keyed by the first cell, the other cells as a list."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


def by_run(rows: dict[str, list[str]]) -> dict[str, list[str]]:
    """Pass tables: cells keyed by the run name (second column), without the run column."""
    return {cells[0].strip("`"): cells[1:] for cells in rows.values() if cells[0] != "run"}


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[Path, str, str]:
    """The stage run once on every synthetic run file; the tests read what it wrote."""
    root = tmp_path_factory.mktemp("report")
    write_runs(root, list(PASS))
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as out:
        markdown = run_stage(root, mp, TAIL_HIST)
    return root, markdown, out.getvalue()


def test_header_and_stage_line(full):
    _, markdown, out = full
    assert "report: reports/report.md" in out
    head = markdown.split("\n## ")[0]
    for fact in ("`mini`", "`teacher-7b`", "`student-1b`", "`abc123`",
                 f"HumanEval {N_HUMANEVAL}, MBPP {N_MBPP}"):
        assert fact in head


def test_main_table(full):
    _, markdown, _ = full
    text = sections(markdown)["Table 5"]
    assert "Paper Table 5" in text
    rows = table(text)
    assert rows["method"][1:] == ["HumanEval pass@1", "acc. loss", "HumanEval+ pass@1",
                                  "MBPP pass@1", "acc. loss", "MBPP+ pass@1"]
    labels = {"Teacher": "teacher", "Student, untrained": "student", "SFT": "sft", "KD": "kd",
              "RKD": "rkd", "AKD": "akd"}
    assert set(rows) - {"method"} == set(labels)  # SFT+LoRA was not run, there is no SeqKD
    for label, run in labels.items():
        assert rows[label] == [f"`{run}`", *EXPECTED[run]], label


def test_other_pass_tables(full):
    _, markdown, _ = full
    parts = sections(markdown)
    lora = by_run(table(parts["Table 6"]))
    assert lora == {"akd": EXPECTED["akd"]}  # AKD+LoRA not run: absent
    ablation = table(parts["Table 11"])
    assert {k: v[0] for k, v in ablation.items() if k != "method"} == {
        "M1": "`akd_m1`", "M2": "`akd_m2`", "M3": "`akd`"}
    assert by_run(ablation) == {run: EXPECTED[run] for run in ("akd_m1", "akd_m2", "akd")}
    fixed = table(parts["Table 12"])
    assert [k for k in fixed if k != "method"] == ["β = 0 (KD)", "β = 0.2", "β = 1 (RKD)"]
    assert by_run(fixed) == {run: EXPECTED[run] for run in ("kd", "beta_02", "rkd")}


def test_resources_and_templates(full):
    _, markdown, _ = full
    parts = sections(markdown)
    resources = table(parts["Table 7"])
    assert [k.strip("`") for k in resources if k != "run"] == TRAINED
    assert resources["`akd`"] == ["akd", "cache (uniform)", "5", "1,629", "103", "31.2"]
    assert resources["`sft`"][:2] == ["sft", "-"]  # no teacher at all
    templates = table(parts["Table 9"])
    assert templates["`alpaca`"] == ["0.8123", "0.9877", "171 / 200", "189 / 200"]
    assert templates["`starcoder`"] == ["0.6123", "1.5000", "10 / 200", "0 / 200"]


def test_taxonomy(full):
    _, markdown, _ = full
    text = sections(markdown)["Table 13"]
    humaneval, mbpp_missing = text.split("**HumanEval**")[1], "**MBPP**" not in text
    assert mbpp_missing  # no model has an MBPP taxonomy
    rows = table(humaneval)
    assert rows[""] == ["`teacher`", "`akd`"]
    assert rows["solutions"] == ["164", "164"]
    assert rows["correct"] == ["48", "34"]
    assert rows["complete"] == ["150", "120"]
    assert rows["incomplete"] == ["14", "44"]
    assert rows["pass rate among complete (%)"] == ["32.0", "28.3"]
    assert rows["AssertionError"] == ["90", "86"]
    assert rows["AssertionError: empty function"] == ["5", "20"]
    assert rows["NameError: missing import"] == ["4", "0"]
    assert rows["SyntaxError: output cut off"] == ["12", "0"]
    assert rows["TypeError"] == ["0", "44"]
    order = [k for k in rows if k.endswith("Error")]
    assert order == ["AssertionError", "NameError", "SyntaxError", "TypeError"]  # paper's order


def test_no_complete_solution_is_no_pass_rate_rather_than_0_percent():
    """0 correct of 0 complete, as evaluate writes it (JSON null), prints "-" like a missing
    accuracy loss, so it cannot read as a measured 0 %."""
    summary = json.loads(json.dumps(taxonomy_json(TaxonomySummary(total=3, correct=0,
                                                                   complete=0))))
    assert summary["pass_rate_complete"] is None
    rows = table(dataset_taxonomy_table(["akd"], [summary]))
    assert rows["complete"] == ["0"] and rows["pass rate among complete (%)"] == ["-"]


def test_plots_are_pngs(full):
    root, markdown, _ = full
    plots = root / "reports" / "plots"
    for name in PLOT_FILES.values():
        path = plots / name
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > MIN_PNG_BYTES, name
        height, width = imread(path).shape[:2]
        assert height > 100 and width > 100
        assert f"(plots/{name})" in markdown


@pytest.fixture(scope="module")
def figures(tmp_path_factory) -> dict[str, Figure]:
    """The stage run on every synthetic run file, each figure kept as it is saved."""
    root = tmp_path_factory.mktemp("figures")
    write_runs(root, list(PASS))
    kept = {}
    save = report_plots._save

    def keep(fig: Figure, path: Path) -> Path:
        kept[path.name] = fig
        return save(fig, path)

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(report_plots, "_save", keep)
        run_stage(root, mp, TAIL_HIST)
    return {name: kept[file] for name, file in PLOT_FILES.items()}


def bars(fig: Figure) -> dict[str, list[float]]:
    """Each bar series' label and heights."""
    return {c.get_label(): list(c.datavalues) for c in fig.axes[0].containers
            if isinstance(c, BarContainer)}


def tick_labels(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_xticklabels()]


def test_line_plots_draw_each_runs_logged_steps(figures):
    """One line per run, its last value per step (the resumed step 1 once), in params order;
    beta only for the runs that adapt or fix it."""
    steps = [1, 2, 3, 4, 5]
    for name, key, runs, value in (
        ("loss", "loss", TRAINED, lambda step: 3.0 / step),
        ("beta", "beta_used", BETA_RUNS, beta_used),
    ):
        lines = figures[name].axes[0].get_lines()
        assert [line.get_label() for line in lines] == runs, name
        for line in lines:
            assert list(line.get_xdata()) == steps
            assert list(line.get_ydata()) == pytest.approx([value(s) for s in steps]), key
    assert figures["beta"].axes[0].get_ylim() == (0.0, 1.0)


def test_fidelity_plot_bars_are_the_means_with_their_intervals(figures):
    fig = figures["fidelity"]
    models = ["student", "kd", "kd_online", "kd_renorm"]
    assert tick_labels(fig) == models
    heights = bars(fig)
    for key in ("fkl", "rkl"):
        assert heights[f"{key.upper()} (exact)"] == [FIDELITY[m][key][0] for m in models]
    fkl_bars = next(c for c in fig.axes[0].containers if isinstance(c, BarContainer))
    whiskers = fkl_bars.errorbar.lines[2][0].get_segments()
    assert [y for seg in whiskers for y in (seg[0][1], seg[1][1])] == pytest.approx(
        [bound for m in models for bound in FIDELITY[m]["fkl"][1:]])


def test_pass_plot_bars_are_base_pass_at_1_in_percent(figures):
    fig = figures["pass"]
    assert tick_labels(fig) == list(PASS)
    heights = bars(fig)
    assert heights["HumanEval"] == pytest.approx([100 * p[0] for p in PASS.values()])
    mbpp = [100 * p[2] if p[2] is not None else math.nan for p in PASS.values()]
    assert heights["MBPP"] == pytest.approx(mbpp, nan_ok=True)  # akd_m2: no MBPP run, no bar


def test_tail_plot_bars_are_the_histogram(figures):
    fig = figures["tail"]
    assert list(bars(fig).values()) == [TAIL_HIST["counts"]]
    assert tick_labels(fig) == ["< 1e-7", "1e-7..1e-6", "1e-6..1e-5", "1e-5..1e-4", "1e-4..1e-3",
                                "1e-3..1e-2", "1e-2..1e-1", "1e-1..1e0"]


def test_summary_json(full):
    root, _, _ = full
    summary = json.loads((root / "reports" / "summary.json").read_text())
    main = summary["table5"]
    assert set(main) == {"teacher", "student", "sft", "kd", "rkd", "akd"}
    assert main["teacher"] == {"humaneval": 29.3, "humaneval_plus": 23.3, "mbpp": 32.0,
                               "mbpp_plus": 28.0}
    assert main["akd"]["humaneval"] == 20.7
    assert main["akd"]["humaneval_loss"] == pytest.approx(29.3515, abs=1e-4)
    assert main["akd"]["mbpp_loss"] == pytest.approx(5.0)


def test_series_skips_summary_lines_and_repeated_steps():
    log = [json.loads(line) for line in train_log("akd").splitlines()]
    steps, values = series(log, "loss")
    assert steps == [1, 2, 3, 4, 5]
    assert values[0] == 3.0


def test_only_a_teacher(tmp_path, monkeypatch):
    """Nothing but the teacher's evaluation: every other table says so, nothing crashes."""
    write_runs(tmp_path, ["teacher"], with_extras=False)
    markdown = run_stage(tmp_path, monkeypatch, None)
    parts = sections(markdown)
    assert list(by_run(table(parts["Table 5"]))) == ["teacher"]
    for name in ("Table 6", "Table 7", "Table 9", "Table 11", "Table 12"):
        assert NOT_RUN in parts[name], name
    assert table(parts["Table 13"])[""] == ["`teacher`"]
    plots = tmp_path / "reports" / "plots"
    assert (plots / PLOT_FILES["pass"]).is_file()
    for name in ("beta", "loss", "tail"):
        assert not (plots / PLOT_FILES[name]).exists()
    assert "teacher cache: `-`" in markdown
    summary = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert list(summary["table5"]) == ["teacher"]


def test_no_pointer_no_histogram(tmp_path):
    assert report_runs.load_tail_histogram(tmp_path / "teacher_cache.json") is None


def test_rows_come_from_the_method_not_the_name():
    """An experiment named seqkd with `method: sft` is an SFT run; SeqKD is `method: seqkd`."""
    doc = params_doc()
    doc["experiments"] = {"seqkd": {"method": "sft"}, "generated": {"method": "seqkd"}}
    params = Params.model_validate(doc)
    evals = {name: eval_metrics("sft") for name in ("teacher", "seqkd", "generated")}
    assert main_rows(params, evals) == [Row("Teacher", "teacher"),
                                             Row("SFT", "seqkd"),
                                             Row("SeqKD", "generated")]


def test_minillm_row_comes_from_the_method():
    """Table 5's MiniLLM row is the experiment with `method: minillm`, whatever its name."""
    doc = params_doc()
    doc["experiments"] = {"minillm": {"method": "kd"}, "online_rkl": {"method": "minillm"}}
    params = Params.model_validate(doc)
    evals = {name: eval_metrics("kd") for name in ("teacher", "minillm", "online_rkl")}
    assert main_rows(params, evals) == [Row("Teacher", "teacher"),
                                        Row("KD", "minillm"),
                                        Row("MiniLLM", "online_rkl")]


def test_fidelity_comes_first_with_intervals(full):
    _, markdown, _ = full
    assert markdown.split("\n## ")[1].startswith("Fidelity on the held-out split")
    rows = table(sections(markdown)["Fidelity on the held-out split"])
    assert rows["`student`"][:4] == ["untrained", "-", "16.700 [16.000, 17.300]",
                                     "9.000 [8.500, 9.500]"]
    assert rows["`kd`"][:2] == ["kd", "cache (uniform)"]  # the profile's tail mode
    assert rows["`kd_renorm`"][:2] == ["kd", "cache (renormalize)"]
    assert rows["`kd_online`"][:2] == ["kd", "online"]


def test_what_each_run_trained_against():
    """MiniLLM holds the live teacher like an online run; SFT and the untrained student have
    none; a cache run names its own tail mode, else the profile's."""
    params = Params.model_validate(params_doc())
    assert [teacher_source(params, e) for e in (
        MiniLLM(), params.experiments["kd_online"],
        params.experiments["sft"], None, params.experiments["kd"],
        params.experiments["kd_renorm"],
    )] == ["online", "online", "-", "-", "cache (uniform)", "cache (renormalize)"]


def test_parity_pairs_each_online_run_with_its_cache_twin(full):
    _, markdown, _ = full
    rows = table(sections(markdown)["Parity"])
    assert rows["`kd` vs `kd_online`"] == ["kd", "cache (uniform)", "2.200", "2.000", "+10.0%",
                                           "3.000", "4.000", "-25.0%", "0.200 / -"]
    # the second twin has its own row: (2.5 - 2.0) / 2.0 = +25.0%, (5.0 - 4.0) / 4.0 = +25.0%
    assert rows["`kd_renorm` vs `kd_online`"] == [
        "kd", "cache (renormalize)", "2.500", "2.000", "+25.0%", "5.000", "4.000", "+25.0%",
        "- / -"]


def test_table_12_takes_cache_runs_only():
    """A fixed-beta run against the live teacher is no row of Table 12 beside its cache twin."""
    doc = params_doc()
    doc["experiments"] = {"b3": {"method": "fixed_beta", "beta": 0.3},
                          "b3_online": {"method": "fixed_beta", "beta": 0.3, "online": True}}
    params = Params.model_validate(doc)
    evals = {name: eval_metrics("kd") for name in ("teacher", "b3", "b3_online")}
    assert fixed_beta_rows(params, evals) == [Row("β = 0.3", "b3")]


def test_runs_of_models_params_does_not_name_are_left_out(tmp_path, monkeypatch):
    """An experiment since removed from params leaves its folders under runs/ (DVC does not
    delete them): they are no row of any table, and no series of any plot."""
    write_runs(tmp_path, ["teacher", "kd"], with_extras=False)
    runs = tmp_path / "runs"
    write_json(runs / "eval" / "kd_last_week" / "metrics.json", eval_metrics("kd"))
    write_json(runs / "fidelity" / "kd_last_week.json", {"model": "kd_last_week", "metrics": {
        "fkl": {"mean": 1.0, "ci_low": 0.9, "ci_high": 1.1}}})
    (runs / "train" / "kd_last_week").mkdir(parents=True)
    (runs / "train" / "kd_last_week" / "log.jsonl").write_text(train_log("kd"))
    markdown = run_stage(tmp_path, monkeypatch, None)
    assert "kd_last_week" not in markdown
    assert list(by_run(table(sections(markdown)["Table 5"]))) == ["teacher", "kd"]


@pytest.mark.parametrize("relative,body,reason", [
    ("train/kd/metrics.json", b'{"method": "kd", "ste', "not valid JSON ("),
    ("eval/kd/metrics.json", b"[]", "expected a JSON object, got list"),
    ("fidelity/kd.json", b"{}", "no 'metrics' key"),
])
def test_a_damaged_run_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys, relative,
                                                  body, reason):
    """Through `akd report` as a user meets it: exit code 2, the file and what is wrong."""
    from akd_cache.cli import main as akd

    write_runs(tmp_path, ["teacher", "kd"], with_extras=False)
    path = tmp_path / "runs" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_doc(), sort_keys=False))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        akd(["report", "--params", "params.yaml"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"akd report: {Path('runs') / relative}: {reason}"), err
    assert len(err.splitlines()) == 1
