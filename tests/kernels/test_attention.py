"""varlen_attention against plain PyTorch attention, one packed sequence at a time."""

import functools

import pytest
import torch

from tests.kernels.tolerances import DTYPE_IDS, TOLERANCES, assert_matches_reference  # interpreter mode first

# isort: split
from kernels import default_device, varlen_attention  # noqa: E402

DEVICE = default_device()


# (sequence lengths, heads, head dim): awkward lengths around the 64-row blocks, empty sequences, one head.
CASES = [
    ([1, 17, 383], 1, 64),
    ([1, 17, 0, 30], 3, 32),
    ([0, 64, 65, 2], 2, 64),
    ([5, 0, 12], 3, 128),
    ([9], 1, 32),
]
CASE_IDS = [f"L{'_'.join(map(str, lens))}-h{heads}-d{dim}" for lens, heads, dim in CASES]


def _pack(seqlens: list[int], heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    total = sum(seqlens)
    qkv = torch.randn(total, 3, heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    offsets = [0]
    for n in seqlens:
        offsets.append(offsets[-1] + n)
    cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    return qkv, cu_seqlens


def _reference(qkv: torch.Tensor, cu_seqlens: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per sequence, every step in compute_dtype (as eager HF attention does)."""
    total, _, heads, head_dim = qkv.shape
    out = torch.zeros(total, heads * head_dim, dtype=compute_dtype, device=qkv.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        q, k, v = qkv[start:end].to(compute_dtype).permute(1, 2, 0, 3)  # each [heads, L, head_dim]
        p = torch.softmax(q @ k.transpose(-1, -2) / head_dim**0.5, dim=-1)
        o = p @ v
        out[start:end] = o.permute(1, 0, 2).reshape(end - start, heads * head_dim)
    return out


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES, ids=DTYPE_IDS)
@pytest.mark.parametrize("seqlens, heads, head_dim", CASES, ids=CASE_IDS)
def test_matches_reference(seqlens, heads, head_dim, dtype, atol, rtol):
    qkv, cu_seqlens = _pack(seqlens, heads, head_dim, dtype, seed=sum(seqlens) + heads + head_dim)
    out = torch.full((qkv.shape[0], heads * head_dim), float("nan"), dtype=dtype, device=DEVICE)
    result = varlen_attention(qkv, cu_seqlens, max(seqlens), out=out)

    assert result is out
    assert not torch.isnan(out).any(), "some output rows were never written"
    ref = _reference(qkv, cu_seqlens, torch.float64)
    assert_matches_reference(out, ref, functools.partial(_reference, qkv, cu_seqlens, dtype), dtype, atol, rtol)


def test_allocates_output_and_honours_scale():
    qkv, cu_seqlens = _pack([3, 20], 2, 32, torch.float32, seed=1)
    out = varlen_attention(qkv, cu_seqlens, 20, softmax_scale=0.05)
    assert out.shape == (23, 64) and out.dtype == torch.float32
    # A custom scale s equals the default scale 1/sqrt(d) applied to q * s * sqrt(d).
    q_scaled = qkv.clone()
    q_scaled[:, 0] *= 0.05 * 32**0.5
    torch.testing.assert_close(out.double(), _reference(q_scaled, cu_seqlens, torch.float64), atol=1e-5, rtol=1e-5)


def test_only_empty_sequences_write_nothing():
    qkv, cu_seqlens = _pack([0, 0], 2, 64, torch.float32, seed=2)
    assert varlen_attention(qkv, cu_seqlens, 0).shape == (0, 128)
    qkv, cu_seqlens = _pack([4], 1, 64, torch.float32, seed=3)
    out = torch.full((6, 64), float("nan"), device=DEVICE)
    varlen_attention(torch.cat([qkv, qkv[:2]]), cu_seqlens, 4, out=out)  # tokens 4, 5 belong to no sequence
    assert not out[:4].isnan().any() and out[4:].isnan().all()


@pytest.mark.parametrize(
    "make_args, match",
    [
        (lambda q, cu: (q[:, 0], cu, 4), r"`qkv` must have shape \[total_tokens, 3, heads, head_dim\]"),
        (lambda q, cu: (q[:, :2], cu, 4), r"`qkv` must have shape"),
        (lambda q, cu: (q, cu.long(), 4), r"`cu_seqlens` must have dtype torch.int32, got torch.int64"),
        (lambda q, cu: (q, cu[None], 4), r"`cu_seqlens` must have shape \[batch \+ 1\]"),
        (lambda q, cu: (q[..., :48].contiguous(), cu, 4), r"head_dim must be one of \(32, 64, 128\), got 48"),
        (lambda q, cu: (q.double(), cu, 4), r"`qkv` must have dtype in"),
        (lambda q, cu: (q.transpose(2, 3).contiguous().transpose(2, 3), cu, 4), r"`qkv` must be contiguous"),
        (lambda q, cu: (q, cu, -1), r"`max_seqlen` must be an int >= 0"),
    ],
)
def test_rejects_bad_arguments(make_args, match):
    qkv, cu_seqlens = _pack([4, 2], 2, 64, torch.float32, seed=4)
    with pytest.raises(ValueError, match=match):
        varlen_attention(*make_args(qkv, cu_seqlens))


def test_rejects_bad_out_and_offsets():
    qkv, cu_seqlens = _pack([4, 2], 2, 64, torch.float32, seed=5)
    with pytest.raises(ValueError, match=r"`out` must have shape \(6, 128\), got \(6, 64\)"):
        varlen_attention(qkv, cu_seqlens, 4, out=torch.empty(6, 64, device=DEVICE))
    with pytest.raises(ValueError, match=r"`out` must have the dtype of `qkv`"):
        varlen_attention(qkv, cu_seqlens, 4, out=torch.empty(6, 128, dtype=torch.float16, device=DEVICE))
    with pytest.raises(TypeError, match=r"`qkv` must be a torch.Tensor"):
        varlen_attention(qkv.tolist(), cu_seqlens, 4)
    if DEVICE == "cpu":  # offsets are only checked where that costs no device sync
        with pytest.raises(ValueError, match=r"`max_seqlen` must be >= the longest sequence \(4\), got 3"):
            varlen_attention(qkv, cu_seqlens, 3)
        with pytest.raises(ValueError, match=r"`cu_seqlens\[-1\]` must be <= total_tokens \(6\), got 7"):
            varlen_attention(qkv, torch.tensor([0, 4, 7], dtype=torch.int32), 4)
