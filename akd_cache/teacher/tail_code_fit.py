"""Fitting the tail code (`format.TailCode`) to a teacher's lm head on the calibration rows.

The code rebuilds a row's tail logits as W h_hat, with h_hat = mean + sigma (c + A B^T x) a rank-r
approximation of its final hidden state h (x = (h - mean) / sigma, so A, B and c are
dimensionless). Stage 2 reads the tail through a softmax, so what counts is the KL of each row's
tail, not the logits' squared error, which is dominated by ids that never carry mass:

1. Principal directions of the logits weighted towards what that KL sees: rows by the square
   root of their tail mass, ids by the square root of their mean tail probability (with a floor
   so that every id keeps some weight). Only [H, H] matrices are decomposed.
2. Adam on the tails' cross-entropy itself, from there, kept only if it lowers the calibration
   rows' KL.

On SmolLM2 at k = 64 this takes the held-out KL from the full teacher at r = 48 from 0.0238
(unweighted principal directions) to 0.0206 after step 1 and 0.0164 after step 2
(`docs/benchmarks.md`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from akd_cache.store import format as fmt

FIT_STEPS = 100
FIT_BATCH_ROWS = 1024
FIT_LR = 0.02  # Adam's step, as a fraction of the RMS entry of the initial factors
FIT_SEED = 0
# every id keeps this fraction of the mean id weight, so that no logit goes unfitted
ID_WEIGHT_FLOOR = 1e-3
# G's eigenvalues are floored at this fraction of the largest before the square root: a
# direction the lm head cannot see moves no logit, and must not blow up the inverse root
GRAM_EIGEN_FLOOR = 1e-10


@dataclass(frozen=True)
class _Factors:
    """h_hat = mean + sigma (c + (x @ b) @ a.T), x = (h - mean) / sigma."""

    mean: torch.Tensor  # [H]
    sigma: float
    a: torch.Tensor  # [H, r]
    b: torch.Tensor  # [H, r]
    c: torch.Tensor  # [H]

    def rebuilt_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        x = (hidden - self.mean) / self.sigma
        return self.mean + self.sigma * (self.c + (x @ self.b) @ self.a.T)

    def to(self, like: torch.Tensor) -> _Factors:
        return _Factors(self.mean.to(like), self.sigma, self.a.to(like), self.b.to(like),
                        self.c.to(like))


def _tail(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's probabilities outside each row's top-k (0 on the top-k), and the top-k ids."""
    log_p = logits.log_softmax(-1)
    top = log_p.topk(k, dim=-1).indices
    return log_p.exp_().scatter_(-1, top, 0.0), top


def _tail_cross_entropy(tail_p: torch.Tensor, top: torch.Tensor, logits: torch.Tensor
                        ) -> torch.Tensor:
    """sum over rows of -sum_j p_j log softmax_{j not in top-k}(logits): the tails' KL, up to
    the teacher's own tail entropy, which no fit changes."""
    log_q = logits.scatter(-1, top, float("-inf")).log_softmax(-1)
    return -(tail_p * torch.where(tail_p > 0, log_q, 0.0)).sum()


class _LmHead:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, k: int) -> None:
        self.weight, self.bias, self.k = weight, bias, k

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = hidden @ self.weight.T
        return out if self.bias is None else out + self.bias

    def batches(self, n: int) -> list[slice]:
        return [slice(s, s + FIT_BATCH_ROWS) for s in range(0, n, FIT_BATCH_ROWS)]

    @torch.no_grad()
    def tail_masses(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's tail mass [n], and each id's mean tail probability [V]."""
        rows, ids = [], torch.zeros(len(self.weight), dtype=torch.float64, device=hidden.device)
        for part in self.batches(len(hidden)):
            tail_p, _ = _tail(self.logits(hidden[part]), self.k)
            rows.append(tail_p.sum(-1).double())
            ids += tail_p.sum(0).double()
        return torch.cat(rows), ids / len(hidden)

    @torch.no_grad()
    def cross_entropies(self, hidden: torch.Tensor, candidates: list[_Factors]) -> list[float]:
        """Each candidate's tails' cross-entropy over all the rows, the teacher's tails computed
        once per batch for all of them."""
        on_rows = [factors.to(hidden) for factors in candidates]
        totals = [0.0] * len(candidates)
        for part in self.batches(len(hidden)):
            tail_p, top = _tail(self.logits(hidden[part]), self.k)
            for i, factors in enumerate(on_rows):
                rebuilt = self.logits(factors.rebuilt_hidden(hidden[part]))
                totals[i] += _tail_cross_entropy(tail_p, top, rebuilt).item()
        return totals


def _weighted_principal(hidden: torch.Tensor, weight: torch.Tensor, row_mass: torch.Tensor,
                        id_mass: torch.Tensor, rank: int) -> _Factors:
    """Step 1, in float64: the top principal directions of diag(row_w)^(1/2) (W (h - mean))
    diag(id_w)^(1/2), found as those of diag(row_w)^(1/2) (h - mean) G^(1/2) with
    G = W^T diag(id_w) W."""
    h = hidden.double().cpu()
    w = weight.double().cpu()
    row_w = row_mass.cpu().sqrt()
    id_w = id_mass.cpu().sqrt()
    id_w += ID_WEIGHT_FLOOR * id_w.mean()
    mean = (row_w[:, None] * h).sum(0) / row_w.sum()
    centred = h - mean
    sigma = centred.pow(2).mean().sqrt().item()
    evals, evecs = torch.linalg.eigh(w.T @ (id_w[:, None] * w))
    evals = evals.clamp_min(evals.max() * GRAM_EIGEN_FLOOR)
    root = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    inv_root = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    _, _, vt = torch.linalg.svd(row_w.sqrt()[:, None] * centred @ root, full_matrices=False)
    encoder, decoder = root @ vt[:rank].T, inv_root @ vt[:rank].T  # h_hat - mean = D E^T (h - mean)
    balance = (encoder.norm(dim=0) / decoder.norm(dim=0)).sqrt()  # equal column norms in a and b
    return _Factors(mean, sigma, decoder * balance, encoder / balance,
                    torch.zeros_like(mean))


def _refine(hidden: torch.Tensor, head: _LmHead, start: _Factors) -> _Factors:
    """Step 2: Adam on the tails' cross-entropy over random batches of the rows."""
    params = [t.float().to(hidden.device).clone().requires_grad_()
              for t in (start.a, start.b, start.c)]
    fit = _Factors(start.mean.float().to(hidden.device), start.sigma, *params)
    scale = torch.cat([start.a.flatten(), start.b.flatten()]).pow(2).mean().sqrt().item()
    optimizer = torch.optim.Adam(params, lr=FIT_LR * scale)
    generator = torch.Generator().manual_seed(FIT_SEED)
    for _ in tqdm(range(FIT_STEPS), desc="tail code fit", unit="step"):
        batch = hidden[torch.randperm(len(hidden), generator=generator)[:FIT_BATCH_ROWS]
                       .to(hidden.device)]
        with torch.no_grad():
            tail_p, top = _tail(head.logits(batch), head.k)
        loss = _tail_cross_entropy(tail_p, top, head.logits(fit.rebuilt_hidden(batch)))
        optimizer.zero_grad()
        (loss / len(batch)).backward()
        optimizer.step()
    return _Factors(start.mean, start.sigma, *(t.detach().double().cpu() for t in params))


def fit_tail_code(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int,
                  rank: int) -> fmt.TailCode:
    """The tail code of rank `rank` for the lm head logits = hidden @ weight.T + bias (at the
    cache's temperature), fitted on the calibration rows' final hidden states [n, H]."""
    head = _LmHead(weight.float(), None if bias is None else bias.float(), k)
    hidden = hidden.float()
    row_mass, id_mass = head.tail_masses(hidden)
    factors = _weighted_principal(hidden, weight, row_mass, id_mass, rank)
    if rank < hidden.shape[1]:  # at full rank the principal code is already exact
        refined = _refine(hidden, head, factors)
        principal_loss, refined_loss = head.cross_entropies(hidden, [factors, refined])
        if refined_loss < principal_loss:
            factors = refined
    return _as_tail_code(factors, weight.double().cpu(),
                         None if bias is None else bias.double().cpu())


def _as_tail_code(factors: _Factors, weight: torch.Tensor, bias: torch.Tensor | None
                  ) -> fmt.TailCode:
    """z = (h - mean) @ encoder and tail logits bias + z @ basis.T, with the basis made
    orthonormal (z taking up the factor) so that `format.tail_code_step` holds."""
    encoder = factors.b / factors.sigma
    basis, triangle = torch.linalg.qr(weight @ (factors.sigma * factors.a))
    logit_bias = weight @ (factors.mean + factors.sigma * factors.c)
    if bias is not None:
        logit_bias += bias
    return fmt.TailCode(
        encoder=(encoder @ triangle.T).float().numpy(), mean=factors.mean.float().numpy(),
        basis=basis.float().numpy(), bias=logit_bias.float().numpy(),
        step=fmt.tail_code_step(len(weight), factors.a.shape[1]),
    )
