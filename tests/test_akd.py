"""The AKD beta update, worked by hand against docs/method.md §4 (the paper's eq. 16 and 17)."""

from __future__ import annotations

import math

import pytest
import torch

from akd_cache.student.akd import REG_EPS, REG_LAMBDA, BetaController, regulariser


def reg_grad_by_hand(beta: float) -> float:
    """d/dbeta of lam * (-log(eps + u) - log(eps + 1 - u)), u = 2|beta - 0.5|."""
    u = 2 * abs(beta - 0.5)
    du = 2 * math.copysign(1.0, beta - 0.5)
    return REG_LAMBDA * (-1 / (REG_EPS + u) + 1 / (REG_EPS + 1 - u)) * du


def test_regulariser_value_and_gradient():
    for beta in (0.1, 0.25, 0.4, 0.6, 0.75, 0.9):
        b = torch.tensor(beta, dtype=torch.float64, requires_grad=True)
        value = regulariser(b)
        value.backward()
        u = 2 * abs(beta - 0.5)
        expected = REG_LAMBDA * (-math.log(REG_EPS + u) - math.log(REG_EPS + 1 - u))
        assert value.item() == pytest.approx(expected, rel=1e-12)
        assert b.grad.item() == pytest.approx(reg_grad_by_hand(beta), rel=1e-9)
    # minima at 0.25 and 0.75, blowing up at 0, 0.5 and 1
    grid = torch.linspace(0.01, 0.49, 481, dtype=torch.float64)
    assert grid[regulariser(grid).argmin()].item() == pytest.approx(0.25, abs=1e-3)
    assert regulariser(torch.tensor(0.5, dtype=torch.float64)) > 4.0
    assert regulariser(torch.tensor(0.0, dtype=torch.float64)) > 4.0


def test_one_m2_update_matches_the_hand_worked_step():
    # beta = 0.1, batch means FKL = 2, RKL = 1:
    # dL/dbeta = mean(FKL - RKL) + Reg'(0.1) = 1 + 0.5 * (-1/0.8001 + 1/0.2001) * (-2) = -2.7477
    # AdamW's first step moves by lr * g / (|g| + 1e-8): beta -> 0.1 + 0.01
    controller = BetaController("m2", beta_init=0.1)
    loss = controller.beta_loss(torch.tensor(2.0), torch.tensor(1.0))
    loss.backward()
    grad = controller.param.grad.item()
    assert grad == pytest.approx(1.0 + reg_grad_by_hand(0.1), rel=1e-9)
    assert grad == pytest.approx(-2.7477, abs=1e-4)
    controller.param.grad = None
    assert controller.step(torch.tensor(2.0), torch.tensor(1.0)) == pytest.approx(0.11, abs=1e-8)
    # FKL far above RKL: the sign flips and beta falls by one lr
    falling = BetaController("m2", beta_init=0.1)
    assert falling.step(torch.tensor(10.0), torch.tensor(1.0)) == pytest.approx(0.09, abs=1e-8)


def test_m1_descends_where_m2_ascends():
    up, down = BetaController("m1", beta_init=0.3), BetaController("m2", beta_init=0.3)
    fkl, rkl = torch.tensor(1.0), torch.tensor(5.0)  # RKL > FKL: ascent raises beta
    assert down.step(fkl, rkl) > 0.3 > up.step(fkl, rkl)


def test_beta_never_leaves_the_unit_interval():
    for variant, fkl, rkl in (("m2", 0.0, 1e6), ("m2", 1e6, 0.0), ("m1", 0.0, 1e6)):
        controller = BetaController(variant, beta_init=0.5, lr=0.3)
        seen = [controller.step(torch.tensor(fkl), torch.tensor(rkl)) for _ in range(50)]
        assert all(0.0 <= b <= 1.0 for b in seen)


def test_fixed_beta_never_moves():
    controller = BetaController("fixed", beta_init=0.4)
    for epoch in range(3):
        controller.start_epoch(epoch)
        assert controller.step(torch.tensor(9.0), torch.tensor(1.0)) == 0.4


@pytest.mark.parametrize("mode", ["choice", "uniform"])
def test_reset_happens_at_epoch_boundaries_only(mode):
    controller = BetaController("m3", beta_init=0.3, reset=mode, seed=3)
    controller.start_epoch(0)
    assert controller.beta == 0.3  # the first epoch starts from beta_init
    for _ in range(5):
        controller.step(torch.tensor(1.0), torch.tensor(3.0))
        controller.start_epoch(0)  # called again within the epoch: no reset
    moved = controller.beta
    assert moved != 0.3 and controller.optimizer.state
    controller.start_epoch(1)
    assert controller.beta != moved
    if mode == "choice":
        assert controller.beta in (0.1, 0.6)
    else:
        assert 0.1 <= controller.beta <= 0.6
    assert not controller.optimizer.state  # beta's optimizer restarts with it


def test_m2_does_not_reset():
    controller = BetaController("m2", beta_init=0.3)
    controller.start_epoch(0)
    controller.step(torch.tensor(1.0), torch.tensor(3.0))
    before = controller.beta
    controller.start_epoch(1)
    assert controller.beta == before


def test_state_round_trip_resumes_identically():
    a = BetaController("m3", beta_init=0.1, seed=7)
    a.start_epoch(0)
    for _ in range(3):
        a.step(torch.tensor(1.0), torch.tensor(2.0))
    b = BetaController("m3", beta_init=0.6, seed=99)
    b.load(a.state())
    for controller in (a, b):
        controller.step(torch.tensor(2.0), torch.tensor(1.5))
        controller.start_epoch(1)
        controller.step(torch.tensor(0.5), torch.tensor(1.5))
    assert a.beta == b.beta and a.steps == b.steps
