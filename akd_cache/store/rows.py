"""What the writer takes in: tokenised samples, and the teacher's rows for each of them.

For a sample of length L with prompt length P there are L - P rows; row r describes position
P - 1 + r, the one that predicts token P + r (a response token, or the final EOS). The teacher
backends produce these rows; the store defines them, so that it depends on no backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from akd_cache.store.format import TailCode


@dataclass(frozen=True)
class TokenizedSample:
    sample_id: str
    input_ids: list[int]
    prompt_len: int

    @property
    def n_loss_rows(self) -> int:
        return len(self.input_ids) - self.prompt_len


@dataclass(frozen=True)
class TeacherRows:
    topk_ids: np.ndarray  # [n, k] int64, descending probability
    topk_logprobs: np.ndarray  # [n, k] float32, normalised over the full vocabulary
    tail_logmass: np.ndarray  # [n] float32, log(1 - sum of the top-k probabilities)
    target_logprob: np.ndarray  # [n] float32, log-probability of the actual next token
    tail_code: np.ndarray | None = None  # [n, r] `format.TailCode.encode`d hidden states

    def __len__(self) -> int:
        return len(self.tail_logmass)


class TeacherBackend(Protocol):
    """Scores token sequences; the batch order in and out is the same."""

    def score(self, samples: Sequence[TokenizedSample]) -> list[TeacherRows]: ...


@dataclass(frozen=True)
class Calibration:
    """What a new cache takes from its calibration samples, all from one teacher pass."""

    rows: list[TeacherRows]  # the samples' rows: their top-k ids order the vocabulary
    mean_tail: np.ndarray | None = None  # [V] float64, the mean of each row's normalised tail
    tail_code: TailCode | None = None


@runtime_checkable
class TailModelBackend(Protocol):
    """A backend that sees the whole distribution and the final hidden states, so it can model
    the mass outside the top-k: measure a cache's tail shape, and fit and apply its tail code."""

    def calibrate(self, samples: Sequence[TokenizedSample], tail_shape: bool,
                  tail_rank: int) -> Calibration:
        """`score(samples)`, with what the settings ask for: over the samples' loss rows the
        mean of each row's distribution outside its top-k, normalised to 1
        (`store.format.log_tail_shape` turns it into the stored shape), and the r-dimensional
        code whose rebuilt tails lose the least KL (`store.format.TailCode`; r = `tail_rank`, 0:
        none)."""
        ...

    def use_tail_code(self, code: TailCode | None) -> None:
        """From now on, `score` returns each row's `tail_code` too (None: no longer)."""
        ...


def tail_from_topk(topk_logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum exp(lp)) in float64, via log(-expm1(logsumexp)) so a tiny tail keeps digits.

    Used where only the top-k log-probs are known (vLLM). A top-k that already holds all the mass
    (to rounding) gives -inf: an empty tail.
    """
    lp = topk_logprobs.astype(np.float64)
    peak = lp.max(axis=-1, keepdims=True)
    log_topk_mass = np.squeeze(peak, -1) + np.log(np.exp(lp - peak).sum(axis=-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.log(-np.expm1(np.minimum(log_topk_mass, 0.0)))
    return tail.astype(np.float32)
