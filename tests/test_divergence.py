"""Stage 2 divergences against an independent float64 full-vocabulary reference."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch

from akd_cache.config import SFT, SeqKD, TrainConfig
from akd_cache.student.loss import (
    TAIL_MODES,
    CachedTeacher,
    LossSettings,
    distillation_loss,
    fused_divergence_loss,
    temper_teacher,
    topk_divergences,
)

F64 = torch.float64


def make_teacher(
    n: int, vocab: int, k: int, *, seed: int, scale: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random peaked teacher: full probs [n, V] and its cached top-k ids, log-probs, tail."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=gen, dtype=F64) * scale
    probs = logits.softmax(-1)
    top_p, ids = probs.topk(k, dim=-1)
    rest = probs.scatter(-1, ids, 0.0).sum(-1)
    return probs, ids, top_p.log(), rest.log()


def student_logits(n: int, vocab: int, *, seed: int, scale: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(n, vocab, generator=gen, dtype=F64) * scale


def random_log_shape(vocab: int, *, seed: int) -> torch.Tensor:
    """A random strictly positive tail shape over the vocabulary, as its log [V]."""
    gen = torch.Generator().manual_seed(seed + 2000)
    return torch.randn(vocab, generator=gen, dtype=F64) * 2.0


TAIL_RANK = 3


def random_tail_code(rows: int, vocab: int, *, seed: int) -> dict[str, object]:
    """A random tail code: every row's z [rows, r], the basis [V, r] and bias [V]."""
    gen = torch.Generator().manual_seed(seed + 3000)
    return {"tail_code": torch.randn(rows, TAIL_RANK, generator=gen, dtype=F64),
            "tail_code_basis": (torch.randn(vocab, TAIL_RANK, generator=gen, dtype=F64),
                                torch.randn(vocab, generator=gen, dtype=F64))}


def tail_kwargs(mode: str, vocab: int, *, seed: int = 0, rows: int = 0) -> dict[str, object]:
    """What a tail mode needs beyond the cached rows: a random tail shape for "shape", a random
    tail code of `rows` rows for "lowrank"."""
    if mode == "lowrank":
        return random_tail_code(rows, vocab, seed=seed)
    return {"log_tail_shape": random_log_shape(vocab, seed=seed)} if mode == "shape" else {}


def dense_lowrank_teacher(top_lp: torch.Tensor, ids: torch.Tensor, tail: torch.Tensor,
                          tail_code: torch.Tensor,
                          tail_code_basis: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mode "lowrank" written out row by row in float64: the top-k values, and the tail mass
    spread over the other ids in proportion to exp(bias + basis z)."""
    basis, bias = tail_code_basis
    n, vocab = ids.shape[0], basis.shape[0]
    p = torch.zeros(n, vocab, dtype=F64)
    for row in range(n):
        top = set(ids[row].tolist())
        weights = {v: math.exp(float(bias[v] + basis[v] @ tail_code[row]))
                   for v in range(vocab) if v not in top}
        total = sum(weights.values())
        for v in range(vocab):
            p[row, v] = (math.exp(float(top_lp[row, ids[row].tolist().index(v)])) if v in top
                         else math.exp(float(tail[row])) * weights[v] / total)
    return p


def dense_shape_teacher(
    top_lp: torch.Tensor, ids: torch.Tensor, tail: torch.Tensor, log_shape: torch.Tensor
) -> torch.Tensor:
    """Mode "shape" written out as a dense float64 teacher [n, V]: the top-k values, and the tail
    mass spread over the other ids in proportion to s (summed directly over those ids)."""
    n, vocab = ids.shape[0], log_shape.shape[0]
    in_top = torch.zeros(n, vocab, dtype=torch.bool).scatter(-1, ids, True)
    shape = log_shape.to(F64).exp().expand(n, vocab)
    mass_out = torch.where(in_top, 0.0, shape).sum(-1, keepdim=True)
    top = torch.zeros(n, vocab, dtype=F64).scatter(-1, ids, top_lp.to(F64).exp())
    return torch.where(in_top, top, tail.to(F64).exp()[:, None] * shape / mass_out)


def dense_kl(p: torch.Tensor, log_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable FKL and RKL over the full vocabulary of a strictly positive teacher."""
    log_p = p.log()
    return (p * (log_p - log_q)).sum(-1), (log_q.exp() * (log_q - log_p)).sum(-1)


def exact_kl(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive FKL and RKL over the full vocabulary with explicit float64 sums, 0 log 0 = 0."""
    fkl = torch.zeros(p.shape[0], dtype=F64)
    rkl = torch.zeros(p.shape[0], dtype=F64)
    for n in range(p.shape[0]):
        for i in range(p.shape[1]):
            pi, qi = p[n, i].item(), q[n, i].item()
            if pi > 0:
                fkl[n] += pi * math.log(pi / qi)
            if qi > 0:
                rkl[n] += qi * math.log(qi / pi) if pi > 0 else math.inf
    return fkl, rkl


def naive_mode_kl(
    p: torch.Tensor,
    q: torch.Tensor,
    ids: torch.Tensor,
    tail: torch.Tensor,
    mode: str,
    log_tail_shape: torch.Tensor | None = None,
    **tail_code: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each tail mode written out as explicit distributions, then the exact KL of those."""
    n, vocab = q.shape
    if mode == "lowrank":
        return exact_kl(dense_lowrank_teacher(p.gather(-1, ids).log(), ids, tail, **tail_code), q)
    if mode == "shape":
        return exact_kl(dense_shape_teacher(p.gather(-1, ids).log(), ids, tail, log_tail_shape), q)
    top_p = p.gather(-1, ids)
    in_top = torch.zeros(n, vocab, dtype=torch.bool).scatter(-1, ids, True)
    if mode == "bucket":
        teacher = torch.cat([top_p, tail.exp()[:, None]], -1)
        top_q = q.gather(-1, ids)
        student = torch.cat([top_q, (q * ~in_top).sum(-1, keepdim=True)], -1)
        return exact_kl(teacher, student)
    if mode == "uniform":
        per_token = tail.exp()[:, None] / (vocab - ids.shape[1])
        teacher = torch.where(in_top, p, per_token)
        return exact_kl(teacher, q)
    teacher = torch.where(in_top, p, 0.0)
    teacher = teacher / teacher.sum(-1, keepdim=True)
    fkl, _ = exact_kl(teacher, q)
    student = torch.where(in_top, q, 0.0)
    _, rkl = exact_kl(teacher, student / student.sum(-1, keepdim=True))
    return fkl, rkl


@pytest.mark.parametrize("mode", TAIL_MODES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocabulary_topk_is_exact(mode: str, temperature: float) -> None:
    n, vocab = 6, 11
    p, ids, top_lp, tail = make_teacher(n, vocab, vocab, seed=0)
    assert torch.isneginf(tail).all()
    logits = student_logits(n, vocab, seed=0)
    div = topk_divergences(logits, ids, top_lp, tail, None, temperature=temperature, mode=mode,
                           **tail_kwargs(mode, vocab, rows=n))
    fkl, rkl = exact_kl(p, (logits / temperature).softmax(-1))
    torch.testing.assert_close(div.fkl, fkl)
    torch.testing.assert_close(div.rkl, rkl)
    assert torch.isneginf(div.student_tail_logmass).all()


@pytest.mark.parametrize("mode", TAIL_MODES)
def test_each_mode_matches_its_naive_definition(mode: str) -> None:
    n, vocab, k = 5, 13, 4
    p, ids, top_lp, tail = make_teacher(n, vocab, k, seed=1)
    logits = student_logits(n, vocab, seed=1)
    extra = tail_kwargs(mode, vocab, seed=1, rows=n)
    div = topk_divergences(logits, ids, top_lp, tail, None, temperature=1.5, mode=mode, **extra)
    q = (logits / 1.5).softmax(-1)
    fkl, rkl = naive_mode_kl(p, q, ids, tail, mode, **extra)
    torch.testing.assert_close(div.fkl, fkl)
    torch.testing.assert_close(div.rkl, rkl)
    outside = q.scatter(-1, ids, 0.0).sum(-1).log()
    torch.testing.assert_close(div.student_tail_logmass, outside)


@pytest.mark.parametrize("seed", range(5))
def test_bucket_is_a_lower_bound(seed: int) -> None:
    n, vocab = 16, 40
    for k in (1, 5, 20):
        p, ids, top_lp, tail = make_teacher(n, vocab, k, seed=seed, scale=4.0)
        logits = student_logits(n, vocab, seed=seed)
        div = topk_divergences(logits, ids, top_lp, tail, None, mode="bucket")
        fkl, rkl = exact_kl(p, logits.softmax(-1))
        assert (div.fkl <= fkl + 1e-12).all()
        assert (div.rkl <= rkl + 1e-12).all()


def test_hand_worked_example() -> None:
    # V = 4. Teacher p = (1/2, 1/4, 1/8, 1/8), cached top-2 = ids (0, 1), tail mass 1/4.
    # Student q = (1/2, 1/8, 1/4, 1/8): mass 3/8 outside the teacher's top-2.
    # bucket: p = (1/2, 1/4, 1/4), q = (1/2, 1/8, 3/8)
    #   FKL = 1/4 ln(1/4 / 1/8) + 1/4 ln(1/4 / 3/8) = 1/4 ln 2 + 1/4 ln(2/3) = 1/4 ln(4/3)
    #   RKL = 1/8 ln(1/8 / 1/4) + 3/8 ln(3/8 / 1/4) = -1/8 ln 2 + 3/8 ln(3/2)
    # uniform: the tail 1/4 over ids 2 and 3 gives 1/8 each, which is p itself, so exact:
    #   FKL = 1/4 ln(1/4 / 1/8) + 1/8 ln(1/8 / 1/4) + 0 = 1/8 ln 2
    #   RKL = 1/8 ln(1/8 / 1/4) + 1/4 ln(1/4 / 1/8) + 0 = 1/8 ln 2
    # renormalize: p' = (2/3, 1/3) against the full q for FKL:
    #   FKL = 2/3 ln(2/3 / 1/2) + 1/3 ln(1/3 / 1/8) = 2/3 ln(4/3) + 1/3 ln(8/3)
    #   q restricted to ids (0, 1) and renormalised: q' = (4/5, 1/5)
    #   RKL = 4/5 ln(4/5 / 2/3) + 1/5 ln(1/5 / 1/3) = 4/5 ln(6/5) + 1/5 ln(3/5)
    expected = {
        "bucket": (0.25 * math.log(4 / 3), -0.125 * math.log(2) + 0.375 * math.log(1.5)),
        "uniform": (0.125 * math.log(2), 0.125 * math.log(2)),
        "renormalize": (
            2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(8 / 3),
            0.8 * math.log(1.2) + 0.2 * math.log(0.6),
        ),
    }
    logits = torch.tensor([[0.5, 0.125, 0.25, 0.125]], dtype=F64).log() + 7.0  # shift-invariant
    ids = torch.tensor([[0, 1]])
    top_lp = torch.tensor([[0.5, 0.25]], dtype=F64).log()
    tail = torch.tensor([0.25], dtype=F64).log()
    for mode, (fkl, rkl) in expected.items():
        div = topk_divergences(logits, ids, top_lp, tail, None, mode=mode)
        assert div.fkl.item() == pytest.approx(fkl, rel=1e-12), mode
        assert div.rkl.item() == pytest.approx(rkl, rel=1e-12), mode
        assert div.student_tail_logmass.item() == pytest.approx(math.log(0.375), rel=1e-12)
    # Sanity on the hand numbers themselves: bucket below exact, exact equals uniform here.
    assert expected["bucket"][0] < expected["uniform"][0]
    assert expected["bucket"][1] < expected["uniform"][1]


@pytest.mark.parametrize("mode", TAIL_MODES)
@pytest.mark.parametrize("k", [3, 7])
def test_gradcheck_topk_divergences(mode: str, k: int) -> None:
    n, vocab = 3, 7
    _, ids, top_lp, tail = make_teacher(n, vocab, k, seed=2)
    logits = student_logits(n, vocab, seed=2).requires_grad_()
    mask = torch.tensor([True, False, True])

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        div = topk_divergences(x, ids, top_lp, tail, mask, temperature=1.7, mode=mode,
                               **tail_kwargs(mode, vocab, seed=2, rows=n))
        return div.fkl, div.rkl

    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("mode", TAIL_MODES)
def test_masked_positions_contribute_nothing(mode: str) -> None:
    n, vocab, k = 6, 12, 4
    _, ids, top_lp, tail = make_teacher(n, vocab, k, seed=3)
    mask = torch.tensor([True, False, True, True, False, True])
    # Padding rows carry garbage the loss must never read.
    ids[~mask] = -100
    top_lp[~mask] = math.nan
    tail[~mask] = math.nan
    logits = student_logits(n, vocab, seed=3).requires_grad_()
    div = topk_divergences(logits, ids, top_lp, tail, mask, mode=mode,
                           **tail_kwargs(mode, vocab, seed=3, rows=n))
    assert (div.fkl[~mask] == 0).all() and (div.rkl[~mask] == 0).all()
    assert (div.fkl[mask] > 0).all() and (div.rkl[mask] > 0).all()
    (div.fkl + div.rkl).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[~mask] == 0).all()
    assert (logits.grad[mask].abs() > 0).any()


def test_leading_batch_dims() -> None:
    b, s, vocab, k = 2, 3, 9, 4
    _, ids, top_lp, tail = make_teacher(b * s, vocab, k, seed=4)
    logits = student_logits(b * s, vocab, seed=4)
    mask = torch.rand(b * s, generator=torch.Generator().manual_seed(4)) > 0.3
    flat = topk_divergences(logits, ids, top_lp, tail, mask)
    batched = topk_divergences(
        logits.view(b, s, vocab),
        ids.view(b, s, k),
        top_lp.view(b, s, k),
        tail.view(b, s),
        mask.view(b, s),
    )
    for got, want in zip(batched, flat, strict=True):
        assert got.shape == (b, s)
        torch.testing.assert_close(got.reshape(-1), want)


@pytest.mark.parametrize("mode", ["renormalize", "uniform", "shape", "lowrank"])
def test_rkl_is_nonnegative(mode: str) -> None:
    for seed in range(4):
        _, ids, top_lp, tail = make_teacher(32, 30, 6, seed=seed, scale=5.0)
        for scale in (0.01, 1.0, 8.0):
            logits = student_logits(32, 30, seed=seed, scale=scale).float()
            div = topk_divergences(logits, ids, top_lp.float(), tail.float(), None, mode=mode,
                                   **tail_kwargs(mode, 30, seed=seed, rows=32))
            assert (div.rkl >= 0).all() and (div.fkl >= 0).all()


def test_empty_teacher_tail_stays_finite() -> None:
    # k < V but the cached tail rounded to zero: RKL must stay finite for every mode.
    _, ids, top_lp, _ = make_teacher(4, 10, 3, seed=5)
    tail = torch.full((4,), -math.inf, dtype=F64)
    logits = student_logits(4, 10, seed=5).requires_grad_()
    for mode in TAIL_MODES:
        div = topk_divergences(logits, ids, top_lp, tail, None, mode=mode,
                               **tail_kwargs(mode, 10, seed=5, rows=4))
        (div.fkl + div.rkl).sum().backward()
        assert torch.isfinite(div.fkl).all() and torch.isfinite(div.rkl).all()
        assert torch.isfinite(logits.grad).all()


def test_t2_scale() -> None:
    _, ids, top_lp, tail = make_teacher(4, 10, 3, seed=6)
    logits = student_logits(4, 10, seed=6)
    plain = topk_divergences(logits, ids, top_lp, tail, None, temperature=3.0)
    scaled = topk_divergences(logits, ids, top_lp, tail, None, temperature=3.0, t2_scale=True)
    torch.testing.assert_close(scaled.fkl, 9.0 * plain.fkl)
    torch.testing.assert_close(scaled.rkl, 9.0 * plain.rkl)


def test_temper_teacher_identity_at_t1() -> None:
    _, _, top_lp, tail = make_teacher(5, 20, 4, seed=7)
    top_t, tail_t = temper_teacher(top_lp, tail, 1.0, 20)
    torch.testing.assert_close(top_t, top_lp)
    torch.testing.assert_close(tail_t, tail)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temper_teacher_with_uniform_tail_is_exact(temperature: float) -> None:
    n, vocab, k = 5, 20, 4
    gen = torch.Generator().manual_seed(8)
    # Top-k logits above 1, every tail logit equal to 0: the tail really is uniform.
    logits = torch.zeros(n, vocab, dtype=F64)
    logits[:, :k] = 1.0 + 3.0 * torch.rand(n, k, generator=gen, dtype=F64)
    ids = torch.arange(k).expand(n, k)
    p1 = logits.log_softmax(-1)
    tail1 = p1[:, k:].exp().sum(-1).log()
    top_t, tail_t = temper_teacher(p1[:, :k], tail1, temperature, vocab)
    exact = (logits / temperature).log_softmax(-1)
    torch.testing.assert_close(top_t, exact.gather(-1, ids))
    torch.testing.assert_close(tail_t, exact[:, k:].exp().sum(-1).log())
    # k = V: nothing to assume, plain renormalisation of the tempered log-probs.
    top_full, tail_full = temper_teacher(p1, torch.full((n,), -math.inf, dtype=F64), 2.0, vocab)
    torch.testing.assert_close(top_full, (logits / 2.0).log_softmax(-1))
    assert torch.isneginf(tail_full).all()


def fused_problem(
    n: int, vocab: int, hidden_size: int, k: int, *, seed: int, dtype: torch.dtype = F64
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    _, ids, top_lp, tail = make_teacher(n, vocab, k, seed=seed)
    mask = torch.rand(n, generator=gen) > 0.25
    beta = 0.3
    return {
        "hidden": torch.randn(n, hidden_size, generator=gen, dtype=F64).to(dtype),
        "weight": (torch.randn(vocab, hidden_size, generator=gen, dtype=F64) * 0.5).to(dtype),
        "bias": (torch.randn(vocab, generator=gen, dtype=F64) * 0.1).to(dtype),
        "ids": ids,
        "top_lp": top_lp.float(),
        "tail": tail.float(),
        "mask": mask,
        "fkl_coef": (1 - beta) * mask.to(F64) / mask.sum(),
        "rkl_coef": beta * mask.to(F64) / mask.sum(),
        "ce_coef": 0.5 * mask.to(F64) / mask.sum(),
        "targets": torch.where(mask, torch.randint(vocab, (n,), generator=gen), -100),
    }


def naive_loss(
    prob: dict[str, torch.Tensor],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    with_ce: bool,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full logits, then `topk_divergences`, then the weighted sum the fused path must equal."""
    logits = hidden @ weight.T if bias is None else hidden @ weight.T + bias
    div = topk_divergences(
        logits, prob["ids"], prob["top_lp"], prob["tail"], prob["mask"], **kwargs
    )
    loss = (prob["fkl_coef"] * div.fkl + prob["rkl_coef"] * div.rkl).sum()
    if with_ce:
        targets = prob["targets"].clamp_min(0)
        nll = logits.logsumexp(-1) - logits.gather(-1, targets[:, None])[:, 0]
        loss = loss + (prob["ce_coef"] * nll).sum()
    return loss, div.fkl, div.rkl


def run_fused(
    prob: dict[str, torch.Tensor],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    with_ce: bool,
    **kwargs: object,
):
    return fused_divergence_loss(
        hidden,
        weight,
        bias,
        prob["ids"],
        prob["top_lp"],
        prob["tail"],
        fkl_coef=prob["fkl_coef"],
        rkl_coef=prob["rkl_coef"],
        ce_coef=prob["ce_coef"] if with_ce else None,
        target_ids=prob["targets"] if with_ce else None,
        **kwargs,
    )


@pytest.mark.parametrize("mode", TAIL_MODES)
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
@pytest.mark.parametrize("with_ce", [False, True])
@pytest.mark.parametrize(("temperature", "k"), [(1.0, 5), (1.5, 5), (1.0, 40), (2.0, 40)])
def test_fused_equals_naive(
    mode: str, chunk_size: int, with_ce: bool, temperature: float, k: int
) -> None:
    prob = fused_problem(23, 40, 8, k, seed=9)
    kwargs = {"temperature": temperature, "mode": mode, "t2_scale": True,
              **tail_kwargs(mode, 40, seed=9, rows=23)}
    leaves = [prob[name].clone().requires_grad_() for name in ("hidden", "weight", "bias")]
    loss, fkl, rkl = naive_loss(prob, *leaves, with_ce=with_ce, **kwargs)
    loss.backward()
    want_grads = [leaf.grad for leaf in leaves]

    leaves = [prob[name].clone().requires_grad_() for name in ("hidden", "weight", "bias")]
    got, div = run_fused(prob, *leaves, with_ce=with_ce, chunk_size=chunk_size, **kwargs)
    got.backward()
    torch.testing.assert_close(got, loss)
    torch.testing.assert_close(div.fkl, fkl)
    torch.testing.assert_close(div.rkl, rkl)
    assert not div.fkl.requires_grad and not div.rkl.requires_grad
    for leaf, want in zip(leaves, want_grads, strict=True):
        torch.testing.assert_close(leaf.grad, want)
    assert (leaves[0].grad[~prob["mask"]] == 0).all()


def test_fused_frozen_weight_and_no_bias() -> None:
    prob = fused_problem(19, 30, 6, 4, seed=10)
    hidden = prob["hidden"].clone().requires_grad_()
    loss, _, _ = naive_loss(prob, hidden, prob["weight"], None, with_ce=True)
    loss.backward()
    want = hidden.grad

    hidden = prob["hidden"].clone().requires_grad_()
    weight = prob["weight"].clone()  # frozen, as a LoRA lm head
    got, _ = run_fused(prob, hidden, weight, None, with_ce=True, chunk_size=4)
    got.backward()
    torch.testing.assert_close(got, loss)
    torch.testing.assert_close(hidden.grad, want)
    assert weight.grad is None


FUSED_INPUTS = ("hidden", "weight", "bias", "fkl_coef", "rkl_coef", "ce_coef")


def fused_gradcheck(prob: dict[str, torch.Tensor], wrt: int, **kwargs: object) -> bool:
    """gradcheck of the fused loss wrt the first `wrt` of FUSED_INPUTS (the rest held fixed)."""
    targets = prob["targets"].clamp_min(0)

    def fn(*args: torch.Tensor) -> torch.Tensor:
        hidden, weight, bias, fkl_coef, rkl_coef, ce_coef = args
        loss, _ = fused_divergence_loss(
            hidden,
            weight,
            bias,
            prob["ids"],
            prob["top_lp"],
            prob["tail"],
            fkl_coef=fkl_coef,
            rkl_coef=rkl_coef,
            ce_coef=ce_coef,
            target_ids=targets,
            chunk_size=3,
            **kwargs,
        )
        return loss

    inputs = tuple(
        prob[name].clone().requires_grad_(i < wrt) for i, name in enumerate(FUSED_INPUTS)
    )
    return torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("mode", TAIL_MODES)
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_fused_gradcheck(mode: str, temperature: float) -> None:
    # Masked positions included; T = 1 shares the softmax with the CE term, T != 1 does not.
    prob = fused_problem(5, 7, 2, 3, seed=11)
    assert fused_gradcheck(prob, 3, mode=mode, temperature=temperature, t2_scale=True,
                           **tail_kwargs(mode, 7, seed=11, rows=5))


def test_fused_gradcheck_coefficients() -> None:
    # d loss / d coef is the term itself, checked where active (a position whose coefficients
    # are all zero is skipped and reports a zero term), so every coefficient is moved off zero.
    prob = fused_problem(5, 7, 2, 3, seed=11)
    for name in FUSED_INPUTS[3:]:
        prob[name] = prob[name] + 0.1
    assert fused_gradcheck(prob, len(FUSED_INPUTS), temperature=0.8)


def test_fused_low_precision_hidden() -> None:
    prob = fused_problem(21, 50, 16, 5, seed=12, dtype=torch.bfloat16)
    leaves = [prob[name].clone().requires_grad_() for name in ("hidden", "weight", "bias")]
    loss, div = run_fused(prob, *leaves, with_ce=True, chunk_size=8)
    loss.backward()
    assert loss.dtype == torch.float32 and div.fkl.dtype == torch.float32
    assert [leaf.grad.dtype for leaf in leaves] == [torch.bfloat16] * 3

    ref = [leaf.detach().float().requires_grad_() for leaf in leaves]
    want, _, _ = naive_loss(prob, *ref, with_ce=True)
    want.backward()
    torch.testing.assert_close(loss, want.float(), rtol=2e-2, atol=2e-2)
    for leaf, r in zip(leaves, ref, strict=True):
        torch.testing.assert_close(leaf.grad.float(), r.grad.float(), rtol=5e-2, atol=5e-3)


def test_fused_all_positions_inactive() -> None:
    prob = fused_problem(5, 10, 4, 3, seed=13)
    hidden = prob["hidden"].clone().requires_grad_()
    zero = torch.zeros(5, dtype=F64)
    loss, div = fused_divergence_loss(
        hidden,
        prob["weight"],
        None,
        prob["ids"],
        prob["top_lp"],
        prob["tail"],
        fkl_coef=zero,
        rkl_coef=zero,
        chunk_size=2,
    )
    loss.backward()
    assert loss.item() == 0 and (div.fkl == 0).all() and (hidden.grad == 0).all()


def test_fused_leading_batch_dims() -> None:
    b, s, vocab, hidden_size, k = 2, 5, 30, 6, 4
    prob = fused_problem(b * s, vocab, hidden_size, k, seed=14)
    flat, flat_div = run_fused(prob, prob["hidden"], prob["weight"], prob["bias"], with_ce=True,
                               chunk_size=4)
    shaped = {
        name: t.reshape(b, s, *t.shape[1:]) if t.shape[0] == b * s else t
        for name, t in prob.items()
    }
    got, div = run_fused(shaped, shaped["hidden"], prob["weight"], prob["bias"], with_ce=True,
                         chunk_size=4)
    torch.testing.assert_close(got, flat)
    assert div.fkl.shape == (b, s)
    torch.testing.assert_close(div.rkl.reshape(-1), flat_div.rkl)


def test_shape_hand_worked_example() -> None:
    # The V = 4 example of test_hand_worked_example with s = (5, 7, 1, 3): the tail 1/4 goes to
    # ids 2 and 3 as 1/16 and 3/16 (ids 0 and 1 are the top-k, their s plays no part), so
    # p = (1/2, 1/4, 1/16, 3/16) against q = (1/2, 1/8, 1/4, 1/8):
    #   FKL = 1/4 ln 2 + 1/16 ln(1/4) + 3/16 ln(3/2)
    #   RKL = 1/8 ln(1/2) + 1/4 ln 4 + 1/8 ln(2/3)
    logits = torch.tensor([[0.5, 0.125, 0.25, 0.125]], dtype=F64).log() - 3.0
    ids = torch.tensor([[0, 1]])
    top_lp = torch.tensor([[0.5, 0.25]], dtype=F64).log()
    tail = torch.tensor([0.25], dtype=F64).log()
    log_shape = torch.tensor([5.0, 7.0, 1.0, 3.0], dtype=F64).log()
    div = topk_divergences(logits, ids, top_lp, tail, None, mode="shape", log_tail_shape=log_shape)
    fkl = 0.25 * math.log(2) + math.log(0.25) / 16 + 3 / 16 * math.log(1.5)
    rkl = 0.125 * math.log(0.5) + 0.25 * math.log(4) + 0.125 * math.log(2 / 3)
    assert div.fkl.item() == pytest.approx(fkl, rel=1e-12)
    assert div.rkl.item() == pytest.approx(rkl, rel=1e-12)


def skewed_shape_problem(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A fused problem and a random tail shape under which the first active row's top-k ids hold
    all but ~1e-10 of s (its W_out would vanish in a total-minus-top-k difference)."""
    prob = fused_problem(23, 40, 8, 5, seed=seed)
    log_shape = random_log_shape(40, seed=seed) - 30.0
    row = int(prob["mask"].nonzero()[0])
    log_shape[prob["ids"][row]] = random_log_shape(5, seed=seed + 1)
    shape = log_shape.exp()
    in_top = torch.zeros(40, dtype=torch.bool)
    in_top[prob["ids"][row]] = True
    assert shape[~in_top].sum() / shape.sum() < 1e-9
    return prob, log_shape


def dense_shape_objective(
    prob: dict[str, torch.Tensor],
    log_shape: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused loss (KL terms + CE at T = 1) against the explicit dense shape teacher."""
    logits = hidden @ weight.T + bias
    p = dense_shape_teacher(prob["top_lp"], prob["ids"], prob["tail"], log_shape)
    fkl, rkl = dense_kl(p, (logits / temperature).log_softmax(-1))
    fkl = torch.where(prob["mask"], fkl, 0.0)
    rkl = torch.where(prob["mask"], rkl, 0.0)
    targets = prob["targets"].clamp_min(0)
    nll = logits.logsumexp(-1) - logits.gather(-1, targets[:, None])[:, 0]
    loss = (prob["fkl_coef"] * fkl + prob["rkl_coef"] * rkl + prob["ce_coef"] * nll).sum()
    return loss, fkl, rkl


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_shape_mode_equals_a_dense_teacher(temperature: float) -> None:
    prob, log_shape = skewed_shape_problem(seed=15)
    leaves = [prob[name].clone().requires_grad_() for name in ("hidden", "weight", "bias")]
    loss, fkl, rkl = dense_shape_objective(prob, log_shape, *leaves, temperature)
    loss.backward()
    want_grads = [leaf.grad for leaf in leaves]

    # only ratios of s matter: a shifted log shape is the same shape
    shifted = {"mode": "shape", "log_tail_shape": log_shape + 7.0, "temperature": temperature}
    leaves = [prob[name].clone().requires_grad_() for name in ("hidden", "weight", "bias")]
    got, div = run_fused(prob, *leaves, with_ce=True, chunk_size=7, **shifted)
    got.backward()
    torch.testing.assert_close(got, loss)
    torch.testing.assert_close(div.fkl, fkl)
    torch.testing.assert_close(div.rkl, rkl)
    for leaf, want in zip(leaves, want_grads, strict=True):
        torch.testing.assert_close(leaf.grad, want)

    # topk_divergences on the same logits, with padding garbage in the masked rows
    mask = prob["mask"]
    logits = (prob["hidden"] @ prob["weight"].T + prob["bias"]).requires_grad_()
    log_q = (logits / temperature).log_softmax(-1)
    p = dense_shape_teacher(prob["top_lp"], prob["ids"], prob["tail"], log_shape)
    want_fkl, want_rkl = (torch.where(mask, kl, 0.0) for kl in dense_kl(p, log_q))
    (want_fkl + 2 * want_rkl).sum().backward()
    want_grad, logits.grad = logits.grad, None
    ids, top_lp, tail = prob["ids"].clone(), prob["top_lp"].clone(), prob["tail"].clone()
    ids[~mask], top_lp[~mask], tail[~mask] = -100, math.nan, math.nan
    div = topk_divergences(logits, ids, top_lp, tail, mask, **shifted)
    (div.fkl + 2 * div.rkl).sum().backward()
    torch.testing.assert_close(div.fkl, want_fkl)
    torch.testing.assert_close(div.rkl, want_rkl)
    torch.testing.assert_close(logits.grad, want_grad)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_constant_shape_equals_uniform(temperature: float) -> None:
    prob = fused_problem(23, 40, 8, 5, seed=16)
    results = {}
    for mode, extra in (("uniform", {}),
                        ("shape", {"log_tail_shape": torch.full((40,), 3.7, dtype=F64)})):
        kwargs = {"mode": mode, "temperature": temperature, **extra}
        leaves = [prob[name].clone().requires_grad_() for name in ("hidden", "weight", "bias")]
        loss, div = run_fused(prob, *leaves, with_ce=True, chunk_size=7, **kwargs)
        loss.backward()
        logits = (prob["hidden"] @ prob["weight"].T).requires_grad_()
        plain = topk_divergences(logits, prob["ids"], prob["top_lp"], prob["tail"], prob["mask"],
                                 **kwargs)
        (plain.fkl + 2 * plain.rkl).sum().backward()
        results[mode] = [loss, *div, *(leaf.grad for leaf in leaves), *plain, logits.grad]
    for got, want in zip(results["shape"], results["uniform"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_shape_gradcheck_with_a_skewed_shape() -> None:
    prob = fused_problem(5, 7, 2, 3, seed=18)
    row = int(prob["mask"].nonzero()[0])
    log_shape = random_log_shape(7, seed=18) - 12.0
    log_shape[prob["ids"][row]] = 0.0
    assert fused_gradcheck(prob, 3, mode="shape", temperature=1.3, log_tail_shape=log_shape)


def both_losses(n: int, vocab: int, k: int, seed: int) -> tuple[Callable[..., None], ...]:
    """The fused and the plain loss on one small problem, each taking the tail settings."""
    _, ids, top_lp, tail = make_teacher(n, vocab, k, seed=seed)
    logits = student_logits(n, vocab, seed=seed)
    prob = fused_problem(n, vocab, 3, k, seed=seed)

    def fused(**kwargs: object) -> None:
        run_fused(prob, prob["hidden"], prob["weight"], None, with_ce=False, chunk_size=3,
                  **kwargs)

    def plain(**kwargs: object) -> None:
        topk_divergences(logits, ids, top_lp, tail, None, **kwargs)

    return fused, plain


def test_tail_shape_is_required_by_shape_mode_and_refused_by_the_others() -> None:
    shape = random_log_shape(10, seed=17)
    for call in both_losses(4, 10, 3, seed=17):
        with pytest.raises(ValueError, match="'shape' needs log_tail_shape"):
            call(mode="shape")
        for mode in ("bucket", "renormalize", "uniform"):
            with pytest.raises(ValueError, match="applies to tail mode 'shape' only"):
                call(mode=mode, log_tail_shape=shape)
        with pytest.raises(ValueError, match=r"expected \(10,\)"):
            call(mode="shape", log_tail_shape=shape[:-1])
        with pytest.raises(ValueError, match="must be finite"):
            call(mode="shape", log_tail_shape=shape.index_fill(0, torch.tensor([2]), -math.inf))


class LossBatch(NamedTuple):
    """A small float64 batch for `distillation_loss`: the student's hidden states and lm head,
    a random teacher of every position and the loss mask; `rows` are the teacher rows of the
    loss positions only, as `collate` packs them."""

    hidden: torch.Tensor
    head: torch.nn.Linear
    teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # ids, top-k log-probs, tail
    loss_mask: torch.Tensor
    labels: torch.Tensor
    beta: torch.Tensor

    @property
    def rows(self) -> tuple[torch.Tensor, ...]:
        at_loss = self.loss_mask.reshape(-1)
        return tuple(t[at_loss] for t in self.teacher)

    def loss(self, teacher: CachedTeacher, mode: str) -> torch.Tensor:
        settings = LossSettings(distill=True, ce_weight=0.0, tail_mode=mode, chunk_size=3)
        return distillation_loss(self.hidden, self.head, teacher, self.loss_mask, self.labels,
                                 self.beta, settings).loss

    def dense_objective(self, p: torch.Tensor) -> torch.Tensor:
        """The AKD objective against a dense teacher p [B * S, V], per-sample normalised."""
        batch, seq, _ = self.hidden.shape
        fkl, rkl = dense_kl(p.view(batch, seq, -1), self.head(self.hidden).log_softmax(-1))
        lengths = self.loss_mask.sum(1, keepdim=True).clamp(min=1)
        mixed = ((1 - self.beta) * fkl + self.beta * rkl) * self.loss_mask / lengths
        return (mixed.sum() / batch).detach()


def loss_batch(seed: int, vocab: int = 30, k: int = 4) -> LossBatch:
    gen = torch.Generator().manual_seed(seed)
    batch, seq, width = 2, 5, 6
    hidden = torch.randn(batch, seq, width, generator=gen, dtype=F64)
    head = torch.nn.Linear(width, vocab, dtype=F64)
    _, ids, top_lp, tail = make_teacher(batch * seq, vocab, k, seed=seed)
    loss_mask = torch.rand(batch, seq, generator=gen) > 0.3
    labels = torch.randint(vocab, (batch, seq), generator=gen)
    return LossBatch(hidden, head, (ids, top_lp, tail), loss_mask, labels,
                     torch.tensor(0.4, dtype=F64))


def test_distillation_loss_passes_the_tail_shape_in_shape_mode_only() -> None:
    b = loss_batch(seed=19)
    vocab = b.head.out_features

    def run(mode: str, log_tail_shape: torch.Tensor | None) -> torch.Tensor:
        return b.loss(CachedTeacher(*b.rows, log_tail_shape), mode)

    shape = random_log_shape(vocab, seed=19)
    uniform = run("uniform", None)
    torch.testing.assert_close(run("uniform", shape), uniform)  # not read by another mode
    torch.testing.assert_close(run("shape", torch.zeros(vocab, dtype=F64)), uniform)
    # the random shape reaches the loss: it equals the dense teacher's objective
    ids, top_lp, tail = b.teacher
    want = b.dense_objective(dense_shape_teacher(top_lp, ids, tail, shape))
    torch.testing.assert_close(run("shape", shape), want)
    with pytest.raises(ValueError, match="'shape' needs log_tail_shape"):
        run("shape", None)


@pytest.mark.parametrize("experiment", [SFT(), SeqKD()], ids=["sft", "seqkd"])
@pytest.mark.parametrize("mode", ["shape", "lowrank"])
def test_cross_entropy_methods_ignore_a_modelled_profile_tail_mode(
    experiment: SFT | SeqKD, mode: str
) -> None:
    """sft and seqkd get no tail model (`run.cached_tail_model`), so the profile's 'shape' or
    'lowrank' must not reach their loss: it is the cross-entropy, FKL/RKL logged as 'bucket'."""
    b = loss_batch(seed=23)
    teacher = CachedTeacher(*b.rows)
    settings = LossSettings.of(experiment, TrainConfig(tail_mode=mode, chunk_size=3))
    out = distillation_loss(b.hidden, b.head, teacher, b.loss_mask, b.labels, b.beta, settings)
    out.loss.backward()
    bucket = LossSettings.of(experiment, TrainConfig(chunk_size=3))
    want = distillation_loss(b.hidden, b.head, teacher, b.loss_mask, b.labels, b.beta, bucket)
    assert settings.tail_mode == "bucket" and not settings.distill
    torch.testing.assert_close((out.loss, out.fkl, out.rkl), (want.loss, want.fkl, want.rkl))
    assert b.head.weight.grad.abs().sum() > 0


def test_tail_code_is_required_by_lowrank_mode_and_refused_by_the_others() -> None:
    code = random_tail_code(4, 10, seed=20)
    basis, bias = code["tail_code_basis"]
    for call in both_losses(4, 10, 3, seed=20):
        with pytest.raises(ValueError, match="'lowrank' needs tail_code"):
            call(mode="lowrank")
        with pytest.raises(ValueError, match="'lowrank' needs tail_code"):
            call(mode="lowrank", tail_code=code["tail_code"])
        for mode in ("bucket", "renormalize", "uniform", "shape"):
            with pytest.raises(ValueError, match="applies to tail mode 'lowrank' only"):
                call(mode=mode, **code, **({"log_tail_shape": bias} if mode == "shape" else {}))
        with pytest.raises(ValueError, match=r"expected \(10, 3\) and \(10,\)"):
            call(mode="lowrank", tail_code=code["tail_code"], tail_code_basis=(basis[:-1], bias))


def test_distillation_loss_passes_the_tail_code_in_lowrank_mode_only() -> None:
    """Through `distillation_loss`, the loss positions' rows and their codes line up: the loss
    is the dense low-rank teacher's objective, and a code given to another mode is not read."""
    b = loss_batch(seed=21)
    code = random_tail_code(len(b.loss_mask.reshape(-1)), b.head.out_features, seed=21)
    at_loss = b.loss_mask.reshape(-1)

    def run(mode: str) -> torch.Tensor:
        return b.loss(CachedTeacher(*b.rows, None, code["tail_code"][at_loss],
                                    code["tail_code_basis"]), mode)

    ids, top_lp, tail = b.teacher
    want = b.dense_objective(dense_lowrank_teacher(top_lp, ids, tail, **code))
    torch.testing.assert_close(run("lowrank"), want)
    torch.testing.assert_close(run("uniform"), b.loss(CachedTeacher(*b.rows), "uniform"))


@pytest.mark.parametrize("mode", ["bucket", "uniform", "shape"])
def test_a_student_tail_below_float32_range_keeps_its_log(mode: str) -> None:
    """float32 logits whose tail lies 200 nat below the top-k: exp underflows to 0 there, yet
    the student's tail log-mass and the divergences match a float64 computation."""
    n, vocab, k = 6, 40, 4
    _, ids, top_lp, tail = make_teacher(n, vocab, k, seed=22)
    gen = torch.Generator().manual_seed(22)
    logits = torch.randn(n, vocab, generator=gen, dtype=F64) - 200.0
    logits.scatter_(-1, ids, torch.randn(n, k, generator=gen, dtype=F64))
    logits[0] += 200.0  # one ordinary row beside the extreme ones
    extra = tail_kwargs(mode, vocab, seed=22)
    want = topk_divergences(logits, ids, top_lp, tail, None, mode=mode, **extra)
    got = topk_divergences(logits.float(), ids, top_lp.float(), tail.float(), None, mode=mode,
                           **{name: t.float() for name, t in extra.items()})
    assert (logits[1:].float().scatter(-1, ids[1:], -math.inf).exp() == 0).all()
    # the tail's log-mass by hand: logsumexp over the ids outside the top-k, in float64
    by_hand = logits.scatter(-1, ids, -math.inf).logsumexp(-1) - logits.logsumexp(-1)
    assert torch.isfinite(got.student_tail_logmass).all() and (by_hand[1:] < -150).all()
    torch.testing.assert_close(want.student_tail_logmass, by_hand, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.student_tail_logmass.double(), by_hand, rtol=1e-5, atol=0)
    torch.testing.assert_close(got.fkl.double(), want.fkl, rtol=1e-4, atol=1e-4)
