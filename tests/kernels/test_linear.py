"""linear (GEMM + bias + activation + residual) against plain PyTorch."""

import functools

import pytest
import torch

from tests.kernels.tolerances import DTYPE_IDS, TOLERANCES, assert_matches_reference  # interpreter mode first

# isort: split
from engine.config import Activation  # noqa: E402
from kernels import default_device, linear, linear_tuning_log  # noqa: E402

DEVICE = default_device()

ACTIVATIONS = [None, *Activation]


def _act_id(activation):
    return "none" if activation is None else activation.value


def _inputs(m, n, k, dtype, with_bias=True, with_residual=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    return rand(m, k), rand(n, k), rand(n) if with_bias else None, rand(m, n) if with_residual else None


def _reference(x, w, b, activation, r, dtype):
    """act(x w^T + b) + r with every step in `dtype` (float64 for the exact reference)."""
    y = torch.nn.functional.linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype))
    if activation is Activation.GELU:
        y = torch.nn.functional.gelu(y)
    elif activation is Activation.GELU_TANH:
        y = torch.nn.functional.gelu(y, approximate="tanh")
    elif activation is Activation.RELU:
        y = torch.relu(y)
    return y if r is None else y + r.to(dtype)


def _check(out, x, w, b, activation, r, dtype, atol, rtol):
    assert not torch.isnan(out).any(), "some outputs were never written"
    ref = _reference(x, w, b, activation, r, torch.float64)
    assert_matches_reference(out, ref, functools.partial(_reference, x, w, b, activation, r, dtype), dtype, atol, rtol)


def _run(x, w, b, activation, r):
    out = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=x.dtype, device=DEVICE)
    assert linear(x, w, b, activation, r, out=out) is out
    return out


@pytest.mark.parametrize("m", [1, 7, 130])
@pytest.mark.parametrize("n", [1, 577, 64])
@pytest.mark.parametrize("k", [1, 33, 97, 384])
def test_shapes_fp32(m, n, k):
    dtype, atol, rtol = TOLERANCES[0]
    x, w, b, r = _inputs(m, n, k, dtype, seed=m * 7 + n * 3 + k)
    _check(_run(x, w, b, Activation.GELU, r), x, w, b, Activation.GELU, r, dtype, atol, rtol)


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=_act_id)
@pytest.mark.parametrize("with_bias, with_residual", [(False, False), (True, False), (False, True), (True, True)])
def test_epilogues_fp32(activation, with_bias, with_residual):
    dtype, atol, rtol = TOLERANCES[0]
    x, w, b, r = _inputs(7, 577, 33, dtype, with_bias, with_residual, seed=11)
    _check(_run(x, w, b, activation, r), x, w, b, activation, r, dtype, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES[1:], ids=DTYPE_IDS[1:])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=_act_id)
@pytest.mark.parametrize("m, n, k", [(130, 64, 384), (7, 577, 97), (1, 1, 1)])
def test_half_precision(m, n, k, activation, dtype, atol, rtol):
    x, w, b, r = _inputs(m, n, k, dtype, seed=m + n + k)
    _check(_run(x, w, b, activation, r), x, w, b, activation, r, dtype, atol, rtol)


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=_act_id)
def test_zero_k_is_epilogue_only(activation):
    dtype, atol, rtol = TOLERANCES[0]
    x, w, b, r = _inputs(5, 9, 0, dtype, seed=3)
    _check(_run(x, w, b, activation, r), x, w, b, activation, r, dtype, atol, rtol)
    _check(_run(x, w, None, activation, None), x, w, None, activation, None, dtype, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (3, 577, 5), (130, 3, 97), (65, 67, 129)])
def test_relu_awkward_shapes(m, n, k, dtype, atol, rtol):
    """The fused relu epilogue at ragged tile tails; without bias or residual, so negatives must be clipped to 0."""
    x, w, _, _ = _inputs(m, n, k, dtype, seed=m * 5 + n + k)
    out = _run(x, w, None, Activation.RELU, None)
    _check(out, x, w, None, Activation.RELU, None, dtype, atol, rtol)
    pre = torch.nn.functional.linear(x.double(), w.double())
    clipped = pre < -1e-3 * pre.abs().max()  # clearly negative whatever the rounding: exactly 0 out
    assert (out[clipped] == 0).all()


def test_empty_outputs():
    x, w, b, r = _inputs(5, 0, 16, torch.float32, seed=4)
    assert linear(x, w, b, Activation.GELU, r).shape == (5, 0)
    x, w, b, r = _inputs(0, 8, 16, torch.float32, seed=5)
    assert linear(x, w, b, Activation.GELU, r).shape == (0, 8)


def test_strided_and_batched_inputs():
    dtype, atol, rtol = TOLERANCES[0]
    gen = torch.Generator().manual_seed(6)
    wide = torch.randn(2, 5, 70, generator=gen).to(DEVICE)
    x = wide[..., 3:50]  # [2, 5, 47], row stride 70
    w = torch.randn(47, 33, generator=gen).to(DEVICE).t()  # [33, 47] with strides (1, 33)
    b = torch.randn(33, generator=gen).to(DEVICE)
    r = torch.randn(2, 5, 40, generator=gen).to(DEVICE)[..., :33]  # row stride 40
    out = linear(x, w, b, Activation.GELU_TANH, r)
    assert out.shape == (2, 5, 33) and out.is_contiguous()
    _check(out.reshape(10, 33), x.reshape(10, 47), w, b, Activation.GELU_TANH, r.reshape(10, 33), dtype, atol, rtol)


def test_tuning_log_records_chosen_config():
    x, w, b, r = _inputs(3, 100, 40, torch.float32, seed=7)
    linear(x, w, b, None, r)
    entry = linear_tuning_log()[(128, 64, "float32")]
    assert {"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"} <= entry.keys()


@pytest.mark.parametrize(
    "make_args, match",
    [
        (lambda x, w, b, r: (x[:, :5], w, b, None, r), r"`x` last dim must equal weight's K \(16\)"),
        (lambda x, w, b, r: (x, w[None], b, None, r), r"`weight` must have shape \[N, K\]"),
        (lambda x, w, b, r: (x, w.half(), b, None, r), r"`weight` must have the dtype of `x`"),
        (lambda x, w, b, r: (x.double(), w.double(), None, None, None), r"`x` must have dtype in"),
        (lambda x, w, b, r: (x, w, b[:3], None, r), r"`bias` must have shape \(8,\), got \(3,\)"),
        (lambda x, w, b, r: (x, w, b, None, r[:2]), r"`residual` must have shape \(4, 8\), got \(2, 8\)"),
        (lambda x, w, b, r: (x, w, b, "gelu", r), r"`activation` must be an engine.config.Activation or None"),
    ],
)
def test_rejects_bad_arguments(make_args, match):
    x, w, b, r = _inputs(4, 8, 16, torch.float32, seed=8)
    with pytest.raises(ValueError, match=match):
        linear(*make_args(x, w, b, r))


def test_rejects_bad_out():
    x, w, b, r = _inputs(4, 8, 16, torch.float32, seed=9)
    with pytest.raises(ValueError, match=r"`out` must not share memory with `residual`"):
        linear(x, w, b, None, r, out=r)
    with pytest.raises(ValueError, match=r"`out` must be contiguous"):
        linear(x, w, b, None, r, out=torch.empty(8, 4, device=DEVICE).t())
