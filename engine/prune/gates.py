"""Hard-concrete gates (Louizos, Welling & Kingma 2018, "Learning Sparse Neural Networks through L0 Regularization").

A gate z in [0, 1] is a stretched and clamped binary-concrete sample (l, r = `left`, `right` below):

    u ~ U(eps, 1 - eps)
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
    z = clamp(s * (r - l) + l, 0, 1)

The stretch (l < 0 < 1 < r) puts finite probability mass on exactly 0 and exactly 1, so the expected
number of non-zero gates, sum P(z != 0) = sum sigmoid(log_alpha - beta * log(-l / r)), is a differentiable
L0 norm (DESIGN.md, "Hard-concrete gates").

At evaluation the gate is deterministic. We use the test-time estimator of Louizos et al. (their eq. 13),
z = clamp(sigmoid(log_alpha) * (r - l) + l, 0, 1): it has no noise, it is exactly 0 for
sigmoid(log_alpha) <= -l / (r - l) (the unit is removed) and exactly 1 for sigmoid(log_alpha) >= (1 - l) / (r - l)
(the unit is kept unscaled). Values in between are folded into the next weight matrix at export.
Note that "deterministic gate > 0" (log_alpha > -log(r / -l) = -2.40) and "P(z != 0) > 0.5"
(log_alpha > -beta * log(r / -l) = -1.60) are different thresholds. Once training has polarised log_alpha
(as the L0 penalty does) they agree, but closed gates keep a small P(z != 0), so the expected sparsity the
controller steers sits slightly below the exact sparsity of `keep_mask` (about 1% in tests/prune/test_l0.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

DEFAULT_LEFT = -0.1  # l in DESIGN.md
DEFAULT_RIGHT = 1.1  # r in DESIGN.md
DEFAULT_BETA = 2.0 / 3.0


def log_alpha_for_prob(
    prob: float, left: float = DEFAULT_LEFT, right: float = DEFAULT_RIGHT, beta: float = DEFAULT_BETA
) -> float:
    """Inverse of `prob_nonzero`: the log_alpha (a logit) whose P(gate != 0) equals `prob` in (0, 1)."""
    if not 0.0 < prob < 1.0:
        raise ValueError(f"init probability must lie strictly between 0 and 1, got {prob}")
    return math.log(prob) - math.log1p(-prob) + beta * math.log(-left / right)


class HardConcreteGate(nn.Module):
    """A tensor of independent hard-concrete gates of a given shape, e.g. (L, H) heads or (F,) FFN units."""

    def __init__(
        self,
        shape: int | tuple[int, ...],
        init_prob: float = 0.9,
        left: float = DEFAULT_LEFT,
        right: float = DEFAULT_RIGHT,
        beta: float = DEFAULT_BETA,
        eps: float = 1e-6,
    ) -> None:
        """Gates of `shape` with P(gate != 0) = `init_prob`, stretch interval (left, right), temperature beta."""
        super().__init__()
        if not left < 0.0 < 1.0 < right:
            raise ValueError(f"hard-concrete stretch needs left < 0 < 1 < right, got left={left}, right={right}")
        if beta <= 0.0:
            raise ValueError(f"temperature beta must be positive, got {beta}")
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps must lie in (0, 0.5), got {eps}")
        self.shape: tuple[int, ...] = (shape,) if isinstance(shape, int) else tuple(shape)
        self.left, self.right, self.beta, self.eps = float(left), float(right), float(beta), float(eps)
        init = log_alpha_for_prob(init_prob, self.left, self.right, self.beta)
        self.log_alpha = nn.Parameter(torch.full(self.shape, init))

    def extra_repr(self) -> str:
        """Shape and constants for print(model)."""
        return f"shape={self.shape}, left={self.left}, right={self.right}, beta={self.beta:.4g}"

    def forward(self, batch_size: int | None = None) -> Tensor:
        """Gate values in [0, 1]: a sample in training, `deterministic()` in eval.

        batch_size=None samples once per forward (one gate tensor of `shape`, shared by the whole batch);
        an int draws independent gates per example, shape (batch_size, *shape). In eval the deterministic
        gate is returned (broadcast to the batch shape when batch_size is given).
        """
        if not self.training:
            z = self.deterministic()
            return z if batch_size is None else z.expand(batch_size, *self.shape)
        return self.sample(batch_size)

    def sample(self, batch_size: int | None = None) -> Tensor:
        """A stochastic gate draw, shape `shape` or (batch_size, *shape); differentiable in log_alpha."""
        shape = self.shape if batch_size is None else (batch_size, *self.shape)
        u = torch.empty(shape, dtype=self.log_alpha.dtype, device=self.log_alpha.device)
        u.uniform_(self.eps, 1.0 - self.eps)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (self.right - self.left) + self.left).clamp(0.0, 1.0)

    def deterministic(self) -> Tensor:
        """Test-time gate clamp(sigmoid(log_alpha) * (r - l) + l, 0, 1), shape `shape`."""
        return (torch.sigmoid(self.log_alpha) * (self.right - self.left) + self.left).clamp(0.0, 1.0)

    def prob_nonzero(self) -> Tensor:
        """P(gate != 0) = sigmoid(log_alpha - beta * log(-l / r)), shape `shape`; its sum is the expected L0."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.left / self.right))

    def keep_mask(self) -> Tensor:
        """Boolean mask of units kept at inference (deterministic gate > 0), shape `shape`."""
        return self.deterministic() > 0.0
