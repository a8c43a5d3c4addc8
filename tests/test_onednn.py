"""The torch backend's oneDNN Linear against F.linear at awkward shapes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.runtime.onednn import OneDNNLinear, onednn_available


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linear ops")
@pytest.mark.parametrize("tokens, k, n", [(1, 384, 1), (7, 33, 577), (130, 384, 1152), (3, 1, 5)])
def test_onednn_linear_matches_f_linear(tokens, k, n):
    g = torch.Generator().manual_seed(tokens * 1000 + n)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
        lin.bias.copy_(torch.randn(n, generator=g))
    x = torch.randn(tokens, k, generator=g)
    want = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    got = OneDNNLinear(lin)(x)
    assert got.dtype == torch.float32 and got.shape == (tokens, n)
    # fp32 accumulation over k terms of size ~1: error grows like sqrt(k) * 2^-24 * |terms|
    assert (got.double() - want).abs().max() < 1e-5 * k**0.5 * 4
