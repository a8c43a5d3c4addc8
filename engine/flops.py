"""Encoder FLOP counts, as DESIGN.md defines them (multiply-add = 2 FLOPs; embeddings and QA head excluded)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import EncoderConfig


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
    """FLOPs of one layer keeping `heads` heads and `ffn` units, for `batch` sequences of `seq` tokens."""
    tokens = batch * seq
    width = heads * head_dim
    return LayerFlops(
        qkv=tokens * 2 * hidden * 3 * width,
        attention=tokens * 2 * 2 * seq * width,
        out_proj=tokens * 2 * width * hidden,
        ffn=tokens * 2 * 2 * hidden * ffn,
    )


def unit_flops(hidden: int, head_dim: int, seq: int) -> tuple[int, int]:
    """Per-token FLOPs of one attention head and of one FFN unit at sequence length `seq` (layer_flops is linear)."""
    return 2 * hidden * 3 * head_dim + 2 * 2 * seq * head_dim + 2 * head_dim * hidden, 2 * 2 * hidden


def unit_params(hidden: int, head_dim: int) -> tuple[int, int]:
    """Prunable parameters of one attention head and of one FFN unit (as counted by encoder_params)."""
    return 4 * hidden * head_dim + 3 * head_dim, 2 * hidden + 1


def encoder_flops_by_layer(cfg: EncoderConfig, batch: int, seq: int) -> list[LayerFlops]:
    """Per-layer FLOPs of `cfg`'s encoder for a padded-free batch of `batch` sequences of `seq` tokens."""
    return [layer_flops(cfg.hidden, h, cfg.head_dim, f, batch, seq) for h, f in zip(cfg.heads, cfg.ffn)]


def encoder_flops(cfg: EncoderConfig, batch: int = 1, seq: int = 384) -> int:
    """Total encoder FLOPs of one forward over `batch` sequences of `seq` tokens."""
    return sum(lf.total for lf in encoder_flops_by_layer(cfg, batch, seq))


def encoder_flops_varlen(cfg: EncoderConfig, seqlens: list[int]) -> int:
    """Total encoder FLOPs for a packed batch with the given sequence lengths (no padding)."""
    return sum(encoder_flops(cfg, 1, s) for s in seqlens if s > 0)


def flop_sparsity(pruned: EncoderConfig, dense: EncoderConfig, seq: int = 384) -> float:
    """Fraction of the dense encoder's FLOPs that `pruned` removes, at sequence length `seq`."""
    return 1.0 - encoder_flops(pruned, 1, seq) / encoder_flops(dense, 1, seq)


def encoder_params(cfg: EncoderConfig) -> int:
    """Prunable-structure parameter count of the encoder layers (weights and biases, LayerNorms excluded)."""
    d = cfg.hidden
    total = 0
    for h, f in zip(cfg.heads, cfg.ffn):
        w = h * cfg.head_dim
        total += 3 * d * w + 3 * w + w * d + d  # QKV weights+biases, O weight + bias
        total += d * f + f + f * d + d  # FFN in + bias, FFN out + bias
    return total
