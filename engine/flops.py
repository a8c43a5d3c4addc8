"""The one cost model: encoder FLOPs and prunable parameters of a (ragged) shape, exact or expected.

Multiply-add = 2 FLOPs; embeddings and the QA head are excluded (docs/DESIGN.md, "The FLOP definition").
Per token, one layer with hidden d, h kept heads of size d_h, FFN width f, sequence length S:

    QKV 2*d*3*h*d_h  +  attention 2*2*S*h*d_h  +  output projection 2*h*d_h*d  +  FFN 2*2*d*f.

Prunable parameters of one layer: QKV 3*d*h*d_h + 3*h*d_h (weights + biases), output projection h*d_h*d,
FFN 2*d*f + f. The output-projection bias, the FFN output bias and both LayerNorms are never pruned (a 0-head
layer still computes LayerNorm(x + b_O)), so they are not counted: parameter sparsity is relative to
prunable cost. Costs are linear in heads and units, so every count here is built from `unit_costs`; the
same functions take ints (exact counts of a shape) or Tensors (expected counts from P(gate != 0), for the
L0 controller), so the controller, calibration, `make_spec`, `build_model` and the report share one model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from engine.config import EncoderConfig

Count = TypeVar("Count", int, float, Tensor)


# ------------------------------------------------------------------------------------------- per unit


def unit_flops(hidden: int, head_dim: int, seq: int) -> tuple[int, int]:
    """Per-token FLOPs of one attention head and of one FFN unit at sequence length `seq`."""
    per_head = 2 * hidden * 3 * head_dim + 2 * 2 * seq * head_dim + 2 * head_dim * hidden  # QKV + QK^T, PV + O
    per_unit = 2 * 2 * hidden  # FFN in and out
    return per_head, per_unit


def unit_params(hidden: int, head_dim: int) -> tuple[int, int]:
    """Prunable parameters of one attention head and of one FFN unit."""
    per_head = 3 * hidden * head_dim + 3 * head_dim + head_dim * hidden  # QKV weights + biases, O weights
    per_unit = 2 * hidden + 1  # FFN in weights + bias, FFN out weights
    return per_head, per_unit


def token_flops(heads: Count, ffn: Count, hidden: int, head_dim: int, seq: int) -> Count:
    """Encoder FLOPs per token of one layer with `heads` heads and `ffn` units (int, or expected Tensor)."""
    per_head, per_unit = unit_flops(hidden, head_dim, seq)
    return heads * per_head + ffn * per_unit


def layer_params(heads: Count, ffn: Count, hidden: int, head_dim: int) -> Count:
    """Prunable parameters of one layer with `heads` heads and `ffn` units (int, or expected Tensor)."""
    per_head, per_unit = unit_params(hidden, head_dim)
    return heads * per_head + ffn * per_unit


def _check_layers(n_heads: int, n_ffn: int) -> None:
    if n_heads != n_ffn:
        raise ValueError(f"got head counts for {n_heads} layers but FFN widths for {n_ffn} layers")


def exact_flops(heads: Sequence[int], ffn: Sequence[int], hidden: int, head_dim: int, seq: int) -> int:
    """Encoder FLOPs per token of a model keeping heads[l] heads and ffn[l] units in layer l."""
    _check_layers(len(heads), len(ffn))
    return sum(token_flops(int(h), int(f), hidden, head_dim, seq) for h, f in zip(heads, ffn))


def exact_params(heads: Sequence[int], ffn: Sequence[int], hidden: int, head_dim: int) -> int:
    """Prunable encoder parameters of a model keeping heads[l] heads and ffn[l] units in layer l."""
    _check_layers(len(heads), len(ffn))
    return sum(layer_params(int(h), int(f), hidden, head_dim) for h, f in zip(heads, ffn))


# ------------------------------------------------------------------------------------------- expected (L0)


def expected_counts(
    p_heads: Sequence[Tensor], p_ffn: Sequence[Tensor], p_mha: Tensor | None = None, p_ffnlayer: Tensor | None = None
) -> list[tuple[Tensor, Tensor]]:
    """Per-layer expected (heads, units): sum of P(open), times the layer's sublayer P(open) if given."""
    _check_layers(len(p_heads), len(p_ffn))
    n = len(p_heads)
    for name, p in (("p_mha", p_mha), ("p_ffnlayer", p_ffnlayer)):
        if p is not None and tuple(p.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},), one probability per layer, got {tuple(p.shape)}")
    counts = []
    for i, (ph, pf) in enumerate(zip(p_heads, p_ffn)):
        h, f = ph.sum(), pf.sum()
        # Gates are independent, so E[z_layer * sum z_unit] = P(layer open) * sum P(unit open).
        if p_mha is not None:
            h = h * p_mha[i]
        if p_ffnlayer is not None:
            f = f * p_ffnlayer[i]
        counts.append((h, f))
    return counts


def expected_flops(
    p_heads: Sequence[Tensor],
    p_ffn: Sequence[Tensor],
    hidden: int,
    head_dim: int,
    seq: int,
    p_mha: Tensor | None = None,
    p_ffnlayer: Tensor | None = None,
) -> Tensor:
    """Expected encoder FLOPs per token (differentiable scalar); p_heads[l] (H_l,), p_ffn[l] (F_l,)."""
    counts = expected_counts(p_heads, p_ffn, p_mha, p_ffnlayer)
    return torch.stack([token_flops(h, f, hidden, head_dim, seq) for h, f in counts]).sum()


def expected_params(
    p_heads: Sequence[Tensor],
    p_ffn: Sequence[Tensor],
    hidden: int,
    head_dim: int,
    p_mha: Tensor | None = None,
    p_ffnlayer: Tensor | None = None,
) -> Tensor:
    """Expected prunable encoder parameters (differentiable scalar); arguments as `expected_flops`."""
    counts = expected_counts(p_heads, p_ffn, p_mha, p_ffnlayer)
    return torch.stack([layer_params(h, f, hidden, head_dim) for h, f in counts]).sum()


def sparsity(kept: Count, dense: int | float) -> Count:
    """Fraction of cost removed, 1 - kept / dense (works on ints and Tensors)."""
    if dense <= 0:
        raise ValueError(f"dense cost must be positive, got {dense}")
    return 1 - kept / dense


# ------------------------------------------------------------------------------------------- whole shapes


@dataclass(frozen=True)
class LayerFlops:
    """FLOPs of one layer for a whole (batch, seq) forward, split by part."""

    qkv: int
    attention: int
    out_proj: int
    ffn: int

    @property
    def total(self) -> int:
        """All FLOPs of the layer."""
        return self.qkv + self.attention + self.out_proj + self.ffn


def layer_flops(hidden: int, heads: int, head_dim: int, ffn: int, batch: int, seq: int) -> LayerFlops:
    """FLOPs of one layer keeping `heads` heads and `ffn` units, for `batch` sequences of `seq` tokens, by part."""
    tokens, width = batch * seq, heads * head_dim
    return LayerFlops(
        qkv=tokens * 2 * hidden * 3 * width,
        attention=tokens * 2 * 2 * seq * width,
        out_proj=tokens * 2 * width * hidden,
        ffn=tokens * 2 * 2 * hidden * ffn,
    )


def encoder_flops_by_layer(cfg: EncoderConfig, batch: int, seq: int) -> list[LayerFlops]:
    """Per-layer FLOPs of `cfg`'s encoder for a padding-free batch of `batch` sequences of `seq` tokens."""
    return [layer_flops(cfg.hidden, h, cfg.head_dim, f, batch, seq) for h, f in zip(cfg.heads, cfg.ffn)]


def encoder_flops(cfg: EncoderConfig, batch: int = 1, seq: int = 384) -> int:
    """Total encoder FLOPs of one forward over `batch` sequences of `seq` tokens."""
    return batch * seq * exact_flops(cfg.heads, cfg.ffn, cfg.hidden, cfg.head_dim, seq)


def encoder_flops_varlen(cfg: EncoderConfig, seqlens: Sequence[int]) -> int:
    """Total encoder FLOPs for a packed batch with the given sequence lengths (no padding)."""
    return sum(encoder_flops(cfg, 1, s) for s in seqlens if s > 0)


def flop_sparsity(pruned: EncoderConfig, dense: EncoderConfig, seq: int = 384) -> float:
    """Fraction of the dense encoder's FLOPs that `pruned` removes, at sequence length `seq`."""
    return 1.0 - encoder_flops(pruned, 1, seq) / encoder_flops(dense, 1, seq)


def encoder_params(cfg: EncoderConfig) -> int:
    """Prunable encoder parameters of `cfg` (see the module docstring for what counts)."""
    return exact_params(cfg.heads, cfg.ffn, cfg.hidden, cfg.head_dim)


def param_sparsity(pruned: EncoderConfig, dense: EncoderConfig) -> float:
    """Fraction of the dense encoder's prunable parameters that `pruned` removes."""
    return 1.0 - encoder_params(pruned) / encoder_params(dense)
