"""The whole Stage 2 objective: divergences, tail modes, the fused chunked lm head, the
per-sample normalisation, the AKD mix and the cross-entropy mix. `distillation_loss` is what the
trainer calls; beta's own optimiser and resets are `akd.py`.

The cache holds, per response position, the teacher's top-k log-probabilities (normalised over
the full vocabulary, already at the training temperature) and the log of the mass outside them.
The student has full logits, so everything the teacher lacks must be assumed; `TailMode` names
the five assumptions on offer ("shape" also needs the cache's tail shape over the vocabulary,
"lowrank" its per-row tail code). `topk_divergences` works on materialised logits,
`fused_divergence_loss` chunks positions through the lm head so that the [N, V] float32 logits
never exist at once. An online run has the live teacher instead (`LiveTeacher`): its lm head
runs on the same chunks, and FKL and RKL are exact over the full vocabulary.

Conventions: `fkl` is KL(p || q) and `rkl` is KL(q || p), p the teacher, q = softmax(logits / T).
Both are true divergences (never cross-entropies) and are not multiplied by T^2 unless
`t2_scale=True` (Hinton's convention, which keeps gradient magnitudes comparable across T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, get_args

import torch
from torch import Tensor

from akd_cache.config import DistillationExperiment, Experiment, TailMode, TrainConfig

TAIL_MODES: tuple[TailMode, ...] = get_args(TailMode)
"""How the teacher's mass outside its top-k is modelled (`TailMode`).

- ``bucket``: both distributions collapse to k + 1 categories (the top-k ids plus one "rest"
  category); exact KL of those, a lower bound of the full-vocabulary KL (data processing).
- ``renormalize``: the teacher top-k is renormalised to sum 1. FKL is KL(p' || q) with q the full
  student softmax, so it still pulls student mass onto the top-k set. For RKL the student is
  restricted to the same ids and renormalised as well: KL(q' || p') is then a true divergence
  (>= 0), whereas q against p' would be infinite and the top-k sum alone goes negative.
- ``uniform``: the teacher tail is spread evenly over the V - k other ids; full-vocabulary KL,
  computed from sums of the student log-softmax so that no [N, V] teacher tensor exists.
- ``shape``: the teacher tail is spread over the row's other ids in proportion to a fixed
  weight vector s over the vocabulary (`log_tail_shape`, stored once per cache: the teacher's mean
  distribution outside its top-k, mixed with a little uniform), p_v = m s_v / W_out with W_out
  the sum of s over those ids. Uniform is s = const; a real tail is far from flat, and this
  models it better (0.043 vs 0.069 nat/token from the full-teacher KL at k = 64,
  docs/benchmarks.md). Full-vocabulary KL from [n, V] x [V] products, no [N, V] teacher tensor.
- ``lowrank``: the teacher tail is spread over the row's other ids as softmax(bias + basis z)
  there, z the row's r-dimensional code of the teacher's hidden state and basis [V, r], bias [V]
  stored once per cache (`store.format.TailCode`): a tail that follows the context (0.017
  nat/token from the full teacher at k = 64, r = 48, against 0.064 uniform and 0.041 shape,
  docs/benchmarks.md). Each chunk's teacher is built dense, [c, V], and FKL and RKL are exact
  over it, as with a live teacher.
"""

EMPTY_TAIL_LOGMASS = math.log(torch.finfo(torch.float64).eps)
"""Floor for the teacher's tail log-mass when k < V.

A cached tail of -inf (or below float64 resolution of ``1 - sum_topk p``) is rounding, not a
claim that the V - k other tokens are impossible; taken literally it makes RKL infinite as soon
as the student puts any mass there. Flooring it keeps RKL finite with a strong pull on that mass.
"""


class Divergences(NamedTuple):
    """Per-position divergences; masked or inactive positions hold zeros in all three fields."""

    fkl: Tensor
    rkl: Tensor
    student_tail_logmass: Tensor
    """log of the student's mass outside the teacher's top-k ids (detached; -inf when k = V)."""


def _check_mode(mode: str) -> None:
    if mode not in TAIL_MODES:
        raise ValueError(f"unknown tail mode {mode!r}; expected one of {TAIL_MODES}")


class _TailCode(NamedTuple):
    """Mode "lowrank": every row's code z [N, r], and the cache's basis [V, r] and bias [V], in
    the loss's compute dtype."""

    z: Tensor
    basis: Tensor
    bias: Tensor

    def dense(self, rows: Tensor | slice, topk_ids: Tensor, topk_logprobs: Tensor,
              tail_logmass: Tensor) -> Tensor:
        """The teacher's log-probs [c, V] at `rows`: the top-k as cached, the exact tail mass
        (floored as in every mode) spread as softmax(bias + basis z) over the other ids."""
        logits = torch.addmm(self.bias, self.z[rows], self.basis.T)
        logits.scatter_(-1, topk_ids, -math.inf)
        torch.log_softmax(logits, -1, out=logits)
        logits.add_(tail_logmass.to(logits.dtype).clamp_min(EMPTY_TAIL_LOGMASS)[:, None])
        return logits.scatter_(-1, topk_ids, topk_logprobs.to(logits.dtype))


def _tail_code(
    mode: TailMode,
    tail_code: Tensor | None,
    basis: tuple[Tensor, Tensor] | None,
    rows: int,
    vocab_size: int,
    dtype: torch.dtype,
) -> _TailCode | None:
    """The checked tail code of mode "lowrank"; None for the other modes, which take none."""
    if mode != "lowrank":
        if tail_code is not None or basis is not None:
            raise ValueError(f"tail_code applies to tail mode 'lowrank' only, not {mode!r}")
        return None
    if tail_code is None or basis is None:
        raise ValueError("tail mode 'lowrank' needs tail_code [..., r] and tail_code_basis "
                         "(basis [V, r], bias [V]): the cache's tail code")
    weights, bias = basis
    z = tail_code.reshape(rows, -1)
    if weights.shape != (vocab_size, z.shape[1]) or bias.shape != (vocab_size,):
        raise ValueError(f"tail_code_basis has shapes {tuple(weights.shape)} and "
                         f"{tuple(bias.shape)}, expected ({vocab_size}, {z.shape[1]}) and "
                         f"({vocab_size},)")
    return _TailCode(*(t.detach().to(dtype) for t in (z, weights, bias)))


def _tail_shape(
    mode: TailMode,
    log_tail_shape: Tensor | None,
    vocab_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> _TailShape | None:
    """The checked tail shape of mode "shape"; None for the other modes, which take none."""
    if mode != "shape":
        if log_tail_shape is not None:
            raise ValueError(f"log_tail_shape applies to tail mode 'shape' only, not {mode!r}")
        return None
    if log_tail_shape is None:
        raise ValueError("tail mode 'shape' needs log_tail_shape, the log of the cache's tail "
                         "shape over the vocabulary [V]")
    if log_tail_shape.shape != (vocab_size,):
        raise ValueError(f"log_tail_shape has shape {tuple(log_tail_shape.shape)}, expected "
                         f"({vocab_size},) for the vocabulary")
    if not torch.isfinite(log_tail_shape).all():
        raise ValueError("log_tail_shape must be finite: the tail shape is strictly positive")
    return _TailShape.of(log_tail_shape, dtype, device)


def _kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Elementwise a * (log a - log b) with 0 log 0 = 0, and a gradient free of NaN there."""
    empty = torch.isneginf(log_a)
    safe_a = log_a.masked_fill(empty, 0.0)
    safe_b = log_b.masked_fill(empty, 0.0)
    return torch.where(empty, 0.0, safe_a.exp() * (safe_a - safe_b))


class _StudentStats(NamedTuple):
    """All the divergences need from the student's [n, V] log-softmax, as per-row values.

    Reducing the student to these first lets the fused path differentiate the loss with respect
    to a few [n] / [n, k] tensors and apply the chain rule to the [n, V] part by hand, in place.
    """

    log_q_top: Tensor  # [n, k] student log-probs on the teacher's top-k ids
    tail: Tensor  # [n] log of the student's mass outside those ids; -inf when k = V
    sum_log_q_out: Tensor | None = None  # [n] sum of log q over the tail ids (uniform mode)
    sum_q_log_q_out: Tensor | None = None  # [n] sum of q log q over the tail ids (uniform, shape)
    sum_s_log_q_out: Tensor | None = None  # [n] sum of s log q over the tail ids (shape mode)
    sum_q_log_s_out: Tensor | None = None  # [n] sum of q log s over the tail ids (shape mode)


class _ShapeRows(NamedTuple):
    """Per row, over the ids outside its top-k: log W_out = log sum s, and sum r log r with
    r = s / W_out (the tail's own normalised shape, so that p_v = m r_v there)."""

    log_mass_out: Tensor  # [n]
    neg_entropy: Tensor  # [n]


class _TailShape(NamedTuple):
    """The tail shape s over the vocabulary in the loss's compute dtype, scaled to max s = 1
    (only ratios matter; the largest weight at 1 keeps the small ones clear of underflow)."""

    weights: Tensor  # [V] s
    log_weights: Tensor  # [V] log s

    @classmethod
    def of(cls, log_tail_shape: Tensor, dtype: torch.dtype, device: torch.device) -> _TailShape:
        log_weights = log_tail_shape.detach().to(device=device, dtype=dtype)
        log_weights = log_weights - log_weights.max()
        return cls(log_weights.exp(), log_weights)

    def rows(self, topk_ids: Tensor) -> _ShapeRows:
        """The teacher side of each row [n, k]: its tail ids are the ones outside `topk_ids`.

        A masked logsumexp gives W_out to full relative precision even when the top-k ids hold
        nearly all of s, where the total minus the top-k part would cancel.
        """
        log_s_out = self.log_weights.expand(topk_ids.shape[0], -1).scatter(
            -1, topk_ids, -math.inf
        )
        log_mass_out = log_s_out.logsumexp(-1)
        shape_out = log_s_out.sub_(log_mass_out[:, None]).exp_()  # s / W_out, 0 on the top-k
        return _ShapeRows(log_mass_out, shape_out @ self.log_weights - log_mass_out)


_EXACT_TAIL_SUM = 2.0**60
"""A row's tail summed without the logsumexp shift is exact to float rounding above this many
times the smallest normal float (1.4e-20 in float32): the terms that underflow to zero add up to
less than 1e-20 of it. Below, the row's tail is recomputed with the shift."""


def _student_stats(
    log_q: Tensor, topk_ids: Tensor | None, mode: TailMode, shape: _TailShape | None = None
) -> _StudentStats:
    """`topk_ids` None: the teacher covers the whole vocabulary in id order (a live teacher).
    `shape` is the tail shape of mode "shape"."""
    if topk_ids is None:
        return _StudentStats(log_q, torch.full_like(log_q[:, 0], -math.inf))
    log_q_top = log_q.gather(-1, topk_ids)
    if log_q.shape[-1] == topk_ids.shape[-1]:
        empty = torch.full_like(log_q_top[:, 0], -math.inf)
        return _StudentStats(log_q_top, empty)
    # The tail mass summed directly over the tail ids, never as 1 - sum of the top-k (which
    # cancels when the tail is far below float32 resolution of 1). log q <= 0, so the exp cannot
    # overflow and needs no logsumexp shift (a pass and a [n, V] temporary fewer); rows whose
    # whole tail underflows are redone with the shift.
    q_out = log_q.scatter(-1, topk_ids, -math.inf).exp_()  # q on the tail ids, 0 on the top-k
    tail_mass = q_out.sum(-1)
    tail = tail_mass.log()
    underflow = (tail_mass < torch.finfo(tail_mass.dtype).tiny * _EXACT_TAIL_SUM).nonzero()
    if len(underflow):
        rows = underflow[:, 0]
        tail[rows] = log_q[rows].scatter(-1, topk_ids[rows], -math.inf).logsumexp(-1)
    if mode != "shape":
        del q_out
    if mode not in ("uniform", "shape"):
        return _StudentStats(log_q_top, tail)
    # log q on the tail ids and 0 on the top-k ids: direct sums, no cancellation.
    log_q_out = log_q.scatter(-1, topk_ids, 0.0)
    if mode == "uniform":
        sum_q_log_q_out = (log_q_out.exp() * log_q_out).sum(-1)
        return _StudentStats(log_q_top, tail, log_q_out.sum(-1), sum_q_log_q_out)
    return _StudentStats(log_q_top, tail, None, (q_out * log_q_out).sum(-1),
                         log_q_out @ shape.weights, q_out @ shape.log_weights)


def _divergences_from_stats(
    stats: _StudentStats,
    topk_logprobs: Tensor,
    tail_logmass: Tensor | None,
    tail_size: int,
    mode: TailMode,
    shape_rows: _ShapeRows | None = None,
) -> tuple[Tensor, Tensor]:
    """FKL and RKL per row (no masking, no T^2). The one place the formulas live.
    `shape_rows` is the teacher side of mode "shape" (None when the tail is empty)."""
    teacher = topk_logprobs.to(stats.log_q_top.dtype)
    if mode == "renormalize":
        teacher_r = teacher - torch.logsumexp(teacher, dim=-1, keepdim=True)
        student_r = stats.log_q_top - torch.logsumexp(stats.log_q_top, dim=-1, keepdim=True)
        fkl = _kl_terms(teacher_r, stats.log_q_top).sum(-1)
        rkl = _kl_terms(student_r, teacher_r).sum(-1)
        return fkl, rkl

    fkl = _kl_terms(teacher, stats.log_q_top).sum(-1)
    rkl = _kl_terms(stats.log_q_top, teacher).sum(-1)
    if tail_size == 0:
        # k = V: the tail is empty by construction; any cached tail mass is rounding noise.
        return fkl, rkl
    tail = tail_logmass.to(teacher.dtype).clamp_min(EMPTY_TAIL_LOGMASS)
    if mode == "bucket":
        return fkl + _kl_terms(tail, stats.tail), rkl + _kl_terms(stats.tail, tail)
    if mode == "shape":
        # tail id v has teacher log-prob tail + log r_v, r_v = s_v / W_out
        log_w_out = shape_rows.log_mass_out
        fkl = (fkl + tail.exp() * (tail + shape_rows.neg_entropy)
               - (tail - log_w_out).exp() * stats.sum_s_log_q_out)
        rkl = (rkl + stats.sum_q_log_q_out - stats.tail.exp() * (tail - log_w_out)
               - stats.sum_q_log_s_out)
        return fkl, rkl
    # uniform: each of the tail_size tail ids has teacher log-prob `per_token`.
    per_token = tail - math.log(tail_size)
    fkl = fkl + tail.exp() * per_token - per_token.exp() * stats.sum_log_q_out
    rkl = rkl + stats.sum_q_log_q_out - stats.tail.exp() * per_token
    return fkl, rkl


def topk_divergences(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    mask: Tensor | None,
    *,
    temperature: float = 1.0,
    mode: TailMode = "bucket",
    t2_scale: bool = False,
    log_tail_shape: Tensor | None = None,
    tail_code: Tensor | None = None,
    tail_code_basis: tuple[Tensor, Tensor] | None = None,
) -> Divergences:
    """Per-position FKL and RKL from materialised student logits.

    Shapes: logits [..., V], ids and log-probs [..., k], tail and mask [...] (mask None means all
    positions count), `log_tail_shape` [V] (mode "shape" only), `tail_code` [..., r] and
    `tail_code_basis` ([V, r], [V]) (mode "lowrank" only). Softmax runs in at least
    float32. Masked positions get 0 and no gradient; their ids and teacher values may be padding
    garbage, so they are replaced before use.
    """
    _check_mode(mode)
    lead = student_logits.shape[:-1]
    vocab_size, k = student_logits.shape[-1], topk_ids.shape[-1]
    compute_dtype = torch.promote_types(student_logits.dtype, torch.float32)
    shape = _tail_shape(mode, log_tail_shape, vocab_size, compute_dtype, student_logits.device)
    code = _tail_code(mode, tail_code, tail_code_basis, lead.numel(), vocab_size, compute_dtype)
    logits = student_logits.reshape(-1, vocab_size).to(compute_dtype)
    ids = topk_ids.reshape(-1, k)
    teacher = topk_logprobs.reshape(-1, k).to(compute_dtype)
    tail = tail_logmass.reshape(-1).to(compute_dtype)
    valid = None
    if mask is not None:
        valid = mask.reshape(-1).to(torch.bool)
        rows = valid[:, None]
        ids = torch.where(rows, ids, torch.arange(k, device=ids.device))
        teacher = torch.where(rows, teacher, -math.log(k))
        tail = torch.where(valid, tail, -math.inf)

    log_q = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
    stats = _student_stats(log_q, ids, mode, shape)
    if code is not None:
        dense = code.dense(slice(None), ids, teacher, tail)
        fkl, rkl = _divergences_from_stats(_StudentStats(log_q, stats.tail), dense, None, 0, mode)
    else:
        shape_rows = shape.rows(ids) if shape is not None and k < vocab_size else None
        fkl, rkl = _divergences_from_stats(stats, teacher, tail, vocab_size - k, mode, shape_rows)
    if t2_scale:
        fkl, rkl = fkl * temperature**2, rkl * temperature**2
    student_tail = stats.tail.detach()
    if valid is not None:
        fkl = torch.where(valid, fkl, 0.0)
        rkl = torch.where(valid, rkl, 0.0)
        student_tail = torch.where(valid, student_tail, 0.0)
    return Divergences(fkl.reshape(lead), rkl.reshape(lead), student_tail.reshape(lead))


def temper_teacher(
    topk_logprobs: Tensor, tail_logmass: Tensor, temperature: float, vocab_size: int
) -> tuple[Tensor, Tensor]:
    """Convert T = 1 cached teacher values to temperature T.

    p_T(i) is proportional to p(i)^(1/T), so ratios within the top-k set are exact. The
    normaliser also needs sum over the tail of p(j)^(1/T), which the cache does not hold: each of
    the V - k tail tokens is assumed to carry tail / (V - k). That is exact only for a uniform
    tail; by Jensen it over-estimates the tempered tail mass for T > 1 and under-estimates it for
    T < 1. Build the cache at temperature T when exact values matter.
    Returns (topk_logprobs, tail_logmass) at temperature T.
    """
    if temperature == 1.0:
        return topk_logprobs, tail_logmass
    k = topk_logprobs.shape[-1]
    tail_size = vocab_size - k
    top = topk_logprobs / temperature
    top_mass = torch.logsumexp(top, dim=-1)
    if tail_size == 0:
        return top - top_mass[..., None], torch.full_like(tail_logmass, -math.inf)
    log_tail_size = math.log(tail_size)
    tail = log_tail_size + (tail_logmass - log_tail_size) / temperature
    norm = torch.logaddexp(top_mass, tail)
    return top - norm[..., None], tail - norm


class _TeacherChunk(NamedTuple):
    """The teacher on one chunk of positions: its top-k (ids [c, k], log-probs [c, k], tail
    [c]), or with ids and tail None its log-probs [c, V] over the whole vocabulary in id order.
    `shape` is the tail shape of mode "shape"."""

    ids: Tensor | None
    logprobs: Tensor
    tail_logmass: Tensor | None
    shape: _TailShape | None = None
    top_ids: Tensor | None = None  # a dense teacher's top-k ids, for the student's tail mass


class _CachedRows(NamedTuple):
    """Cached teacher rows of every loss position: ids, log-probs [N, k], tail [N], and the
    cache's tail shape in mode "shape"."""

    ids: Tensor
    logprobs: Tensor
    tail_logmass: Tensor
    shape: _TailShape | None
    code: _TailCode | None = None

    def chunk(self, rows: Tensor, temperature: float, dtype: torch.dtype) -> _TeacherChunk:
        ids, logprobs, tail = self.ids[rows], self.logprobs[rows], self.tail_logmass[rows]
        if self.code is not None:
            return _TeacherChunk(None, self.code.dense(rows, ids, logprobs, tail), None,
                                 top_ids=ids)
        return _TeacherChunk(ids, logprobs, tail, self.shape)


class _LiveRows(NamedTuple):
    """The live teacher's hidden states at every loss position [N, H_t] and its lm head."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None

    def chunk(self, rows: Tensor, temperature: float, dtype: torch.dtype) -> _TeacherChunk:
        """log softmax(logits / T) of the chunk's positions, in the loss's compute dtype."""
        h, weight = self.hidden[rows], self.weight
        logits = h @ weight.T if self.bias is None else torch.addmm(self.bias, h, weight.T)
        logits = logits.to(dtype)
        if temperature != 1.0:
            logits = logits / temperature
        return _TeacherChunk(None, logits.log_softmax(-1), None)


class _ChunkResult(NamedTuple):
    loss: Tensor  # scalar
    fkl: Tensor  # [c], detached and scaled
    rkl: Tensor
    student_tail: Tensor
    nll: Tensor | None  # [c] at T = 1, when there is a CE term
    grad_logits: Tensor  # [c, V] d loss / d logits, written over the logits buffer


def _chunk_loss_and_grad(
    logits: Tensor,
    teacher: _TeacherChunk,
    coefs: tuple[Tensor, Tensor, Tensor | None],
    target_ids: Tensor | None,
    temperature: float,
    mode: TailMode,
    kl_scale: float,
) -> _ChunkResult:
    """Loss and d loss / d logits for one chunk, with O(1) [c, V] buffers beyond `logits`.

    `logits` is owned and overwritten. With l = log_softmax(s), s = logits / T, and D the
    derivatives of the loss with respect to the per-row statistics (found by autograd on small
    tensors), the chain rule gives for a tail id j, with e_j = q_j / Q = exp(l_j - tail):
        dL/ds_j = e_j (D_tail + Q (D_sum_qlogq (l_j + 1) - sum_D)) + D_sum_log,
    where sum_D is the total derivative with respect to l (the softmax Jacobian's correction);
    e_j <= 1 on the tail, so nothing overflows however small the tail mass Q is. Mode "shape"
    weights the last term by the tail shape, D_sum_slogq w_j, and adds q_j D_sum_qlogs log w_j.
    """
    topk_ids, topk_logprobs, tail_logmass, shape, top_ids = teacher
    fkl_coef, rkl_coef, ce_coef = coefs
    tail_size = 0 if topk_ids is None else logits.shape[-1] - topk_ids.shape[-1]
    # CE is a hard-label term taken at T = 1 (Hinton); at T = 1 it shares the softmax.
    separate_ce = ce_coef is not None and temperature != 1.0
    nll = None
    if ce_coef is not None:
        targets = torch.where(ce_coef != 0, target_ids, 0)[:, None]
    if separate_ce:
        logits_lse = logits.logsumexp(-1, keepdim=True)
        nll = (logits_lse - logits.gather(-1, targets))[:, 0]
        log_q = logits / temperature
    else:
        log_q = logits if temperature == 1.0 else logits.div_(temperature)
    torch.log_softmax(log_q, -1, out=log_q)  # in place: one fused pass, no [c, V] temporary
    if ce_coef is not None and not separate_ce:
        nll = -log_q.gather(-1, targets)[:, 0]
    stats = _student_stats(log_q, topk_ids, mode, shape)
    shape_rows = shape.rows(topk_ids) if mode == "shape" and tail_size else None
    student_tail = stats.tail
    if top_ids is not None:  # for the log only: 1 - sum over the top-k, no [c, V] pass
        student_tail = torch.log1p(-log_q.gather(-1, top_ids).exp().sum(-1).clamp_max(1.0))

    with torch.enable_grad():
        leaves = _StudentStats(*(None if t is None else t.detach().requires_grad_() for t in stats))
        fkl, rkl = _divergences_from_stats(
            leaves, topk_logprobs, tail_logmass, tail_size, mode, shape_rows
        )
        fkl, rkl = fkl * kl_scale, rkl * kl_scale
        kl_loss = (fkl_coef * fkl + rkl_coef * rkl).sum()
        used = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(kl_loss, used, materialize_grads=True))
        d = _StudentStats(*(None if t is None else next(grads) for t in leaves))

    q_top = stats.log_q_top.exp()
    mass_out = stats.tail.exp()
    sum_d = d.log_q_top.sum(-1) + d.tail
    if d.sum_log_q_out is not None:
        sum_d = (sum_d + tail_size * d.sum_log_q_out
                 + d.sum_q_log_q_out * (stats.sum_q_log_q_out + mass_out))
    elif d.sum_s_log_q_out is not None:
        sum_d = (sum_d + d.sum_q_log_q_out * (stats.sum_q_log_q_out + mass_out)
                 + d.sum_s_log_q_out * shape_rows.log_mass_out.exp()
                 + d.sum_q_log_s_out * stats.sum_q_log_s_out)
    top_grad = d.log_q_top - q_top * sum_d[:, None]
    row = d.tail - mass_out * sum_d
    if ce_coef is not None and not separate_ce:
        top_grad = top_grad + ce_coef[:, None] * q_top
        row = row + ce_coef * mass_out

    grad = log_q  # reuse the buffer; the top-k entries are overwritten below
    if tail_size and d.sum_q_log_q_out is not None:
        ratio = (log_q - stats.tail[:, None]).exp_()
        grad.add_(1.0).mul_((mass_out * d.sum_q_log_q_out)[:, None]).add_(row[:, None])
        if mode == "shape":
            # in place, outer products with the [V] shape: no [c, V] temporary beyond `ratio`
            grad.addr_(mass_out * d.sum_q_log_s_out, shape.log_weights)
            grad.mul_(ratio).addr_(d.sum_s_log_q_out, shape.weights)
        else:
            grad.mul_(ratio).add_(d.sum_log_q_out[:, None])
    elif tail_size:
        grad.sub_(stats.tail[:, None]).exp_().mul_(row[:, None])
    if topk_ids is None:
        grad.copy_(top_grad)
    else:
        grad.scatter_(-1, topk_ids, top_grad)
    if temperature != 1.0:
        grad.div_(temperature)
    if separate_ce:
        grad.add_(logits.sub_(logits_lse).exp_().mul_(ce_coef[:, None]))
    if ce_coef is not None:
        grad.scatter_add_(-1, targets, -ce_coef[:, None])

    loss = kl_loss.detach() + (0.0 if nll is None else (ce_coef * nll).sum())
    return _ChunkResult(loss, fkl.detach(), rkl.detach(), student_tail, nll, grad)


class _FusedDivergence(torch.autograd.Function):
    """Chunked lm head + divergences whose gradients are computed in the forward pass.

    The per-position coefficients are known before the forward, so each chunk's logits can be
    turned into loss and d loss / d logits at once and folded straight into the gradients of
    hidden, weight and bias (3 matmuls in all, as in Liger's fused linear cross-entropy). The
    backward only scales those by grad_output, so nothing is recomputed and no [N, V] exists.
    Coefficients may require grad too (a learnable beta): d loss / d coef is the detached term.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        fkl_coef: Tensor,
        rkl_coef: Tensor,
        ce_coef: Tensor | None,
        teacher: _CachedRows | _LiveRows,
        target_ids: Tensor | None,
        temperature: float,
        mode: TailMode,
        chunk_size: int,
        kl_scale: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n_pos = hidden.shape[0]
        compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        coefs = tuple(
            None if c is None else c.detach().to(compute_dtype)
            for c in (fkl_coef, rkl_coef, ce_coef)
        )
        active = torch.stack([c != 0 for c in coefs if c is not None]).any(0)
        active_rows = active.nonzero().squeeze(-1)

        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # Accumulate in float32 at least: summing bf16 chunk products would lose precision.
        grad_weight = (
            torch.zeros(weight.shape, dtype=compute_dtype, device=weight.device)
            if need_weight
            else None
        )
        grad_bias = (
            torch.zeros(bias.shape, dtype=compute_dtype, device=bias.device) if need_bias else None
        )
        fkl = hidden.new_zeros(n_pos, dtype=compute_dtype)
        rkl = torch.zeros_like(fkl)
        nll = torch.zeros_like(fkl)
        student_tail = torch.zeros_like(fkl)
        loss = hidden.new_zeros((), dtype=compute_dtype)

        for rows in active_rows.split(chunk_size):
            h = hidden[rows]
            logits = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
            logits = logits.to(compute_dtype)
            chunk = _chunk_loss_and_grad(
                logits,
                teacher.chunk(rows, temperature, compute_dtype),
                tuple(None if c is None else c[rows] for c in coefs),
                None if target_ids is None else target_ids[rows],
                temperature,
                mode,
                kl_scale,
            )
            loss += chunk.loss
            fkl[rows] = chunk.fkl
            rkl[rows] = chunk.rkl
            student_tail[rows] = chunk.student_tail
            if chunk.nll is not None:
                nll[rows] = chunk.nll
            grad_logits = chunk.grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ weight
            if grad_weight is not None:
                if grad_weight.dtype == hidden.dtype:
                    grad_weight.addmm_(grad_logits.T, h)
                else:
                    grad_weight += grad_logits.T @ h
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            # Free this chunk's [c, V] buffers before the next matmul allocates its own.
            del logits, chunk, grad_logits

        ctx.grads = (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            fkl,
            rkl,
            nll,
        )
        ctx.mark_non_differentiable(fkl, rkl, student_tail)
        return loss, fkl, rkl, student_tail

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_loss: Tensor, *_unused: Tensor
    ) -> tuple[Tensor | None, ...]:
        scaled = [
            g * grad_loss.to(g.dtype) if needed else None
            for g, needed in zip(ctx.grads, ctx.needs_input_grad[:6], strict=True)
        ]
        return (*scaled, None, None, None, None, None, None)


def fused_divergence_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    lm_head_bias: Tensor | None,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    *,
    fkl_coef: Tensor,
    rkl_coef: Tensor,
    ce_coef: Tensor | None = None,
    target_ids: Tensor | None = None,
    temperature: float = 1.0,
    mode: TailMode = "bucket",
    chunk_size: int,
    t2_scale: bool = False,
    log_tail_shape: Tensor | None = None,
    tail_code: Tensor | None = None,
    tail_code_basis: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Divergences]:
    """loss = sum_n fkl_coef*fkl + rkl_coef*rkl + ce_coef*(-log softmax(logits)[target]).

    hidden [N, H] (any float dtype; leading dims [B, S, H] are flattened), weight [V, H] and
    bias [V] or None in the same dtype; teacher tensors (and `log_tail_shape`, mode "shape"
    only, `tail_code` and `tail_code_basis`, mode "lowrank" only) as in `topk_divergences` and
    coefficients [N], with the same leading dims as hidden.
    Positions
    whose coefficients are all zero are skipped (padding costs nothing) and report
    fkl = rkl = 0; a position with any nonzero coefficient reports both, so RKL is still logged
    when only FKL trains (beta = 0). Logits are formed per chunk of `chunk_size` positions in the
    input dtype, then softmaxed in float32; gradients come back in the input dtype and only for
    inputs that require them (a frozen LoRA lm head costs no weight-gradient matmul). The CE
    term uses the T = 1 logits. Returns the loss (float32, or float64 for float64 inputs) and
    the detached per-position divergences.
    """
    _check_mode(mode)
    k = topk_ids.shape[-1]
    compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
    shape = _tail_shape(mode, log_tail_shape, lm_head_weight.shape[0], compute_dtype,
                        hidden.device)
    code = _tail_code(mode, tail_code, tail_code_basis, tail_logmass.numel(),
                      lm_head_weight.shape[0], compute_dtype)
    teacher = _CachedRows(
        topk_ids.reshape(-1, k), topk_logprobs.reshape(-1, k), tail_logmass.reshape(-1), shape,
        code,
    )
    return _fused(hidden, lm_head_weight, lm_head_bias, teacher, fkl_coef, rkl_coef, ce_coef,
                  target_ids, temperature, mode, chunk_size, t2_scale)


def fused_live_divergence_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    lm_head_bias: Tensor | None,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    teacher_bias: Tensor | None,
    *,
    fkl_coef: Tensor,
    rkl_coef: Tensor,
    ce_coef: Tensor | None = None,
    target_ids: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int,
    t2_scale: bool = False,
) -> tuple[Tensor, Divergences]:
    """`fused_divergence_loss` against the live teacher: its hidden states at the same positions
    [N, H_t] (no grad) and its lm head [V, H_t]. Each chunk's teacher log-probs are
    log softmax(teacher logits / T), so FKL and RKL are exact over the full vocabulary and no
    [N, V] tensor of either model exists.
    """
    if teacher_weight.shape[0] != lm_head_weight.shape[0]:
        raise ValueError(f"the teacher's vocabulary ({teacher_weight.shape[0]}) differs from "
                         f"the student's ({lm_head_weight.shape[0]})")
    teacher = _LiveRows(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight,
                        teacher_bias)
    # nothing lies outside a full-vocabulary teacher, so every tail mode is the exact KL
    return _fused(hidden, lm_head_weight, lm_head_bias, teacher, fkl_coef, rkl_coef, ce_coef,
                  target_ids, temperature, "bucket", chunk_size, t2_scale)


def _fused(
    hidden: Tensor,
    lm_head_weight: Tensor,
    lm_head_bias: Tensor | None,
    teacher: _CachedRows | _LiveRows,
    fkl_coef: Tensor,
    rkl_coef: Tensor,
    ce_coef: Tensor | None,
    target_ids: Tensor | None,
    temperature: float,
    mode: TailMode,
    chunk_size: int,
    t2_scale: bool,
) -> tuple[Tensor, Divergences]:
    if ce_coef is not None and target_ids is None:
        raise ValueError("ce_coef needs target_ids")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    kl_scale = temperature**2 if t2_scale else 1.0
    lead = hidden.shape[:-1]
    loss, fkl, rkl, student_tail = _FusedDivergence.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        lm_head_weight,
        lm_head_bias,
        fkl_coef.reshape(-1),
        rkl_coef.reshape(-1),
        None if ce_coef is None else ce_coef.reshape(-1),
        teacher,
        None if target_ids is None else target_ids.reshape(-1),
        temperature,
        mode,
        chunk_size,
        kl_scale,
    )
    return loss, Divergences(fkl.reshape(lead), rkl.reshape(lead), student_tail.reshape(lead))


@dataclass(frozen=True)
class LossSettings:
    """What the objective needs from an experiment and the profile's train settings."""

    distill: bool  # False: cross-entropy alone (sft, seqkd); the rows feed only the logged FKL/RKL
    ce_weight: float
    tail_mode: TailMode
    chunk_size: int
    temperature: float = 1.0
    t2_scale: bool = False

    @classmethod
    def of(cls, experiment: Experiment, train: TrainConfig) -> LossSettings:
        common = {"temperature": train.temperature, "t2_scale": train.t2_scale,
                  "chunk_size": train.chunk_size}
        if isinstance(experiment, DistillationExperiment):
            return cls(True, experiment.ce_weight, experiment.tail_mode or train.tail_mode,
                       **common)
        # sft and seqkd only log FKL/RKL, and no tail model is loaded for them: bucket needs none
        return cls(False, 1.0, "bucket", **common)


class CachedTeacher(NamedTuple):
    """The cache's rows for a batch, one per loss position in `x[loss_mask]`'s order (as
    `store.reader.collate` packs them): ids (any integer dtype) and log-probs [R, k], tail
    log-mass [R], the cache's log tail shape [V] (read by tail mode "shape" only), and the rows'
    tail codes [R, r] with the cache's basis [V, r] and bias [V] (tail mode "lowrank" only)."""

    topk_ids: Tensor
    topk_logprobs: Tensor
    tail_logmass: Tensor
    log_tail_shape: Tensor | None = None
    tail_code: Tensor | None = None
    tail_code_basis: tuple[Tensor, Tensor] | None = None


class CachedTailModel(NamedTuple):
    """What a cache stores, once, for the tail modes that model the tail: its log tail shape
    [V] ("shape") or its tail code's basis [V, r] and bias [V] ("lowrank"); None otherwise."""

    log_tail_shape: Tensor | None = None
    tail_code_basis: tuple[Tensor, Tensor] | None = None


class LiveTeacher(NamedTuple):
    """The teacher model for a batch: its decoder's output [B, S, H_t], computed without grad,
    and its lm head, which `distillation_loss` applies a chunk of loss positions at a time."""

    hidden: Tensor
    lm_head: torch.nn.Linear


@dataclass
class LossOutput:
    loss: Tensor
    fkl: Tensor  # batch mean of per-sample normalised FKL, detached
    rkl: Tensor
    teacher_tail: Tensor  # mean tail mass over loss positions, detached
    student_tail: Tensor
    tokens: Tensor  # loss positions in the batch


def distillation_loss(
    hidden: Tensor,
    lm_head: torch.nn.Linear,
    teacher: CachedTeacher | LiveTeacher,
    loss_mask: Tensor,
    labels: Tensor,
    beta: Tensor,
    settings: LossSettings,
) -> LossOutput:
    """mean_b over samples of [beta * RKL_b + (1 - beta) * FKL_b + ce_weight * CE_b], each term
    averaged over the sample's loss positions (so long samples do not outweigh short ones).

    hidden [B, S, H] is the student decoder's output; loss_mask [B, S] marks the positions whose
    next token is learnt, labels [B, S] those tokens. Only the masked positions reach the lm head
    (and the live teacher's). The cached teacher's tail mode is `settings.tail_mode` (its tail
    shape is passed on in mode "shape" only); the live teacher has no tail.
    """
    rows = hidden[loss_mask]
    sample_of = torch.nonzero(loss_mask)[:, 0]
    # the loss's compute dtype: float32, or float64 for float64 inputs
    lengths = loss_mask.sum(1).clamp(min=1).to(torch.promote_types(hidden.dtype, torch.float32))
    # per-sample length normalisation, then the batch mean (docs/method.md)
    weight = 1.0 / (lengths[sample_of] * loss_mask.shape[0])
    beta = beta.to(weight)
    distill = float(settings.distill)
    terms = {
        "fkl_coef": distill * (1 - beta) * weight, "rkl_coef": distill * beta * weight,
        "ce_coef": settings.ce_weight * weight if settings.ce_weight else None,
        "target_ids": labels[loss_mask] if settings.ce_weight else None,
        "temperature": settings.temperature, "chunk_size": settings.chunk_size,
        "t2_scale": settings.t2_scale,
    }
    if isinstance(teacher, LiveTeacher):
        head = teacher.lm_head
        loss, div = fused_live_divergence_loss(
            rows, lm_head.weight, lm_head.bias, teacher.hidden[loss_mask], head.weight,
            head.bias, **terms,
        )
        teacher_tail = torch.zeros((), device=rows.device)
    else:
        tail_logmass = teacher.tail_logmass
        if len(tail_logmass) != len(rows):
            raise ValueError(f"the cached teacher has {len(tail_logmass)} rows for "
                             f"{len(rows)} loss positions: pass the rows of the loss positions")
        shape = teacher.log_tail_shape if settings.tail_mode == "shape" else None
        lowrank = settings.tail_mode == "lowrank"
        loss, div = fused_divergence_loss(
            rows, lm_head.weight, lm_head.bias, teacher.topk_ids.long(), teacher.topk_logprobs,
            tail_logmass, mode=settings.tail_mode, log_tail_shape=shape,
            tail_code=teacher.tail_code if lowrank else None,
            tail_code_basis=teacher.tail_code_basis if lowrank else None, **terms,
        )
        teacher_tail = tail_logmass.exp().mean()
    return LossOutput(
        loss=loss,
        fkl=(div.fkl * weight).sum(),
        rkl=(div.rkl * weight).sum(),
        teacher_tail=teacher_tail,
        student_tail=div.student_tail_logmass.float().exp().mean(),
        tokens=loss_mask.sum(),
    )
