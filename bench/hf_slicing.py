"""Stock `transformers` models physically sliced by a pruning spec: the "HF sliced" benchmark provider.

A pruned head or FFN unit is removed from the weights, not masked: Q/K/V keep only the rows of the kept
heads, the attention output projection and the FFN output projection keep only the matching input
columns, and the FFN input projection keeps only the kept rows. Every bias stays (post-LN semantics,
docs/DESIGN.md). Each layer's self-attention gets its own head count through the attributes transformers reads
when it reshapes (`num_attention_heads`, `attention_head_size`, `all_head_size`, in transformers 4.x and 5).
A layer that keeps no heads gets `NoHeads` in place of its self-attention, so the block computes
`LayerNorm(x + b_O)`. An FFN with no units is left as `nn.Linear(d, 0)` followed by `nn.Linear(0, d)`, and
that already yields the bias alone.

The result equals the masked-HF reference (`engine.reference.masked_hf_model`) up to float rounding, which
is tested in tests/test_hf_slicing.py. Unlike the reference, it does only the pruned model's FLOPs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from engine.checkpoint import load_checkpoint
from engine.reference import hf_model
from engine.spec import PruneSpec


class NoHeads(nn.Module):
    """Self-attention of a layer that keeps no heads: an empty `[B, S, 0]` context (the output bias remains)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        """`[B, S, d]` -> (`[B, S, 0]`, no attention weights)."""
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding copies of `weight` `[out, in]` and `bias` `[out]` (no random init, no zero-size warning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    out.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        out.bias = nn.Parameter(bias.detach().clone())
    return out


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    """Only output features `rows` of `linear` (bias included)."""
    rows = rows.to(linear.weight.device)
    return _linear(linear.weight[rows], linear.bias[rows] if linear.bias is not None else None)


def _keep_cols(linear: nn.Linear, cols: torch.Tensor) -> nn.Linear:
    """Only input features `cols` of `linear` (the bias is unchanged)."""
    return _linear(linear.weight[:, cols.to(linear.weight.device)], linear.bias)


def slice_hf_model(model: nn.Module, spec: PruneSpec, head_dim: int) -> nn.Module:
    """Slice a BERT/RoBERTa HF model by `spec`, in place, and return it (see the module docstring)."""
    base = getattr(model, model.base_model_prefix)
    layers = base.encoder.layer
    if len(layers) != len(spec.layers):
        raise ValueError(f"spec has {len(spec.layers)} layers but the model has {len(layers)}")
    for layer, keep in zip(layers, spec.layers):
        att = layer.attention
        heads = torch.tensor(keep.heads, dtype=torch.long)
        cols = (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)  # kept context columns
        att.output.dense = _keep_cols(att.output.dense, cols)
        if keep.heads:
            sa = att.self
            sa.query, sa.key, sa.value = (
                _keep_rows(sa.query, cols),
                _keep_rows(sa.key, cols),
                _keep_rows(sa.value, cols),
            )
            sa.num_attention_heads = len(keep.heads)
            sa.attention_head_size = head_dim
            sa.all_head_size = len(keep.heads) * head_dim
        else:
            att.self = NoHeads()
        units = torch.tensor(keep.ffn, dtype=torch.long)
        layer.intermediate.dense = _keep_rows(layer.intermediate.dense, units)
        layer.output.dense = _keep_cols(layer.output.dense, units)
    return model


def sliced_hf_model(src: str | Path, spec: PruneSpec | None, attn_implementation: str = "sdpa") -> nn.Module:
    """Stock HF QA model of the dense checkpoint `src`, sliced by `spec` (unchanged when `spec` is None)."""
    model = hf_model(src, attn_implementation)
    if spec is None:
        return model
    return slice_hf_model(model, spec, load_checkpoint(src).cfg.head_dim)
