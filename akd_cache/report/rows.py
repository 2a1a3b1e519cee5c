"""Which evaluated run stands for which row of the paper's tables.

Rows come from each experiment's typed config in params.yaml (method, AKD variant, LoRA),
never from its name: an experiment named `seqkd` with `method: sft` is an SFT run. The name
only breaks ties, when several experiments qualify for one row.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from akd_cache.config import DistillationExperiment, Experiment, MiniLLM, Params

TEACHER = "teacher"
STUDENT = "student"
AKD_VARIANTS = {"m1": "akd_m1", "m2": "akd_m2", "m3": "akd"}  # variant -> the preferred name


@dataclass(frozen=True)
class Row:
    label: str
    model: str  # the folder under runs/eval (and runs/train for a trained model)


def is_online(experiment: Experiment) -> bool:
    """Trained against the live teacher rather than the cache (only distillation methods can)."""
    return bool(getattr(experiment, "online", False))


def teacher_source(params: Params, experiment: Experiment | None) -> str:
    """What the run trained against: `online` (the live teacher in memory: an online
    distillation run, or MiniLLM), `cache (<tail mode>)` with the mode it trained with (its own,
    else the profile's), or `-` (no teacher: SFT, SeqKD, the untrained student)."""
    if isinstance(experiment, MiniLLM):
        return "online"
    if isinstance(experiment, DistillationExperiment):
        if experiment.online:
            return "online"
        return f"cache ({experiment.tail_mode or params.active.train.tail_mode})"
    return "-"


def cache_twins(experiments: dict[str, Experiment], online_name: str) -> list[str]:
    """The cache runs of the same experiment as an online one, in params order: every setting
    equal but `online` (and the tail mode, which only a cache run has, so one online run may
    have a twin per tail mode)."""
    target = experiments[online_name].model_dump(exclude={"online", "tail_mode"})
    return [name for name, exp in experiments.items()
            if not is_online(exp) and exp.model_dump(exclude={"online", "tail_mode"}) == target]


def find_experiment(
    experiments: dict[str, Experiment],
    available: Iterable[str],
    method: str,
    *,
    lora: bool = False,
    variant: str | None = None,
    preferred: str | None = None,
    online: bool = False,
) -> str | None:
    """The evaluated experiment standing for one paper row: `preferred` when it qualifies, else
    the first qualifying one in params order."""
    available = set(available)
    candidates = [
        name for name, exp in experiments.items()
        if name in available and exp.method == method and (exp.lora is not None) == lora
        and (variant is None or exp.variant == variant) and is_online(exp) == online
    ]
    if preferred in candidates:
        return preferred
    return candidates[0] if candidates else None


def _rows(specs: Sequence[tuple[str, str | None]]) -> list[Row]:
    return [Row(label, model) for label, model in specs if model is not None]


def main_rows(params: Params, evals: dict[str, dict]) -> list[Row]:
    """Table 5: teacher, untrained student, SFT, SFT+LoRA, KD, RKD, SeqKD, MiniLLM, AKD."""
    exps, have = params.experiments, evals.keys()
    return _rows([
        ("Teacher", TEACHER if TEACHER in have else None),
        ("Student, untrained", STUDENT if STUDENT in have else None),
        ("SFT", find_experiment(exps, have, "sft", preferred="sft")),
        ("SFT+LoRA", find_experiment(exps, have, "sft", lora=True, preferred="sft_lora")),
        ("KD", find_experiment(exps, have, "kd", preferred="kd")),
        ("RKD", find_experiment(exps, have, "rkd", preferred="rkd")),
        ("SeqKD", find_experiment(exps, have, "seqkd", preferred="seqkd")),
        ("MiniLLM", find_experiment(exps, have, "minillm", preferred="minillm")),
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
    return _rows([
        (variant.upper(), find_experiment(exps, have, "akd", variant=variant, preferred=name))
        for variant, name in AKD_VARIANTS.items()
    ])


def fixed_beta_rows(params: Params, evals: dict[str, dict]) -> list[Row]:
    """Table 12: KD as beta 0, each fixed-beta experiment by beta, RKD as beta 1."""
    exps, have = params.experiments, evals.keys()
    fixed = sorted(
        (exp.beta, name) for name, exp in exps.items()
        if exp.method == "fixed_beta" and exp.lora is None and not is_online(exp) and name in have
    )
    return _rows([
        ("β = 0 (KD)", find_experiment(exps, have, "kd", preferred="kd")),
        *[(f"β = {beta:g}", name) for beta, name in fixed],
        ("β = 1 (RKD)", find_experiment(exps, have, "rkd", preferred="rkd")),
    ])


def report_models(params: Params) -> list[str]:
    """Every model a report can show: teacher, student, then experiments in params order."""
    return [TEACHER, STUDENT, *params.experiments]


def model_order(params: Params, names: Iterable[str]) -> list[str]:
    """`names` in the report's order (`report_models`)."""
    names = set(names)
    return [n for n in report_models(params) if n in names]
