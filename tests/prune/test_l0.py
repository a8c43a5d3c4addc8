"""FLOP / parameter accounting against counted references, and the Lagrangian controller on a synthetic task."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from engine.flops import exact_flops, exact_params, expected_flops, expected_params, sparsity
from engine.flops import token_flops as layer_flops
from engine.prune.gates import HardConcreteGate
from engine.prune.l0 import LagrangianController, target_schedule

# A 2-layer ragged BERT-like encoder: different head counts and FFN widths per layer.
HIDDEN, HEAD_DIM, SEQ = 64, 8, 16
HEADS, FFN = (8, 6), (256, 160)


def _hand_flops(heads: tuple[int, ...], ffn: tuple[int, ...], d: int, dh: int, s: int) -> int:
    """DESIGN.md's per-token formula, written out term by term."""
    return sum(2 * d * 3 * h * dh + 2 * 2 * s * h * dh + 2 * h * dh * d + 2 * 2 * d * f for h, f in zip(heads, ffn))


class _RaggedLayer(nn.Module):
    """A plain post-LN BERT layer with h heads and f FFN units, used as a FLOP and parameter reference."""

    def __init__(self, d: int, h: int, dh: int, f: int) -> None:
        super().__init__()
        self.h, self.dh = h, dh
        self.q, self.k, self.v = (nn.Linear(d, h * dh) for _ in range(3))
        self.o = nn.Linear(h * dh, d, bias=False)  # its bias is kept even at 0 heads: not prunable
        self.ffn_in = nn.Linear(d, f)
        self.ffn_out = nn.Linear(f, d, bias=False)  # likewise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[0]
        q, k, v = (m(x).view(s, self.h, self.dh).transpose(0, 1) for m in (self.q, self.k, self.v))  # (h, S, dh)
        att = torch.softmax(q @ k.transpose(1, 2) / self.dh**0.5, dim=-1) @ v  # (h, S, dh)
        x = x + self.o(att.transpose(0, 1).reshape(s, self.h * self.dh))
        return x + self.ffn_out(F.gelu(self.ffn_in(x)))


def test_exact_flops_match_counted_matmuls() -> None:
    torch.manual_seed(0)
    layers = [_RaggedLayer(HIDDEN, h, HEAD_DIM, f) for h, f in zip(HEADS, FFN)]
    x = torch.randn(SEQ, HIDDEN)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        for layer in layers:
            x = layer(x)
    assert counter.get_total_flops() == SEQ * exact_flops(HEADS, FFN, HIDDEN, HEAD_DIM, SEQ)


def test_exact_params_match_module_numel() -> None:
    layers = [_RaggedLayer(HIDDEN, h, HEAD_DIM, f) for h, f in zip(HEADS, FFN)]
    numel = sum(p.numel() for layer in layers for p in layer.parameters())
    assert exact_params(HEADS, FFN, HIDDEN, HEAD_DIM) == numel


def test_expected_at_probability_one_is_dense() -> None:
    ones_h = [torch.ones(h) for h in HEADS]
    ones_f = [torch.ones(f) for f in FFN]
    dense = _hand_flops(HEADS, FFN, HIDDEN, HEAD_DIM, SEQ)
    assert dense == (8 + 6) * 4608 + (256 + 160) * 256  # 4608 FLOPs per head, 256 per FFN unit
    assert expected_flops(ones_h, ones_f, HIDDEN, HEAD_DIM, SEQ).item() == dense
    assert exact_flops(HEADS, FFN, HIDDEN, HEAD_DIM, SEQ) == dense
    ones_l = torch.ones(len(HEADS))
    assert expected_flops(ones_h, ones_f, HIDDEN, HEAD_DIM, SEQ, p_mha=ones_l, p_ffnlayer=ones_l).item() == dense
    dense_params = exact_params(HEADS, FFN, HIDDEN, HEAD_DIM)
    assert expected_params(ones_h, ones_f, HIDDEN, HEAD_DIM).item() == dense_params


def test_expected_equals_exact_on_binary_masks() -> None:
    g = torch.Generator().manual_seed(1)
    masks_h = [(torch.rand(h, generator=g) < 0.5).float() for h in HEADS]
    masks_f = [(torch.rand(f, generator=g) < 0.3).float() for f in FFN]
    kept_h = [int(m.sum()) for m in masks_h]
    kept_f = [int(m.sum()) for m in masks_f]
    got = expected_flops(masks_h, masks_f, HIDDEN, HEAD_DIM, SEQ).item()
    assert got == exact_flops(kept_h, kept_f, HIDDEN, HEAD_DIM, SEQ)
    assert expected_params(masks_h, masks_f, HIDDEN, HEAD_DIM).item() == exact_params(kept_h, kept_f, HIDDEN, HEAD_DIM)
    # A closed whole-sublayer gate removes that layer's heads (or units) entirely.
    p_mha = torch.tensor([0.0, 1.0])
    got = expected_flops(masks_h, masks_f, HIDDEN, HEAD_DIM, SEQ, p_mha=p_mha).item()
    assert got == exact_flops([0, kept_h[1]], kept_f, HIDDEN, HEAD_DIM, SEQ)
    p_ffnlayer = torch.tensor([1.0, 0.0])
    got = expected_params(masks_h, masks_f, HIDDEN, HEAD_DIM, p_ffnlayer=p_ffnlayer).item()
    assert got == exact_params(kept_h, [kept_f[0], 0], HIDDEN, HEAD_DIM)


def test_expected_flops_gradient_is_unit_cost() -> None:
    p_h = [torch.full((h,), 0.5, requires_grad=True) for h in HEADS]
    p_f = [torch.full((f,), 0.5, requires_grad=True) for f in FFN]
    p_mha = torch.tensor([0.25, 1.0], requires_grad=True)
    expected_flops(p_h, p_f, HIDDEN, HEAD_DIM, SEQ, p_mha=p_mha).backward()
    per_head = 2 * HIDDEN * 3 * HEAD_DIM + 2 * 2 * SEQ * HEAD_DIM + 2 * HEAD_DIM * HIDDEN
    torch.testing.assert_close(p_h[0].grad, torch.full((HEADS[0],), 0.25 * per_head))
    torch.testing.assert_close(p_h[1].grad, torch.full((HEADS[1],), 1.0 * per_head))
    torch.testing.assert_close(p_f[1].grad, torch.full((FFN[1],), 2.0 * 2 * HIDDEN))
    torch.testing.assert_close(p_mha.grad, torch.tensor([0.5 * HEADS[0] * per_head, 0.5 * HEADS[1] * per_head]))


def test_shape_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="2 layers but FFN widths for 1"):
        expected_flops([torch.ones(2), torch.ones(2)], [torch.ones(3)], HIDDEN, HEAD_DIM, SEQ)
    with pytest.raises(ValueError, match=r"p_mha must have shape \(2,\)"):
        expected_flops([torch.ones(2)] * 2, [torch.ones(3)] * 2, HIDDEN, HEAD_DIM, SEQ, p_mha=torch.ones(3))


def test_sparsity_and_schedule() -> None:
    assert sparsity(25, 100) == 0.75
    torch.testing.assert_close(sparsity(torch.tensor(40.0), 100), torch.tensor(0.6))
    assert target_schedule(0, 100, 0.6) == 0.0
    assert target_schedule(50, 100, 0.6) == pytest.approx(0.3)
    assert target_schedule(100, 100, 0.6) == pytest.approx(0.6)
    assert target_schedule(10_000, 100, 0.6) == pytest.approx(0.6)
    assert target_schedule(25, 100, 0.6, initial=0.2) == pytest.approx(0.3)
    assert target_schedule(0, 0, 0.5) == 0.5


def test_penalty_value_and_ascent_direction() -> None:
    ctl = LagrangianController(init_lambda1=0.5, init_lambda2=2.0)
    s = torch.tensor(0.1)
    torch.testing.assert_close(ctl.penalty(s, 0.3), torch.tensor(0.5 * -0.2 + 2.0 * 0.04))
    opt = torch.optim.Adam(ctl.lambda_parameters(), lr=0.1, maximize=True)
    before = ctl.penalty(s, 0.3)
    before.backward()
    opt.step()
    after = ctl.penalty(s, 0.3).item()
    assert after > before.item()  # the multipliers ascend the penalty...
    assert ctl.lambda1.item() < 0.5 and ctl.lambda2.item() > 2.0  # ...lambda1 falls while s is below target


def _train_to_target(target: float, steps: int = 800, warmup: int = 150, seed: int = 0) -> tuple[float, float]:
    """Prune the ragged config's gates against a mock task that wants every gate open; (exact, expected) sparsity."""
    torch.manual_seed(seed)
    head_gates = [HardConcreteGate(h) for h in HEADS]
    ffn_gates = [HardConcreteGate(f) for f in FFN]
    gates = head_gates + ffn_gates
    # Importance per gate: its FLOP cost times a random factor, so heads and FFN units compete on equal terms.
    head_cost, unit_cost = layer_flops(1, 0, HIDDEN, HEAD_DIM, SEQ), layer_flops(0, 1, HIDDEN, HEAD_DIM, SEQ)
    cost = [head_cost] * len(HEADS) + [unit_cost] * len(FFN)
    weight = [c * (0.5 + torch.rand(g.shape)) for c, g in zip(cost, gates)]
    total = sum(float(w.sum()) for w in weight)
    dense = exact_flops(HEADS, FFN, HIDDEN, HEAD_DIM, SEQ)
    ctl = LagrangianController()
    # beta2=0.99 lets gates keep moving once their gradients shrink, so they polarise within the step budget.
    opt = torch.optim.Adam([g.log_alpha for g in gates], lr=0.1, betas=(0.9, 0.99))
    lambda_opt = torch.optim.Adam(ctl.lambda_parameters(), lr=0.05, maximize=True)
    for step in range(steps):
        task = 0.2 * sum((w * (1 - g())).sum() for w, g in zip(weight, gates)) / total
        flops = expected_flops(
            [g.prob_nonzero() for g in head_gates], [g.prob_nonzero() for g in ffn_gates], HIDDEN, HEAD_DIM, SEQ
        )
        expected = sparsity(flops, dense)
        loss = task + ctl.penalty(expected, target_schedule(step, warmup, target))
        opt.zero_grad()
        lambda_opt.zero_grad()
        loss.backward()
        opt.step()
        lambda_opt.step()
    kept_h = [int(g.keep_mask().sum()) for g in head_gates]
    kept_f = [int(g.keep_mask().sum()) for g in ffn_gates]
    return sparsity(exact_flops(kept_h, kept_f, HIDDEN, HEAD_DIM, SEQ), dense), float(expected.detach())


@pytest.mark.parametrize("target", [0.3, 0.6])
def test_controller_reaches_flop_target(target: float) -> None:
    exact, expected = _train_to_target(target)
    assert abs(expected - target) <= 0.01, expected
    assert abs(exact - target) <= 0.02, exact
