"""add_layernorm (residual + bias + LayerNorm) against plain PyTorch."""

import functools

import pytest
import torch

from tests.kernels.tolerances import DTYPE_IDS, TOLERANCES, assert_matches_reference  # interpreter mode first

# isort: split
from kernels import add_layernorm, default_device  # noqa: E402

DEVICE = default_device()

EPS = 1e-12  # BERT's; RoBERTa uses 1e-5


def _inputs(rows, hidden, dtype, with_residual, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(dtype).to(DEVICE)

    # A shared offset per row makes the mean large next to the spread, which punishes E[x^2] - E[x]^2.
    x = rand(rows, hidden, shift=3.0)
    residual = rand(rows, hidden) if with_residual else None
    bias = rand(hidden, scale=0.5) if with_bias else None
    return x, residual, bias, rand(hidden, scale=0.2, shift=1.0), rand(hidden, scale=0.2)


def _reference(x, residual, bias, weight, ln_bias, dtype):
    """LayerNorm(x + bias + residual) with every step in `dtype` (float64 for the exact reference)."""
    h = x.to(dtype)
    if bias is not None:
        h = h + bias.to(dtype)
    if residual is not None:
        h = h + residual.to(dtype)
    return torch.nn.functional.layer_norm(h, (x.shape[-1],), weight.to(dtype), ln_bias.to(dtype), EPS)


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_residual, with_bias", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("hidden", [1, 384, 577])
def test_matches_reference(hidden, with_residual, with_bias, dtype, atol, rtol):
    x, residual, bias, weight, ln_bias = _inputs(7, hidden, dtype, with_residual, with_bias, seed=hidden)
    out = torch.full_like(x, float("nan"))
    assert add_layernorm(x, residual, bias, weight=weight, ln_bias=ln_bias, eps=EPS, out=out) is out

    assert not torch.isnan(out).any(), "some outputs were never written"
    ref = _reference(x, residual, bias, weight, ln_bias, torch.float64)
    torch_out = functools.partial(_reference, x, residual, bias, weight, ln_bias, dtype)
    assert_matches_reference(out, ref, torch_out, dtype, atol, rtol)


def test_wide_rows_stream_in_chunks():
    x, residual, bias, weight, ln_bias = _inputs(3, 8192 + 37, torch.float32, True, True, seed=1)
    out = add_layernorm(x, residual, bias, weight=weight, ln_bias=ln_bias, eps=EPS)
    ref = _reference(x, residual, bias, weight, ln_bias, torch.float64)
    torch.testing.assert_close(out.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


def test_leading_dims_and_strided_rows():
    x, residual, bias, weight, ln_bias = _inputs(2 * 3, 40, torch.float32, True, True, seed=2)
    wide = torch.cat([x, x], dim=1).reshape(2, 3, 80)[..., :40]  # [2, 3, 40] with row stride 80
    out = add_layernorm(wide, residual.reshape(2, 3, 40), bias, weight=weight, ln_bias=ln_bias, eps=EPS)
    assert out.shape == (2, 3, 40) and out.is_contiguous()
    ref = _reference(x, residual, bias, weight, ln_bias, torch.float64)
    torch.testing.assert_close(out.reshape(6, 40).double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)
    assert add_layernorm(x[:0], weight=weight, ln_bias=ln_bias, eps=EPS).shape == (0, 40)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"x": torch.zeros(4, 0)}, r"`x` must have shape \[\.\.\., H\] with H >= 1"),
        ({"weight": torch.ones(7)}, r"`weight` must have shape \(8,\), got \(7,\)"),
        ({"ln_bias": torch.ones(8, dtype=torch.float16)}, r"`ln_bias` must have the dtype of `x`"),
        ({"bias": torch.ones(4, 8)}, r"`bias` must have shape \(8,\), got \(4, 8\)"),
        ({"residual": torch.ones(8)}, r"`residual` must have shape \(4, 8\), got \(8,\)"),
        ({"eps": 0.0}, r"`eps` must be a finite float > 0"),
        ({"x": torch.zeros(4, 8, dtype=torch.int32)}, r"`x` must have dtype in"),
        ({"out": torch.empty(4, 9)}, r"`out` must have shape \(4, 8\), got \(4, 9\)"),
    ],
)
def test_rejects_bad_arguments(change, match):
    args = {"x": torch.zeros(4, 8), "residual": None, "bias": None, "weight": torch.ones(8), "ln_bias": torch.zeros(8)}
    args["eps"] = EPS
    args.update(change)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=match):
        add_layernorm(**args)
