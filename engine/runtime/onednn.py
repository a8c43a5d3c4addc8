"""fp32 encoder Linears through oneDNN with weights prepacked once (the CPU torch backend's GEMM path).

On the AMD CPUs this project measures, ATen's default fp32 GEMM (MKL sgemm) reaches about 100 GFLOP/s per core,
while oneDNN's prepacked linear reaches 220-250 (docs/CPP.md); the C++ backend uses the same operator.
Model surgery only: a new module per non-empty Linear, nothing threaded through `forward`.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model import RaggedQAModel

_LINEARS = ("qkv", "o", "ffn_in", "ffn_out")


def onednn_available() -> bool:
    """True when this torch build has the prepacked oneDNN linear ops."""
    ops = getattr(torch.ops, "mkldnn", None)
    return (
        torch.backends.mkldnn.is_available()
        and ops is not None
        and hasattr(ops, "_linear_pointwise")
        and hasattr(ops, "_reorder_linear_weight")
    )


class OneDNNLinear(nn.Module):
    """`x @ Wᵀ + b` with W prepacked for oneDNN; fp32 `[T, in]` -> `[T, out]`."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous(), None)
        self.bias = linear.bias.detach().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[T, in]` -> `[T, out]`."""
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def onednn_model(model: RaggedQAModel) -> RaggedQAModel:
    """Swap every non-empty encoder Linear of an fp32 CPU model for a prepacked oneDNN one (in place; returned)."""
    for layer in model.layers:
        for name in _LINEARS:
            lin = getattr(layer, name)
            if isinstance(lin, nn.Linear) and lin.weight.numel():
                setattr(layer, name, OneDNNLinear(lin))
    return model
