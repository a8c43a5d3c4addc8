"""L0 target control: encoder FLOP / parameter counts (exact and expected) and the Lagrangian controller.

Sparsity is measured in encoder FLOPs or parameters, never in gate counts (DESIGN.md, "Hard-concrete
gates"). The per-layer cost formulas live in `layer_flops` and `layer_params` only; every other function
here calls them, with integer counts (exact) or with expected counts built from P(gate != 0) (expected).

Per token, for one layer with hidden d, h kept heads of size d_h, FFN width f and sequence length S
(DESIGN.md, "FLOPs per token, layer l"):
    QKV 2*d*3*h*d_h  +  attention 2*2*S*h*d_h  +  output projection 2*h*d_h*d  +  FFN 2*2*d*f.
Prunable parameters of one layer:
    QKV 3*d*h*d_h + 3*h*d_h (weights + biases)  +  output projection h*d_h*d  +  FFN 2*d*f + f.
The output-projection bias, the FFN output bias and both LayerNorms are never pruned (a 0-head layer
still computes LayerNorm(x + b_O)), so they are not counted: sparsity is relative to prunable cost.

The Lagrangian penalty lambda1*(s - t) + lambda2*(s - t)^2 is minimised over the model and maximised over
the lambdas (Wang, Wohlwend & Lei 2020). We implement the maximisation with a separate optimizer built with
`maximize=True` (see `LagrangianController.make_optimizer`): one `loss.backward()` fills the gradients of
both, the model optimizer descends and the lambda optimizer ascends. No gradient sign is flipped by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

Count = TypeVar("Count", int, float, Tensor)


def layer_flops(heads: Count, ffn: Count, hidden: int, head_dim: int, seq_len: int) -> Count:
    """Encoder FLOPs per token of one layer with `heads` heads and `ffn` FFN units (int or expected Tensor)."""
    d, dh, s = hidden, head_dim, seq_len
    per_head = 2 * d * 3 * dh + 2 * 2 * s * dh + 2 * dh * d  # QKV + attention (QK^T and PV) + output projection
    per_unit = 2 * 2 * d  # FFN in and out
    return heads * per_head + ffn * per_unit


def layer_params(heads: Count, ffn: Count, hidden: int, head_dim: int) -> Count:
    """Prunable parameters of one layer with `heads` heads and `ffn` FFN units (int or expected Tensor)."""
    d, dh = hidden, head_dim
    per_head = 3 * d * dh + 3 * dh + dh * d  # QKV weights + QKV biases + output-projection weights
    per_unit = 2 * d + 1  # FFN in weights + FFN in bias + FFN out weights
    return heads * per_head + ffn * per_unit


def _check_layers(n_heads: int, n_ffn: int) -> None:
    """Raise if the per-layer head and FFN lists disagree on the number of layers."""
    if n_heads != n_ffn:
        raise ValueError(f"got head counts for {n_heads} layers but FFN widths for {n_ffn} layers")


def exact_flops(heads: Sequence[int], ffn: Sequence[int], hidden: int, head_dim: int, seq_len: int) -> int:
    """Encoder FLOPs per token of a model keeping heads[l] heads and ffn[l] FFN units in layer l."""
    _check_layers(len(heads), len(ffn))
    return sum(layer_flops(int(h), int(f), hidden, head_dim, seq_len) for h, f in zip(heads, ffn))


def exact_params(heads: Sequence[int], ffn: Sequence[int], hidden: int, head_dim: int) -> int:
    """Prunable encoder parameters of a model keeping heads[l] heads and ffn[l] FFN units in layer l."""
    _check_layers(len(heads), len(ffn))
    return sum(layer_params(int(h), int(f), hidden, head_dim) for h, f in zip(heads, ffn))


def _expected_counts(
    p_heads: Sequence[Tensor], p_ffn: Sequence[Tensor], p_mha: Tensor | None, p_ffnlayer: Tensor | None
) -> list[tuple[Tensor, Tensor]]:
    """Per-layer expected (heads, FFN units): sum of P(open), times the layer's sublayer P(open) if given."""
    _check_layers(len(p_heads), len(p_ffn))
    n = len(p_heads)
    for name, p in (("p_mha", p_mha), ("p_ffnlayer", p_ffnlayer)):
        if p is not None and tuple(p.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},), one probability per layer, got {tuple(p.shape)}")
    counts = []
    for i, (ph, pf) in enumerate(zip(p_heads, p_ffn)):
        h, f = ph.sum(), pf.sum()
        # Gates are independent, so E[z_layer * sum z_unit] = P(layer open) * sum P(unit open).
        if p_mha is not None:
            h = h * p_mha[i]
        if p_ffnlayer is not None:
            f = f * p_ffnlayer[i]
        counts.append((h, f))
    return counts


def expected_flops(
    p_heads: Sequence[Tensor],
    p_ffn: Sequence[Tensor],
    hidden: int,
    head_dim: int,
    seq_len: int,
    p_mha: Tensor | None = None,
    p_ffnlayer: Tensor | None = None,
) -> Tensor:
    """Expected encoder FLOPs per token (scalar Tensor, differentiable) from per-layer P(head/unit open).

    p_heads[l]: (H_l,), p_ffn[l]: (F_l,); p_mha, p_ffnlayer: optional (L,) whole-sublayer P(open).
    """
    counts = _expected_counts(p_heads, p_ffn, p_mha, p_ffnlayer)
    return torch.stack([layer_flops(h, f, hidden, head_dim, seq_len) for h, f in counts]).sum()


def expected_params(
    p_heads: Sequence[Tensor],
    p_ffn: Sequence[Tensor],
    hidden: int,
    head_dim: int,
    p_mha: Tensor | None = None,
    p_ffnlayer: Tensor | None = None,
) -> Tensor:
    """Expected prunable encoder parameters (scalar Tensor, differentiable); arguments as `expected_flops`."""
    counts = _expected_counts(p_heads, p_ffn, p_mha, p_ffnlayer)
    return torch.stack([layer_params(h, f, hidden, head_dim) for h, f in counts]).sum()


def sparsity(kept: Count, dense: int | float) -> Count:
    """Fraction of cost removed, 1 - kept / dense (dimensionless; works on ints and Tensors)."""
    if dense <= 0:
        raise ValueError(f"dense cost must be positive, got {dense}")
    return 1 - kept / dense


def target_schedule(step: int, warmup_steps: int, final_target: float, initial: float = 0.0) -> float:
    """Target sparsity at `step`: linear ramp from `initial` (step 0) to `final_target` (step >= warmup_steps)."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if step >= warmup_steps:
        return float(final_target)
    frac = max(step, 0) / warmup_steps
    return float(initial + (final_target - initial) * frac)


class LagrangianController(nn.Module):
    """Lagrange multipliers (lambda1, lambda2) that steer expected sparsity to a target; trained by ascent."""

    def __init__(self, init_lambda1: float = 0.0, init_lambda2: float = 0.0) -> None:
        """Start both multipliers at the given values (0 means no pressure until the constraint is violated)."""
        super().__init__()
        self.lambda1 = nn.Parameter(torch.tensor(float(init_lambda1)))
        self.lambda2 = nn.Parameter(torch.tensor(float(init_lambda2)))

    def penalty(self, expected_sparsity: Tensor, target: float) -> Tensor:
        """lambda1*(s - t) + lambda2*(s - t)^2 (scalar); add to the loss, descend on the model, ascend on lambdas."""
        gap = expected_sparsity - target
        return self.lambda1 * gap + self.lambda2 * gap * gap

    def lambda_parameters(self) -> list[nn.Parameter]:
        """The multipliers, to be optimised by gradient ascent (keep them out of the model's optimizer)."""
        return [self.lambda1, self.lambda2]

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """An Adam over the multipliers with maximize=True: `step()` ascends the penalty after `loss.backward()`."""
        return torch.optim.Adam(self.lambda_parameters(), lr=lr, maximize=True)
