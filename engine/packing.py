"""Padding-free batches: pack, unpack, `cu_seqlens` and positions. Nothing else re-derives offsets.

Shapes: B sequences, S padded length, T = sum of lengths (packed tokens).
`cu_seqlens` is int32 `[B+1]`, `cu_seqlens[i]:cu_seqlens[i+1]` are sequence i's rows in the packed tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def cu_seqlens_from_lengths(lengths: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Cumulative offsets `[B+1]` (int32) of sequences with the given lengths."""
    lens = torch.as_tensor(lengths, dtype=torch.int32).reshape(-1)
    if (lens < 0).any():
        raise ValueError(f"sequence lengths must be >= 0, got {lens.tolist()}")
    out = torch.zeros(lens.numel() + 1, dtype=torch.int32)
    torch.cumsum(lens, 0, out=out[1:])
    return out


def lengths_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-row lengths `[B]` of a right-padded 0/1 mask `[B, S]`; raises if a row is not right-padded."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, seq], got shape {tuple(attention_mask.shape)}")
    m = attention_mask.to(torch.bool)
    lengths = m.sum(1)
    ar = torch.arange(m.shape[1], device=m.device)
    if not torch.equal(m, ar[None, :] < lengths[:, None]):
        raise ValueError("attention_mask must be right-padded (ones then zeros in every row)")
    return lengths


def pack(padded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Rows of `padded` `[B, S, ...]` that lie within each sequence's length, as `[T, ...]`."""
    keep = torch.arange(padded.shape[1], device=padded.device)[None, :] < lengths.to(padded.device)[:, None]
    return padded[keep]


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, seq: int, fill: float = 0.0) -> torch.Tensor:
    """Inverse of `pack`: `[T, ...]` -> `[B, seq, ...]`, padding filled with `fill`."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.long)
    batch = lengths.numel()
    out = packed.new_full((batch, seq, *packed.shape[1:]), fill)
    keep = torch.arange(seq, device=packed.device)[None, :] < lengths.to(packed.device)[:, None]
    out[keep] = packed
    return out


def positions(cu_seqlens: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Position id of every packed token `[T]`: `offset + index within its sequence` (int64)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.long)
    total = int(cu_seqlens[-1])
    starts = torch.repeat_interleave(cu_seqlens[:-1].to(torch.long), lengths)
    return torch.arange(total, dtype=torch.long, device=cu_seqlens.device) - starts + offset
