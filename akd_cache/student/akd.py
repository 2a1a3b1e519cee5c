"""The adaptive mixing weight beta of AKD (docs/method.md §4, the paper's eq. 9 to 17).

AKD(theta, beta) = mean_b [beta * RKL_b + (1 - beta) * FKL_b], with RKL_b and FKL_b already
normalised by the sample's number of loss positions. The student descends AKD; beta has its own
AdamW (lr 0.01, no weight decay: decay would pull beta to 0) and descends
`L_beta = sign * AKD + Reg(beta)`, then is clamped to [0, 1]:

- `m1`: sign +1, beta learns by plain descent of AKD;
- `m2`: sign -1, gradient ascent on AKD (beta grows while RKL > FKL);
- `m3` (the full method): m2 plus a reset of beta, and of its optimizer, at every epoch start;
- `fixed`: beta never moves (0 is KD, 1 is RKD).

The regulariser is kept in m1 too: the variants differ only in the sign and the reset.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from akd_cache.config import BetaVariant, ResetMode

BETA_LR = 0.01
REG_LAMBDA = 0.5
REG_EPS = 1e-4
RESET_CHOICES = (0.1, 0.6)


def regulariser(beta: torch.Tensor, lam: float = REG_LAMBDA, eps: float = REG_EPS) -> torch.Tensor:
    """Largest at beta in {0, 0.5, 1} (lam * ln(1 / eps), 4.6 at the defaults; infinite there
    without eps), smallest at 0.25 and 0.75: keeps beta off both extremes and off the midpoint."""
    u = 2 * (beta - 0.5).abs()
    return lam * (-torch.log(eps + u) - torch.log(eps + 1 - u))


@dataclass
class BetaState:
    beta: float
    epoch: int
    steps: int
    optimizer: dict | None
    rng: tuple


class BetaController:
    def __init__(
        self,
        variant: BetaVariant = "m3",
        beta_init: float = 0.1,
        reset: ResetMode = "choice",
        seed: int = 0,
        lr: float = BETA_LR,
    ) -> None:
        if not 0.0 <= beta_init <= 1.0:
            raise ValueError(f"beta_init={beta_init} is outside [0, 1]")
        self.variant = variant
        self.reset_mode = reset
        self.lr = lr
        self.rng = random.Random(seed)
        self.sign = 1.0 if variant == "m1" else -1.0
        self.epoch = -1
        self.steps = 0
        self._set(beta_init)

    def _set(self, value: float) -> None:
        self.param = torch.nn.Parameter(torch.tensor(float(value), dtype=torch.float64))
        self.optimizer = torch.optim.AdamW([self.param], lr=self.lr, weight_decay=0.0)

    @property
    def beta(self) -> float:
        return float(self.param.detach())

    def start_epoch(self, epoch: int) -> None:
        """m3 resets beta and its optimizer at every epoch start after the first."""
        if epoch != self.epoch and self.variant == "m3" and self.epoch >= 0:
            if self.reset_mode == "choice":
                self._set(self.rng.choice(RESET_CHOICES))
            else:
                self._set(self.rng.uniform(*RESET_CHOICES))
        self.epoch = epoch

    def beta_loss(self, fkl_mean: torch.Tensor, rkl_mean: torch.Tensor) -> torch.Tensor:
        """L_beta for one batch, given the batch means of the per-sample normalised FKL/RKL."""
        akd = self.param * rkl_mean.double() + (1 - self.param) * fkl_mean.double()
        return self.sign * akd + regulariser(self.param)

    def step(self, fkl_mean: torch.Tensor, rkl_mean: torch.Tensor) -> float:
        """One update of beta from this batch's (detached) divergences; returns the new beta."""
        self.steps += 1
        if self.variant == "fixed":
            return self.beta
        self.optimizer.zero_grad()
        self.beta_loss(fkl_mean.detach(), rkl_mean.detach()).backward()
        self.optimizer.step()
        with torch.no_grad():
            self.param.clamp_(0.0, 1.0)
        return self.beta

    def state(self) -> BetaState:
        return BetaState(
            self.beta, self.epoch, self.steps, self.optimizer.state_dict(), self.rng.getstate()
        )

    def load(self, state: BetaState) -> None:
        self._set(state.beta)
        if state.optimizer is not None:
            self.optimizer.load_state_dict(state.optimizer)
        self.epoch, self.steps = state.epoch, state.steps
        self.rng.setstate(state.rng)
