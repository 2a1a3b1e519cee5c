"""Stage 2 benchmark: how far each tail mode's FKL / RKL sits from the full-vocabulary KL.

The cache keeps only the teacher's top-k and the log of the mass outside it, so the loss has to
assume something about the tail (`TailMode`). This runs the real SmolLM2 teacher live next to the
demo student on held-out CodeAlpaca samples, computes the exact KL(p || q) and KL(q || p) over
all 49152 ids in float64, and compares each mode's `topk_divergences` estimate built from the
top-k view of the same teacher distribution, at k = 16 and 64 (and T = 2 for k = 64). Run from
the repository root:

    python benchmarks/tail_bias.py --min-positions 1000
    python benchmarks/tail_bias.py --min-positions 1000 --keep-layers 24  # a closer student

The estimates are computed in float64 so that the tables show the tail-mode bias alone (the
training path runs in float32; its extra deviation is printed below the tables) and the top-k
log-probs are unquantised (cache quantisation is the Stage 1 benchmark's subject).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, PreTrainedModel

from akd_cache.config import CacheConfig, DataConfig
from akd_cache.data.instructions import BadRow, prepare
from akd_cache.data.tokenize import tokenize_example
from akd_cache.models.prune import keep_layers, save_pruned_student
from akd_cache.models.smollm2 import ensure_smollm2
from akd_cache.store.rows import TokenizedSample
from akd_cache.student.loss import TAIL_MODES, TailMode, temper_teacher, topk_divergences
from akd_cache.teacher.build import load_tokenizer
from akd_cache.teacher.hf_backend import HFTeacher

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO.parent / "shared" / "data" / "codealpaca" / "code_alpaca_2k.json"
TEACHER = REPO / "storage" / "models" / "smollm2-135m-instruct"
STUDENT = REPO / "storage" / "models" / "smollm2-student-6l"
STUDENT_LAYERS = 6  # the demo student keeps 6 of the teacher's 30 layers
HELDOUT = 100  # the demo's held-out split (DataConfig default), seed 0
KS = (16, 64)
# the shape mode also needs a tail shape calibrated on the teacher; its distance from the full
# teacher is measured in benchmarks/teacher_error.py and its effect on students in parity.py
MODES = tuple(mode for mode in TAIL_MODES if mode != "shape")
TEMPERED_K = 64  # the T != 1 rows use the default cache k only: one more table row per mode
TEMPERATURE = 2.0
MIN_EXACT_KL = 1e-3
"""Positions whose exact KL is below this (nat) are left out of per-position relative errors:
there the ratio is noise over a near-zero denominator and says nothing about the loss."""
ROW_CHUNK = 128  # response rows per float64 [rows, V] block; bounds memory on long samples
BOUND_ATOL = 1e-9  # float64 slack when checking that bucket <= exact
BOUND_RTOL = 1e-9
FLOAT32_ATOL = 1e-4  # float32 slack for the same check on the training dtype
TOPK_CHECK_ATOL = 1e-4  # HFTeacher's float32 cache view against this script's float64 one


@dataclass(frozen=True)
class Variant:
    """One way of building the teacher view that the tail mode sees."""

    k: int
    temperature: float
    source: str  # "cache at T" (top-k of the exact tempered teacher) or "temper_teacher"
    mode: TailMode

    @property
    def label(self) -> str:
        return f"| {self.k} | {self.temperature:g} | {self.source} | {self.mode} |"


@dataclass
class Collected:
    """Per-position values, appended one chunk at a time and concatenated at the end."""

    exact: dict[tuple[float, str], list[np.ndarray]] = field(default_factory=dict)
    estimate: dict[tuple[Variant, str], list[np.ndarray]] = field(default_factory=dict)
    float32_gap: dict[TailMode, float] = field(default_factory=dict)
    float32_bucket_violations: int = 0
    teacher_tail_mass: dict[int, list[np.ndarray]] = field(default_factory=dict)
    reference_nll: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, store: dict, key: object, value: Tensor) -> None:
        store.setdefault(key, []).append(value.detach().cpu().numpy())

    def get(self, store: dict, key: object) -> np.ndarray:
        return np.concatenate(store[key])


def variants() -> list[Variant]:
    out = [Variant(k, 1.0, "cache at T", mode) for k in KS for mode in MODES]
    for source in ("cache at T", "temper_teacher"):
        out += [Variant(TEMPERED_K, TEMPERATURE, source, mode) for mode in MODES]
    return out


def heldout_samples(tokenizer, min_positions: int) -> list[TokenizedSample]:
    """Held-out samples in split order until at least `min_positions` response rows."""
    data = prepare(DataConfig(dataset=str(DATASET), heldout=HELDOUT, seed=0))
    cache = CacheConfig()
    samples: list[TokenizedSample] = []
    for example in data.heldout:
        try:
            sample = tokenize_example(
                tokenizer, example, cache.template, cache.max_length, cache.truncation
            )
        except BadRow:
            continue
        samples.append(sample)
        if sum(s.n_loss_rows for s in samples) >= min_positions:
            break
    return samples


def response_logits(model: PreTrainedModel, sample: TokenizedSample, scale: float) -> Tensor:
    """Logits of rows P-1 .. L-2 (row j predicts token j + 1), float64, lm head on those only."""
    ids = torch.tensor([sample.input_ids])
    hidden = model.base_model(input_ids=ids).last_hidden_state[0]
    rows = hidden[sample.prompt_len - 1 : len(sample.input_ids) - 1]
    return model.get_output_embeddings()(rows).double() * scale


def chunks(teacher: Tensor, student: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    for start in range(0, len(teacher), ROW_CHUNK):
        yield teacher[start : start + ROW_CHUNK], student[start : start + ROW_CHUNK]


def exact_kl(log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """Full-vocabulary KL(p || q) and KL(q || p) per row."""
    return (log_p.exp() * (log_p - log_q)).sum(-1), (log_q.exp() * (log_q - log_p)).sum(-1)


def cache_view(log_p: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """What Stage 1 stores: top-k ids and full-vocabulary log-probs, and the tail log-mass."""
    values, ids = log_p.topk(k, dim=-1)
    tail = torch.logsumexp(log_p.scatter(-1, ids, -math.inf), dim=-1)
    return ids, values, tail


def check_against_backend(hf: HFTeacher, sample: TokenizedSample, log_p: Tensor) -> None:
    """The top-k view built here must be the one HFTeacher writes into the cache."""
    rows = hf.score([sample])[0]
    _, values, tail = cache_view(log_p, hf.k)
    value_gap = np.abs(rows.topk_logprobs - values.numpy()).max()
    tail_gap = np.abs(rows.tail_logmass - tail.numpy()).max()
    if max(value_gap, tail_gap) > TOPK_CHECK_ATOL:
        raise AssertionError(f"cache view differs from HFTeacher: {value_gap=}, {tail_gap=}")


def score_chunk(t_logits: Tensor, s_logits: Tensor, vocab: int, out: Collected) -> None:
    log_p1 = torch.log_softmax(t_logits, -1)
    exact: dict[float, tuple[Tensor, Tensor]] = {}
    for temperature in (1.0, TEMPERATURE):
        log_p = log_p1 if temperature == 1.0 else torch.log_softmax(t_logits / temperature, -1)
        exact[temperature] = exact_kl(log_p, torch.log_softmax(s_logits / temperature, -1))
        out.add(out.exact, (temperature, "fkl"), exact[temperature][0])
        out.add(out.exact, (temperature, "rkl"), exact[temperature][1])
    views = {k: cache_view(log_p1, k) for k in KS}
    for k, (_, _, tail) in views.items():
        out.add(out.teacher_tail_mass, k, tail.exp())
    for v in variants():
        ids, values, tail = views[v.k]
        if v.temperature != 1.0:
            if v.source == "temper_teacher":
                values, tail = temper_teacher(values, tail, v.temperature, vocab)
            else:
                ids, values, tail = cache_view(torch.log_softmax(t_logits / v.temperature, -1), v.k)
        est = topk_divergences(
            s_logits, ids, values, tail, None, temperature=v.temperature, mode=v.mode
        )
        out.add(out.estimate, (v, "fkl"), est.fkl)
        out.add(out.estimate, (v, "rkl"), est.rkl)
        if v.temperature == 1.0 and v.k == TEMPERED_K:
            track_float32(s_logits, views[v.k], v.mode, (est.fkl, est.rkl), exact[1.0], out)


def track_float32(
    s_logits: Tensor,
    view: tuple[Tensor, Tensor, Tensor],
    mode: TailMode,
    est64: tuple[Tensor, Tensor],
    exact: tuple[Tensor, Tensor],
    out: Collected,
) -> None:
    """The training path's float32 estimate against the float64 one (same mode, same view)."""
    ids, values, tail = view
    est = topk_divergences(s_logits.float(), ids, values.float(), tail.float(), None, mode=mode)
    est32 = (est.fkl.double(), est.rkl.double())
    gap = max((a - b).abs().max().item() for a, b in zip(est32, est64, strict=True))
    out.float32_gap[mode] = max(out.float32_gap.get(mode, 0.0), gap)
    if mode == "bucket":
        out.float32_bucket_violations += sum(
            int((a > b + FLOAT32_ATOL).sum()) for a, b in zip(est32, exact, strict=True)
        )


def table(out: Collected, div: str) -> list[str]:
    head = (
        f"| k | T | teacher view | mode | mean est. {div.upper()} | mean exact | "
        "rel. err of means | mean \\|rel. err\\| | worst \\|rel. err\\| | "
        "KL-weighted \\|rel. err\\| | est. < exact | est. > exact |"
    )
    lines = [head, "|" + "---|" * 12]
    for v in variants():
        exact = out.get(out.exact, (v.temperature, div))
        est = out.get(out.estimate, (v, div))
        big = exact > MIN_EXACT_KL
        rel = np.abs(est[big] - exact[big]) / exact[big]
        weighted = np.abs(est - exact).sum() / exact.sum()
        above = est > exact + BOUND_ATOL + BOUND_RTOL * np.abs(exact)
        lines.append(
            f"{v.label} {est.mean():.4f} | {exact.mean():.4f} | "
            f"{(est.mean() - exact.mean()) / exact.mean():+.2%} | {rel.mean():.2%} | "
            f"{rel.max():.2%} | {weighted:.2%} | {(est < exact).mean():.1%} | {above.sum()} |"
        )
    return lines


def load_student(teacher_dir: str, keep: int | None) -> tuple[PreTrainedModel, str]:
    """The demo student from disk, or (for context) the teacher pruned in memory to `keep`."""
    if keep is not None:
        model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
        return keep_layers(model, keep).eval(), f"the teacher pruned in memory to {keep} layers"
    if not (STUDENT / "config.json").exists():
        save_pruned_student(teacher_dir, STUDENT, STUDENT_LAYERS)
    model = AutoModelForCausalLM.from_pretrained(str(STUDENT), dtype=torch.float32)
    return model.eval(), f"the demo student ({STUDENT.name}, untrained)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-positions", type=int, default=1000)
    parser.add_argument(
        "--keep-layers",
        type=int,
        default=None,
        help="instead of the demo student, the teacher with this many layers kept (in memory)",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    teacher_dir = str(ensure_smollm2(TEACHER))
    tokenizer = load_tokenizer(teacher_dir)
    samples = heldout_samples(tokenizer, args.min_positions)
    hf = HFTeacher(teacher_dir, k=TEMPERED_K)
    student, student_name = load_student(teacher_dir, args.keep_layers)
    student_scale = getattr(student.config, "logit_scale", None) or 1.0

    out = Collected()
    with torch.no_grad():
        for index, sample in enumerate(samples):
            t_logits = response_logits(hf.model, sample, hf.logit_scale)
            s_logits = response_logits(student, sample, student_scale)
            if index == 0:
                check_against_backend(hf, sample, torch.log_softmax(t_logits, -1))
            targets = torch.tensor(sample.input_ids[sample.prompt_len :])[:, None]
            for name, logits in (("teacher", t_logits), ("student", s_logits)):
                nll = -torch.log_softmax(logits, -1).gather(-1, targets)[:, 0]
                out.add(out.reference_nll, name, nll)
            for t_chunk, s_chunk in chunks(t_logits, s_logits):
                score_chunk(t_chunk, s_chunk, hf.vocab_size, out)
            del t_logits, s_logits
    seconds = time.perf_counter() - started

    n_pos = len(out.get(out.exact, (1.0, "fkl")))
    exact = {div: out.get(out.exact, (1.0, div)) for div in ("fkl", "rkl")}
    print(
        f"Date: {datetime.date.today().isoformat()}. Machine: {os.cpu_count()}-core CPU "
        f"({platform.machine()}), no GPU, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads."
    )
    print(f"Command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`".rstrip())
    print(f"Teacher: {TEACHER.name} (float32). Student: {student_name}.")
    print(
        f"{len(samples)} held-out samples (heldout={HELDOUT}, seed 0, first in split order), "
        f"{n_pos} response positions; wall time {seconds:.0f} s."
    )
    nll = {name: out.get(out.reference_nll, name).mean() for name in ("teacher", "student")}
    print(
        f"Mean NLL of the reference tokens (a sanity check of the row alignment): teacher "
        f"{nll['teacher']:.2f} nat, student {nll['student']:.2f} nat (uniform: "
        f"{math.log(hf.vocab_size):.2f})."
    )
    for k in KS:
        mass = out.get(out.teacher_tail_mass, k)
        print(
            f"Teacher mass outside the top-{k}: mean {mass.mean():.4f}, "
            f"median {np.median(mass):.2e}, max {mass.max():.4f}."
        )
    for div in ("fkl", "rkl"):
        share = (exact[div] > MIN_EXACT_KL).mean()
        print(f"Exact {div.upper()} at T = 1 > {MIN_EXACT_KL:g} nat on {share:.1%} of positions.")
    print(
        "\nrel. err of means = (mean est. - mean exact) / mean exact (signed). Per position, "
        f"rel. err = \\|est. - exact\\| / exact over positions with exact > {MIN_EXACT_KL:g} "
        "nat (mean and worst); KL-weighted = sum \\|est. - exact\\| / sum exact over all "
        "positions. est. > exact counts positions above exact by more than "
        f"{BOUND_ATOL:g} + {BOUND_RTOL:g} x exact (must be 0 for bucket)."
    )
    for div in ("fkl", "rkl"):
        print(f"\n**{div.upper()}** = {'KL(p || q)' if div == 'fkl' else 'KL(q || p)'}\n")
        print("\n".join(table(out, div)))
    gaps = ", ".join(f"{mode} {gap:.1e}" for mode, gap in out.float32_gap.items())
    print(
        f"\nfloat32 (training dtype) vs float64 estimate, k = {TEMPERED_K}, T = 1, max "
        f"\\|diff\\| in nat: {gaps}; float32 bucket values above exact by > {FLOAT32_ATOL:g}: "
        f"{out.float32_bucket_violations}."
    )


if __name__ == "__main__":
    main()
