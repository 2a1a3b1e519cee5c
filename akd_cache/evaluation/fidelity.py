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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

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

ModelLoader = Callable[[], PreTrainedModel]  # returns the model on the device, in eval mode


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
    out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False)
    return out.last_hidden_state[batch["loss_mask"]]


def _logits(head: torch.nn.Module, hidden: Tensor) -> Tensor:
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


class _Batch(NamedTuple):
    """One batch of held-out samples on the host, and where its loss positions belong."""

    tensors: dict[str, Tensor]
    sample_of: np.ndarray  # the sample index of each loss position


def _batches(cache: TeacherCache, batch_size: int) -> tuple[list[_Batch], np.ndarray]:
    """Every batch of the cache, in cache order, and each sample's number of loss positions."""
    batches, lengths = [], np.zeros(len(cache))
    for start in range(0, len(cache), batch_size):
        indices = range(start, min(start + batch_size, len(cache)))
        tensors = collate([cache[i] for i in indices])
        tensors["topk_ids"] = tensors["topk_ids"].long()
        lengths[start : start + len(indices)] = tensors["loss_mask"].sum(1).numpy()
        batches.append(_Batch(tensors, (torch.nonzero(tensors["loss_mask"])[:, 0] + start).numpy()))
    return batches, lengths


def _teacher_pass(load_teacher: ModelLoader, batches: Sequence[_Batch],
                  device: str) -> tuple[torch.nn.Module, list[Tensor]]:
    """The teacher's lm head (left on `device`) and its hidden states at every batch's loss
    positions (on the host), so that the rest of the teacher is gone before a student loads."""
    teacher = load_teacher()
    hidden = [_hidden(teacher, {name: batch.tensors[name].to(device)
                                for name in ("input_ids", "attention_mask", "loss_mask")}).cpu()
              for batch in tqdm(batches, desc="fidelity: teacher", unit="batch")]
    return teacher.get_output_embeddings(), hidden


@torch.inference_mode()
def per_sample_fidelity(
    students: Mapping[str, ModelLoader],
    cache: TeacherCache,
    teacher: ModelLoader | None = None,
    temperature: float = 1.0,
    batch_size: int = DEFAULTS.batch_size,
    chunk_positions: int = DEFAULTS.chunk_positions,
    device: str = DEFAULTS.device,
) -> dict[str, dict[str, np.ndarray]]:
    """Per-sample length-normalised metrics, model name -> metric -> [samples], in cache order.

    One model at a time is held: each loader must return its model on `device`, and the model
    is dropped before the next one loads. The teacher runs first, once per batch, and keeps only
    its lm head on the device and its hidden states on the host, so a paper-scale teacher and
    a student need not fit on one card together with every other student. Logits of both models
    exist for one chunk of positions at a time. Without a teacher only the cache's view and the
    student-only metrics are computed. The sums stay on the host in float64.
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
    batches, lengths = _batches(cache, batch_size)
    teacher_head, teacher_hidden = (_teacher_pass(teacher, batches, device) if teacher is not None
                                    else (None, []))
    results = {}
    for model_name, load_student in students.items():
        student = load_student()
        head = student.get_output_embeddings()
        sums = {m: np.zeros(len(cache)) for m in names}
        for b, batch in enumerate(tqdm(batches, desc=f"fidelity: {model_name}", unit="batch")):
            tensors = {name: value.to(device) for name, value in batch.tensors.items()}
            rows = {name: tensors[name] for name in ("topk_ids", "topk_logprobs", "tail_logmass",
                                                     "tail_code") if name in tensors}
            rows["labels"] = tensors["labels"][tensors["loss_mask"]]
            student_hidden = _hidden(student, tensors)
            for lo in range(0, len(student_hidden), chunk_positions):
                part = slice(lo, lo + chunk_positions)
                metrics = _chunk_metrics(
                    _logits(head, student_hidden[part]),
                    (_logits(teacher_head, teacher_hidden[b][part].to(device))
                     if teacher_head is not None else None),
                    {name: value[part] for name, value in rows.items()}, temperature, modes,
                    shape, basis,
                )
                for name, value in metrics.items():
                    np.add.at(sums[name], batch.sample_of[part], value.double().cpu().numpy())
        del student, head
        results[model_name] = {m: total / lengths for m, total in sums.items()}
    return results


def summarise(per_sample: Mapping[str, np.ndarray], seed: int = 0) -> dict[str, Summary]:
    return {name: bootstrap_interval(values, seed) for name, values in per_sample.items()}
