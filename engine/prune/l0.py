"""L0 target control: the target schedule and the Lagrangian controller.

Sparsity is measured in encoder FLOPs, parameters or latency, never in gate counts (docs/DESIGN.md,
"Hard-concrete gates"); the expected costs come from the one cost model, `engine.flops` (or a latency
table, `engine.latency`), and enter here as the expected sparsity `s`.

The Lagrangian penalty lambda1*(s - t) + lambda2*(s - t)^2 is minimised over the model and maximised over
the lambdas (Wang, Wohlwend & Lei 2020). The trainer (`engine.train`) gives the lambdas a parameter group
with `ascent=True`, which AdamW runs with `maximize=True`: one `loss.backward()` fills every gradient, and
the same optimizer step descends on the model and ascends on the multipliers. No gradient is negated by hand.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
