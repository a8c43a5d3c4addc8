"""Fused add + LayerNorm, row-wise: ``out = LayerNorm(x + bias + residual) * weight + ln_bias``.

This is BERT's post-LN step: ``x`` is a sublayer's output before its bias, ``residual`` the sublayer's input.
A sublayer pruned to nothing still adds its bias (docs/DESIGN.md): that block is ``add_layernorm(h, bias=b_out)``.

    x         [..., H]   flattened to [M, H]
    residual  [..., H]   optional, x's shape
    bias      [H]        optional, added to every row
    weight    [H]        LayerNorm gamma
    ln_bias   [H]        LayerNorm beta
    out       [..., H]   contiguous, x's dtype

Limits (the launcher enforces each one):
- dtypes fp16, bf16, fp32; every tensor shares x's dtype. The sum, mean, variance (biased, as nn.LayerNorm)
  and normalisation run in fp32; the result is rounded once, at the store;
- any hidden size H >= 1 (masked blocks). Rows up to 8192 wide are held in registers in one pass; wider rows
  are streamed in chunks (three passes over the inputs);
- ``eps`` must be > 0; ``out`` must not share memory with an input.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._utils import (
    cast_to,
    check_device,
    check_float_dtype,
    check_input,
    check_out,
    check_tensor,
    interpreter_bf16,
)

_MAX_BLOCK = 8192  # widest row kept in registers; wider rows loop over chunks of this size


@triton.jit
def _load_row_chunk(x_row, res_row, bias_ptr, cols, mask, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr):
    v = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        v += tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _add_layernorm_kernel(
    x_ptr,  # [M, H]
    res_ptr,  # [M, H] (unused unless HAS_RESIDUAL)
    bias_ptr,  # [H] (unused unless HAS_BIAS)
    w_ptr,  # [H]
    b_ptr,  # [H]
    out_ptr,  # [M, H] contiguous
    H,
    stride_x,
    stride_r,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr,  # BLOCK >= H: the whole row stays in registers
    INTERPRET_BF16: tl.constexpr,  # see kernels._utils.interpreter_bf16
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    res_row = res_ptr + row * stride_r
    out_row = out_ptr + row * H
    offs = tl.arange(0, BLOCK)

    if ONE_BLOCK:
        mask = offs < H
        v = _load_row_chunk(x_row, res_row, bias_ptr, offs, mask, HAS_RESIDUAL, HAS_BIAS)
        mean = tl.sum(v, axis=0) / H
        diff = tl.where(mask, v - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / H + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = diff * rstd * w + b
        tl.store(out_row + offs, cast_to(y, out_ptr.dtype.element_ty, INTERPRET_BF16), mask=mask)
    else:
        # Two-pass statistics (mean, then squared deviations) avoid the cancellation of E[v^2] - E[v]^2.
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, H, BLOCK):
            cols = start + offs
            total += _load_row_chunk(x_row, res_row, bias_ptr, cols, cols < H, HAS_RESIDUAL, HAS_BIAS)
        mean = tl.sum(total, axis=0) / H
        sq = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, H, BLOCK):
            cols = start + offs
            mask = cols < H
            v = _load_row_chunk(x_row, res_row, bias_ptr, cols, mask, HAS_RESIDUAL, HAS_BIAS)
            diff = tl.where(mask, v - mean, 0.0)
            sq += diff * diff
        rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / H + eps)
        for start in range(0, H, BLOCK):
            cols = start + offs
            mask = cols < H
            v = _load_row_chunk(x_row, res_row, bias_ptr, cols, mask, HAS_RESIDUAL, HAS_BIAS)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            y = (v - mean) * rstd * w + b
            tl.store(out_row + cols, cast_to(y, out_ptr.dtype.element_ty, INTERPRET_BF16), mask=mask)


def _launch_add_layernorm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    bias: torch.Tensor | None,
    weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    out: object,
) -> torch.Tensor:
    x = check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"`x` must have shape [..., H] with H >= 1, got {tuple(x.shape)}")
    hidden = x.shape[-1]
    check_float_dtype("x", x)
    inputs = {"x": x}  # everything `out` must not overlap
    weight = check_input(inputs, "weight", weight, (hidden,))
    ln_bias = check_input(inputs, "ln_bias", ln_bias, (hidden,))
    if bias is not None:
        bias = check_input(inputs, "bias", bias, (hidden,))
    if residual is not None:
        residual = check_input(inputs, "residual", residual, tuple(x.shape))
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"`eps` must be a finite float > 0, got {eps!r}")
    check_device("x", x)

    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        out = check_out(out, tuple(x.shape), x, "x", inputs)
    rows = math.prod(x.shape[:-1])
    if rows == 0:
        return out

    # The kernel reads rows through a row stride and assumes unit stride inside a row.
    x2 = x.reshape(rows, hidden)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    res2 = None
    if residual is not None:
        res2 = residual.reshape(rows, hidden)
        if res2.stride(1) != 1:
            res2 = res2.contiguous()
    block = min(triton.next_power_of_2(hidden), _MAX_BLOCK)
    num_warps = 4 if block < 2048 else (8 if block < 8192 else 16)
    _add_layernorm_kernel[(rows,)](
        x2,
        res2 if res2 is not None else x2,
        bias.contiguous() if bias is not None else x2,
        inputs["weight"].contiguous(),
        inputs["ln_bias"].contiguous(),
        out.view(rows, hidden),
        hidden,
        x2.stride(0),
        res2.stride(0) if res2 is not None else 0,
        float(eps),
        HAS_RESIDUAL=res2 is not None,
        HAS_BIAS=bias is not None,
        BLOCK=block,
        ONE_BLOCK=block >= hidden,
        INTERPRET_BF16=interpreter_bf16(x.dtype),
        num_warps=num_warps,
    )
    return out


def add_layernorm(
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``LayerNorm(x + bias + residual)`` over the last dim: x [..., H] -> [..., H] in x's dtype (fp32 stats)."""
    return _launch_add_layernorm(x, residual, bias, weight, ln_bias, eps, out)
