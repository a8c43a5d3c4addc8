"""Hard-concrete gate math checked against closed forms and empirical frequencies of many samples."""

from __future__ import annotations

import math

import pytest
import torch

from engine.prune.gates import HardConcreteGate, log_alpha_for_prob

L, R, BETA = -0.1, 1.1, 2.0 / 3.0
LOG_ALPHAS = [-3.0, -1.5, 0.0, 1.0, 3.0]
N_SAMPLES = 40_000


def _gate_with(log_alphas: list[float]) -> HardConcreteGate:
    """A gate whose log_alpha holds exactly the given values."""
    gate = HardConcreteGate(len(log_alphas))
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor(log_alphas, dtype=torch.float64).float())
    return gate


def _binomial_tol(p: torch.Tensor, n: int) -> torch.Tensor:
    """Five binomial standard deviations of an empirical frequency over n draws (plus a hair for p near 0/1)."""
    return 5.0 * torch.sqrt(p * (1 - p) / n) + 1e-3


def test_prob_nonzero_matches_empirical_frequency() -> None:
    torch.manual_seed(0)
    gate = _gate_with(LOG_ALPHAS).train()
    z = gate(batch_size=N_SAMPLES)  # (N, 5): independent draws per row
    freq = (z > 0).double().mean(dim=0)
    p = gate.prob_nonzero().detach().double()
    assert torch.all((freq - p).abs() <= _binomial_tol(p, N_SAMPLES)), (freq, p)
    # The DESIGN.md closed form, written out independently.
    ref = torch.tensor([1 / (1 + math.exp(-(a - BETA * math.log(-L / R)))) for a in LOG_ALPHAS], dtype=torch.float64)
    torch.testing.assert_close(p, ref, atol=1e-6, rtol=0)


def test_mass_at_exactly_zero_and_one() -> None:
    torch.manual_seed(1)
    gate = _gate_with(LOG_ALPHAS).train()
    z = gate(batch_size=N_SAMPLES)
    assert z.min() >= 0.0 and z.max() <= 1.0
    # z == 1 iff the unstretched sample s >= (1 - l) / (r - l), i.e. logit(u) >= beta*log((1-l)/(r-1)) - log_alpha.
    la = torch.tensor(LOG_ALPHAS, dtype=torch.float64)
    p_one = torch.sigmoid(la - BETA * math.log((1 - L) / (R - 1)))
    p_zero = 1 - torch.sigmoid(la - BETA * math.log(-L / R))
    f_one = (z == 1.0).double().mean(dim=0)
    f_zero = (z == 0.0).double().mean(dim=0)
    assert torch.all((f_one - p_one).abs() <= _binomial_tol(p_one, N_SAMPLES)), (f_one, p_one)
    assert torch.all((f_zero - p_zero).abs() <= _binomial_tol(p_zero, N_SAMPLES)), (f_zero, p_zero)
    # Near log_alpha = 0 both ends carry real mass (about 17% each), and the middle is non-empty too.
    mid = LOG_ALPHAS.index(0.0)
    assert f_zero[mid] > 0.1 and f_one[mid] > 0.1
    assert ((z[:, mid] > 0) & (z[:, mid] < 1)).double().mean() > 0.5


def test_eval_gate_is_deterministic_and_matches_formula() -> None:
    gate = _gate_with(LOG_ALPHAS).eval()
    z1, z2 = gate(), gate()
    assert torch.equal(z1, z2)
    ref = (torch.sigmoid(torch.tensor(LOG_ALPHAS)) * (R - L) + L).clamp(0, 1)
    torch.testing.assert_close(z1, ref)
    assert torch.equal(gate.deterministic(), z1)
    zb = gate(batch_size=3)
    assert zb.shape == (3, len(LOG_ALPHAS)) and torch.equal(zb[2], z1)


def test_keep_mask_threshold() -> None:
    # deterministic > 0  <=>  sigmoid(log_alpha) > -l / (r - l) = 1/12  <=>  log_alpha > -log(11).
    edge = -math.log(11.0)
    gate = _gate_with([edge - 1e-3, edge + 1e-3, 5.0, -5.0])
    assert gate.keep_mask().tolist() == [False, True, True, False]
    assert gate.keep_mask().dtype == torch.bool
    assert gate.deterministic()[2] == 1.0 and gate.deterministic()[3] == 0.0


def test_training_samples_vary_and_batch_modes() -> None:
    torch.manual_seed(2)
    gate = HardConcreteGate((3, 5), init_prob=0.5).train()
    a, b = gate(), gate()
    assert a.shape == (3, 5) and not torch.equal(a, b)  # one fresh draw per forward, shared by the batch
    zb = gate(batch_size=7)
    assert zb.shape == (7, 3, 5) and not torch.equal(zb[0], zb[1])  # independent per example


def test_gradient_reaches_log_alpha() -> None:
    torch.manual_seed(3)
    gate = HardConcreteGate(64, init_prob=0.5).train()
    gate(batch_size=8).sum().backward()
    g = gate.log_alpha.grad
    assert g is not None and torch.isfinite(g).all() and (g > 0).any()  # larger log_alpha -> larger gate
    gate.log_alpha.grad = None
    gate.prob_nonzero().sum().backward()
    assert (gate.log_alpha.grad > 0).all()


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])
def test_init_prob_round_trip(p: float) -> None:
    gate = HardConcreteGate((2, 3), init_prob=p)
    torch.testing.assert_close(gate.prob_nonzero(), torch.full((2, 3), p), atol=1e-6, rtol=0)
    assert math.isclose(log_alpha_for_prob(p), gate.log_alpha[0, 0].item(), rel_tol=0, abs_tol=1e-6)


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError, match="strictly between"):
        HardConcreteGate(4, init_prob=1.0)
    with pytest.raises(ValueError, match="left < 0 < 1 < right"):
        HardConcreteGate(4, left=0.1)
    with pytest.raises(ValueError, match="beta"):
        HardConcreteGate(4, beta=0.0)
