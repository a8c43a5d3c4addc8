"""GEMM with a fused epilogue: ``out = act(x @ weight^T + bias) + residual``.

    x         [..., K]   any strides; flattened to [M, K]
    weight    [N, K]     nn.Linear layout, any strides
    bias      [N]        optional
    residual  [..., N]   optional, same leading shape as x
    out       [..., N]   contiguous, x's dtype

Limits (the launcher enforces each one):
- dtypes fp16, bf16, fp32; x, weight, bias, residual and out all share one dtype. Accumulation is fp32, and
  fp32 inputs use IEEE products (never TF32). The epilogue (bias, activation, residual) runs in fp32 and
  rounds once, at the store;
- any M, N, K >= 0, with no alignment needed: tails are masked, so ragged FFN widths such as 1 or 577 work.
  M == 0 or N == 0 launch nothing; K == 0 gives ``act(bias) + residual`` computed by torch;
- activation: ``engine.config.Activation`` or None (none): GELU (erf: 0.5 x (1 + erf(x / sqrt 2))), GELU_TANH
  (HF ``gelu_new``: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), evaluated as x * sigmoid(2 u), the same
  function), RELU (max(x, 0));
- ``out`` must not share memory with any input (the autotuner reruns the kernel while tuning).

Tuning: ``triton.autotune`` picks the tile shape per (next_pow2(N), next_pow2(K), dtypes) bucket; M is not
part of the key, so one model's GEMMs tune once whatever the batch. ``linear_tuning_log()`` returns the config
chosen for each bucket seen so far. Under ``TRITON_INTERPRET=1`` the config list holds a single entry (timing
configs in the interpreter measures nothing useful and takes minutes); the kernel itself is the same.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from engine.config import Activation
from kernels._utils import (
    cast_to,
    check_device,
    check_float_dtype,
    check_input,
    check_out,
    check_same,
    check_tensor,
    dot_acc,
    interpreter_bf16,
    interpreting,
)

_ACT_CODE = {None: 0, Activation.GELU: 1, Activation.GELU_TANH: 2, Activation.RELU: 3}  # the kernel's ACTIVATION
_SHARED_MEMORY_BYTES = 200 * 1024  # operand buffers must leave room below H100/H200's 227 KB per block


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages
    )


def _configs() -> list[triton.Config]:
    if interpreting():
        return [_config(64, 64, 64, 4, 1)]
    return [
        _config(128, 256, 64, 8, 3),
        _config(128, 128, 64, 8, 3),
        _config(128, 64, 64, 4, 4),
        _config(64, 128, 64, 4, 4),
        _config(64, 64, 64, 4, 4),
        _config(32, 64, 64, 4, 4),
        _config(16, 64, 128, 4, 4),
    ]


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles whose pipelined operand buffers would not fit in shared memory (fp32 tiles are twice as big)."""
    elem = named_args["x_ptr"].element_size()
    fits = [
        c
        for c in configs
        if (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * elem * max(c.num_stages, 1)
        <= _SHARED_MEMORY_BYTES
    ]
    return fits or configs[-1:]


@triton.autotune(
    configs=_configs(),
    key=["N_BUCKET", "K_BUCKET"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _linear_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    bias_ptr,  # [N] (unused unless HAS_BIAS)
    res_ptr,  # [M, N] (unused unless HAS_RESIDUAL)
    out_ptr,  # [M, N] contiguous
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_rm,
    stride_rn,
    N_BUCKET,  # next_pow2(N): autotune key only
    K_BUCKET,  # next_pow2(K): autotune key only
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,  # _ACT_CODE: 0 none, 1 gelu (erf), 2 gelu (tanh), 3 relu
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,  # see kernels._utils.interpreter_bf16
):
    # Grouped tile order: GROUP_M row tiles walk the N tiles together, so weight tiles are reused from L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    group = pid // tiles_per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_size
    pid_n = (pid % tiles_per_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N] = W^T tile
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = dot_acc(a, b, acc, INTERPRET_BF16)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 1:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    elif ACTIVATION == 2:
        # 0.5 (1 + tanh(u)) == sigmoid(2u); exp overflow gives inf and a clean 0 or x, never NaN.
        # |u| <= 40 already saturates the sigmoid in fp32; the clamp keeps exp finite.
        u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        u = tl.minimum(tl.maximum(u, -40.0), 40.0)
        acc = acc / (1.0 + tl.exp(-2.0 * u))
    elif ACTIVATION == 3:
        acc = tl.maximum(acc, 0.0)
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=mask, other=0.0)
        acc += res.to(tl.float32)
    y = cast_to(acc, out_ptr.dtype.element_ty, INTERPRET_BF16)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], y, mask=mask)


_TUNING_LOG: dict[tuple[int, int, str], dict[str, int]] = {}


def linear_tuning_log() -> dict[tuple[int, int, str], dict[str, int]]:
    """Chosen tile config per autotune bucket ``(next_pow2(N), next_pow2(K), dtype)`` seen in this process."""
    return {key: dict(cfg) for key, cfg in _TUNING_LOG.items()}


def _record_config(n_bucket: int, k_bucket: int, dtype: torch.dtype) -> None:
    best = _linear_kernel.best_config
    entry = dict(best.kwargs)
    entry["num_warps"] = best.num_warps
    entry["num_stages"] = best.num_stages
    _TUNING_LOG[(n_bucket, k_bucket, str(dtype).removeprefix("torch."))] = entry


def _torch_epilogue(y: torch.Tensor, activation: Activation | None) -> torch.Tensor:
    """`activation` applied by torch (the K == 0 path)."""
    if activation is Activation.GELU:
        return torch.nn.functional.gelu(y)
    if activation is Activation.GELU_TANH:
        return torch.nn.functional.gelu(y, approximate="tanh")
    if activation is Activation.RELU:
        return torch.relu(y)
    return y


def _launch_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: Activation | None,
    residual: torch.Tensor | None,
    out: object,
) -> torch.Tensor:
    x = check_tensor("x", x)
    weight = check_tensor("weight", weight)
    if x.dim() < 1:
        raise ValueError("`x` must have shape [..., K], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"`weight` must have shape [N, K] (nn.Linear layout), got {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"`x` last dim must equal weight's K ({k}), got x shape {tuple(x.shape)}")
    if activation is not None and not isinstance(activation, Activation):
        raise ValueError(
            f"`activation` must be an engine.config.Activation or None, got {activation!r} "
            "(an HF hidden_act name converts with Activation(name), e.g. Activation('gelu_new'))"
        )
    check_float_dtype("x", x)
    check_same("weight", weight, "x", x)
    out_shape = (*x.shape[:-1], n)
    inputs = {"x": x, "weight": weight}  # everything `out` must not overlap
    if bias is not None:
        bias = check_input(inputs, "bias", bias, (n,))
    if residual is not None:
        residual = check_input(inputs, "residual", residual, out_shape)
    check_device("x", x)

    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    else:
        out = check_out(out, out_shape, x, "x", inputs)
    m = math.prod(x.shape[:-1])
    if m == 0 or n == 0:
        return out
    out2 = out.view(m, n)
    res2 = residual.reshape(m, n) if residual is not None else None
    if k == 0:  # no product: the epilogue alone, in fp32 like the kernel
        y = torch.zeros((m, n), dtype=torch.float32, device=x.device)
        if bias is not None:
            y += bias.float()
        y = _torch_epilogue(y, activation)
        if res2 is not None:
            y += res2.float()
        out2.copy_(y)
        return out

    x2 = x.reshape(m, k)
    n_bucket, k_bucket = triton.next_power_of_2(n), triton.next_power_of_2(k)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _linear_kernel[grid](
        x2,
        weight,
        bias if bias is not None else x2,
        res2 if res2 is not None else x2,
        out2,
        m,
        n,
        k,
        x2.stride(0),
        x2.stride(1),
        weight.stride(0),
        weight.stride(1),
        res2.stride(0) if res2 is not None else 0,
        res2.stride(1) if res2 is not None else 0,
        n_bucket,
        k_bucket,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=res2 is not None,
        ACTIVATION=_ACT_CODE[activation],
        INTERPRET_BF16=interpreter_bf16(x.dtype),
    )
    _record_config(n_bucket, k_bucket, x.dtype)
    return out


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: Activation | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(x @ weight^T + bias) + residual``: x [..., K], weight [N, K] -> [..., N] in x's dtype."""
    return _launch_linear(x, weight, bias, activation, residual, out)
