"""Variable-length bidirectional attention over packed sequences (FlashAttention-style forward).

Inputs are packed: the tokens of all sequences lie back to back, and ``cu_seqlens`` holds the offsets.

    qkv         [total_tokens, 3, h, d_h]   contiguous; index 1 picks q, k, v
    cu_seqlens  [B + 1] int32               cu_seqlens[0] == 0, non-decreasing, cu_seqlens[B] <= total_tokens
    out         [total_tokens, h * d_h]     in qkv's dtype; head j occupies columns j*d_h .. (j+1)*d_h - 1

Limits (the launcher enforces each one):
- head dim d_h in {32, 64, 128}; any head count h >= 1;
- dtypes fp16, bf16, fp32. Scores, the running max and the running sum are fp32; the probabilities are cast
  to the input dtype before the P @ V product (as FlashAttention does). fp32 products use IEEE precision
  (never TF32);
- no causal mask, no dropout, no attention bias: every token sees every token of its own sequence;
- zero-length sequences are allowed and write nothing. Rows of ``out`` past ``cu_seqlens[B]`` are left as
  they were;
- ``max_seqlen`` must be at least the longest sequence; it only sizes the grid. On CUDA the launcher does not
  check it (that would cost a device sync); on CPU it does.

Grid: (query blocks of ``max_seqlen``) x (B * h), flattened into one axis. A program whose query block starts past
its sequence's end exits at once, and key blocks stop at the sequence end, so padding costs no more than the tail of
a block.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._utils import cast_to, check_device, check_float_dtype, check_out, check_tensor, dot_acc, interpreter_bf16

SUPPORTED_HEAD_DIMS = (32, 64, 128)
_LOG2E = 1.4426950408889634


@triton.jit
def _varlen_attention_kernel(
    qkv_ptr,  # [T, 3, H, D]
    cu_seqlens_ptr,  # [B + 1] int32
    out_ptr,  # [T, H * D]
    qk_scale,  # softmax_scale * log2(e): scores are kept in base 2
    stride_qkv_t,
    stride_qkv_s,
    stride_qkv_h,
    stride_out_t,
    num_m_blocks,  # cdiv(max_seqlen, BLOCK_M)
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,  # see kernels._utils.interpreter_bf16
):
    # One flat grid axis (CUDA caps axes 1 and 2 at 65535): query blocks of one (sequence, head) are adjacent,
    # so they run close together in time and share that head's K and V through L2.
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    pid_bh = pid // num_m_blocks
    seq = pid_bh // H
    head = pid_bh % H

    seq_start = tl.load(cu_seqlens_ptr + seq)
    seqlen = tl.load(cu_seqlens_ptr + seq + 1) - seq_start
    start = seq_start.to(tl.int64)  # token offsets in int64: T * 3 * H * D may pass 2**31
    if pid_m * BLOCK_M >= seqlen:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows within the sequence
    offs_n = tl.arange(0, BLOCK_N)  # key rows within the current key block
    offs_d = tl.arange(0, D)
    mask_m = offs_m < seqlen

    base = qkv_ptr + start * stride_qkv_t + head * stride_qkv_h
    q_ptrs = base + offs_m[:, None].to(tl.int64) * stride_qkv_t + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None], other=0.0)  # [BLOCK_M, D]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (base-2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    for start_n in range(0, seqlen, BLOCK_N):
        rows_n = start_n + offs_n
        mask_n = rows_n < seqlen
        kv_off = rows_n[:, None].to(tl.int64) * stride_qkv_t + offs_d[None, :]
        k = tl.load(base + stride_qkv_s + kv_off, mask=mask_n[:, None], other=0.0)  # [BLOCK_N, D]
        v = tl.load(base + 2 * stride_qkv_s + kv_off, mask=mask_n[:, None], other=0.0)  # [BLOCK_N, D]

        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        s = dot_acc(q, tl.trans(k), s, INTERPRET_BF16) * qk_scale  # [BLOCK_M, BLOCK_N], base-2 logits
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # Every key block holds at least one valid key, so m_new is finite and exp2 never sees inf - inf.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = dot_acc(cast_to(p, v.dtype, INTERPRET_BF16), v, acc, INTERPRET_BF16)
        m_i = m_new

    acc = acc / l_i[:, None]
    out_ptrs = out_ptr + (start + offs_m[:, None].to(tl.int64)) * stride_out_t + head * D + offs_d[None, :]
    tl.store(out_ptrs, cast_to(acc, out_ptr.dtype.element_ty, INTERPRET_BF16), mask=mask_m[:, None])


def _check_cu_seqlens_on_host(cu: torch.Tensor, total_tokens: int, max_seqlen: int) -> None:
    """Full check of the offsets; only run when they already live on the CPU (no device sync)."""
    if cu[0].item() != 0:
        raise ValueError(f"`cu_seqlens[0]` must be 0, got {cu[0].item()}")
    lengths = cu[1:] - cu[:-1]
    if lengths.numel() and lengths.min().item() < 0:
        raise ValueError(f"`cu_seqlens` must be non-decreasing, got {cu.tolist()}")
    if cu[-1].item() > total_tokens:
        raise ValueError(f"`cu_seqlens[-1]` must be <= total_tokens ({total_tokens}), got {cu[-1].item()}")
    if lengths.numel() and lengths.max().item() > max_seqlen:
        raise ValueError(f"`max_seqlen` must be >= the longest sequence ({lengths.max().item()}), got {max_seqlen}")


def _launch_varlen_attention(
    qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, softmax_scale: float | None, out: object
) -> torch.Tensor:
    qkv = check_tensor("qkv", qkv)
    cu_seqlens = check_tensor("cu_seqlens", cu_seqlens)
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"`qkv` must have shape [total_tokens, 3, heads, head_dim], got {tuple(qkv.shape)}")
    total_tokens, _, heads, head_dim = qkv.shape
    check_float_dtype("qkv", qkv)
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"`qkv` head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    if heads < 1:
        raise ValueError(f"`qkv` must have at least one head, got {heads}")
    if not qkv.is_contiguous():
        raise ValueError(f"`qkv` must be contiguous, got strides {tuple(qkv.stride())}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"`cu_seqlens` must have dtype torch.int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"`cu_seqlens` must have shape [batch + 1], got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != qkv.device:
        raise ValueError(f"`cu_seqlens` must be on the device of `qkv` ({qkv.device}), got {cu_seqlens.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"`max_seqlen` must be an int >= 0, got {max_seqlen!r}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    elif not isinstance(softmax_scale, (int, float)) or not math.isfinite(softmax_scale):
        raise ValueError(f"`softmax_scale` must be a finite float or None, got {softmax_scale!r}")
    check_device("qkv", qkv)

    out_shape = (total_tokens, heads * head_dim)
    if out is None:
        out = torch.empty(out_shape, dtype=qkv.dtype, device=qkv.device)
    else:
        out = check_out(out, out_shape, qkv, "qkv", {"qkv": qkv, "cu_seqlens": cu_seqlens})
    cu_seqlens = cu_seqlens.contiguous()
    if cu_seqlens.device.type == "cpu":
        _check_cu_seqlens_on_host(cu_seqlens, total_tokens, max_seqlen)

    batch = cu_seqlens.numel() - 1
    if batch == 0 or total_tokens == 0 or max_seqlen == 0:
        return out

    # 64 x 64 tiles fit every supported head dim in registers and shared memory (fp32 at d_h 128 included)
    # and waste little on BERT-length sequences; fp32 tiles get one pipeline stage to stay in shared memory.
    block_m, block_n = 64, 64
    num_warps = 4 if head_dim <= 64 else 8
    num_stages = 1 if qkv.dtype == torch.float32 else 2
    num_m_blocks = triton.cdiv(max_seqlen, block_m)
    grid = (num_m_blocks * batch * heads,)
    _varlen_attention_kernel[grid](
        qkv,
        cu_seqlens,
        out,
        float(softmax_scale) * _LOG2E,
        qkv.stride(0),
        qkv.stride(1),
        qkv.stride(2),
        out.stride(0),
        num_m_blocks,
        H=heads,
        D=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        INTERPRET_BF16=interpreter_bf16(qkv.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def varlen_attention(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bidirectional attention per packed sequence: qkv [T, 3, h, d_h] -> [T, h*d_h] (scale defaults to d_h^-0.5)."""
    return _launch_varlen_attention(qkv, cu_seqlens, max_seqlen, softmax_scale, out)
