"""Held-out fidelity: how close a student is to the teacher, on samples it never trained on.

Two views of the same positions (the response tokens of the held-out split):
- exact: FKL = KL(p || q) and RKL = KL(q || p) over the full vocabulary against the live teacher,
  computed a chunk of positions at a time so [batch, seq, vocab] never exists for both models;
- the cache's view: the same divergences from a held-out teacher cache in the `bucket` and
  `uniform` tail modes (and `shape` and `lowrank`, for a cache with a tail shape or a tail
  code), which needs no teacher and measures the cache's bias on trained students.

Plus the NLL of the reference response (student at T = 1), top-1 agreement with the teacher and
the student's mass outside the teacher's cached top-k. Every metric is a per-sample
length-normalised mean, as in training, summarised by its mean over samples and a bootstrap 95%
interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from akd_cache.config import FidelityConfig
from akd_cache.errors import ConfigError
from akd_cache.store.reader import TeacherCache, collate
from akd_cache.student.loss import topk_divergences

CACHE_VIEW_MODES = ("bucket", "uniform")
SHAPE_MODE = "shape"  # in the cache's view only for a cache that stores a tail shape
LOWRANK_MODE = "lowrank"  # and this one for a cache that stores a tail code
EXACT_METRICS = ("fkl", "rkl", "top1_agreement")
STUDENT_METRICS = ("nll", "student_tail_mass")
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
DEFAULTS = FidelityConfig()  # the profile's defaults, for a caller without a profile


@dataclass(frozen=True)
class Summary:
    mean: float
    ci_low: float
    ci_high: float


def bootstrap_interval(values: np.ndarray, seed: int = 0,
                       resamples: int = BOOTSTRAP_RESAMPLES) -> Summary:
    """The mean over samples and a percentile bootstrap interval over samples."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Summary(float(values.mean()), float(low), float(high))


def _hidden(model: PreTrainedModel, batch: Mapping[str, Tensor]) -> Tensor:
    out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.last_hidden_state[batch["loss_mask"]]


def _logits(model: PreTrainedModel, hidden: Tensor) -> Tensor:
    head = model.get_output_embeddings()
    logits = hidden.float() @ head.weight.float().T
    return logits if head.bias is None else logits + head.bias.float()


def _chunk_metrics(
    student_logits: Tensor, teacher_logits: Tensor | None, rows: Mapping[str, Tensor],
    temperature: float, modes: Sequence[str], log_tail_shape: Tensor | None,
    tail_code_basis: tuple[Tensor, Tensor] | None,
) -> dict[str, Tensor]:
    """Per-position metrics of one chunk of loss positions."""
    log_q = torch.log_softmax(student_logits / temperature, dim=-1)
    out = {
        "nll": -torch.log_softmax(student_logits, dim=-1).gather(
            -1, rows["labels"][:, None])[:, 0],
        "student_tail_mass": 1 - log_q.gather(-1, rows["topk_ids"]).exp().sum(-1),
    }
    for mode in modes:
        div = topk_divergences(
            student_logits, rows["topk_ids"], rows["topk_logprobs"], rows["tail_logmass"], None,
            temperature=temperature, mode=mode,
            log_tail_shape=log_tail_shape if mode == SHAPE_MODE else None,
            tail_code=rows["tail_code"] if mode == LOWRANK_MODE else None,
            tail_code_basis=tail_code_basis if mode == LOWRANK_MODE else None,
        )
        out[f"fkl_{mode}"], out[f"rkl_{mode}"] = div.fkl, div.rkl
    if teacher_logits is not None:
        log_p = torch.log_softmax(teacher_logits / temperature, dim=-1)
        out["fkl"] = (log_p.exp() * (log_p - log_q)).sum(-1)
        out["rkl"] = (log_q.exp() * (log_q - log_p)).sum(-1)
        out["top1_agreement"] = (teacher_logits.argmax(-1) == student_logits.argmax(-1)).double()
    return out


@torch.inference_mode()
def per_sample_fidelity(
    students: Mapping[str, PreTrainedModel],
    cache: TeacherCache,
    teacher: PreTrainedModel | None = None,
    temperature: float = 1.0,
    batch_size: int = DEFAULTS.batch_size,
    chunk_positions: int = DEFAULTS.chunk_positions,
    device: str = DEFAULTS.device,
) -> dict[str, dict[str, np.ndarray]]:
    """Per-sample length-normalised metrics, model name -> metric -> [samples], in cache order.

    The teacher runs once per batch and its hidden states are shared by every student; logits of
    both models exist for one chunk of positions at a time. Without a teacher only the cache's
    view and the student-only metrics are computed. The models must already be on `device`;
    the batches are moved there, the sums stay on the host in float64.
    """
    cache_temperature = cache.ingredients["temperature"]
    if cache_temperature != temperature:
        raise ConfigError(
            f"{cache.location}: the held-out cache is at temperature {cache_temperature}, "
            f"fidelity asks for train.temperature {temperature}; build the held-out cache at "
            "that temperature (cache.temperature)"
        )
    shape = (None if cache.log_tail_shape is None
             else torch.from_numpy(cache.log_tail_shape).to(device))
    code = cache.tail_code
    basis = None if code is None else (torch.from_numpy(code.basis).to(device),
                                       torch.from_numpy(code.bias).to(device))
    modes = (*CACHE_VIEW_MODES, *(() if shape is None else (SHAPE_MODE,)),
             *(() if code is None else (LOWRANK_MODE,)))
    cache_metrics = [f"{d}_{m}" for m in modes for d in ("fkl", "rkl")]
    names = [*STUDENT_METRICS, *cache_metrics, *(EXACT_METRICS if teacher is not None else ())]
    sums = {model: {m: np.zeros(len(cache)) for m in names} for model in students}
    lengths = np.zeros(len(cache))
    for start in tqdm(range(0, len(cache), batch_size), desc="fidelity", unit="batch"):
        indices = range(start, min(start + batch_size, len(cache)))
        batch = collate([cache[i] for i in indices])
        sample_of = (torch.nonzero(batch["loss_mask"])[:, 0] + start).numpy()
        lengths[start : start + len(indices)] = batch["loss_mask"].sum(1).numpy()
        batch = {name: value.to(device) for name, value in batch.items()}
        mask = batch["loss_mask"]
        rows = {name: batch[name] for name in ("topk_logprobs", "tail_logmass", "tail_code")
                if name in batch}  # collate packs the teacher rows of the loss positions
        rows["topk_ids"] = batch["topk_ids"].long()
        rows["labels"] = batch["labels"][mask]
        teacher_hidden = _hidden(teacher, batch) if teacher is not None else None
        for model_name, student in students.items():
            student_hidden = _hidden(student, batch)
            for lo in range(0, len(student_hidden), chunk_positions):
                part = slice(lo, lo + chunk_positions)
                metrics = _chunk_metrics(
                    _logits(student, student_hidden[part]),
                    _logits(teacher, teacher_hidden[part]) if teacher is not None else None,
                    {name: value[part] for name, value in rows.items()}, temperature, modes,
                    shape, basis,
                )
                where = sample_of[part]
                for name, value in metrics.items():
                    np.add.at(sums[model_name][name], where, value.double().cpu().numpy())
    return {model: {m: total / lengths for m, total in per_metric.items()}
            for model, per_metric in sums.items()}


def summarise(per_sample: Mapping[str, np.ndarray], seed: int = 0) -> dict[str, Summary]:
    return {name: bootstrap_interval(values, seed) for name, values in per_sample.items()}
