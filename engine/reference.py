"""Independent references built from stock `transformers`: the masked-HF model (docs/DESIGN.md) for ragged parity.

A model keeping heads K equals the dense HF model whose pruned heads' input columns of
`attention.output.dense.weight` are zeroed; a pruned FFN unit equals its zeroed input column of
`output.dense.weight`. Biases stay. This needs no pruning support in `transformers`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.checkpoint import load_checkpoint
from engine.hf import ours_to_hf
from engine.spec import PruneSpec


def hf_model(src: str | Path, attn_implementation: str = "eager") -> torch.nn.Module:
    """Stock HF `*ForQuestionAnswering` for a dense checkpoint dir (a bare encoder gets our seeded QA head)."""
    from transformers import AutoConfig, BertForQuestionAnswering, RobertaForQuestionAnswering

    ck = load_checkpoint(src)
    if ck.is_ragged:
        raise ValueError(f"{src} is a ragged checkpoint; stock transformers cannot load it")
    config = AutoConfig.from_pretrained(str(src))
    config._attn_implementation = attn_implementation
    cls = BertForQuestionAnswering if ck.cfg.architecture.value == "bert" else RobertaForQuestionAnswering
    model = cls(config)
    missing, unexpected = model.load_state_dict(ours_to_hf(ck.state, ck.cfg), strict=False)
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise KeyError(f"HF key parity failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def mask_hf_model(model: torch.nn.Module, spec: PruneSpec, head_dim: int) -> torch.nn.Module:
    """Zero the O input columns of pruned heads and FFN-out input columns of pruned units, in place."""
    base = getattr(model, model.base_model_prefix)
    with torch.no_grad():
        for layer, keep in zip(base.encoder.layer, spec.layers):
            o = layer.attention.output.dense.weight  # [d, H*dh]
            head_mask = torch.zeros(o.shape[1] // head_dim, dtype=torch.bool)
            head_mask[list(keep.heads)] = True
            o.mul_(head_mask.repeat_interleave(head_dim).to(o.dtype)[None, :])
            w2 = layer.output.dense.weight  # [d, F]
            unit_mask = torch.zeros(w2.shape[1], dtype=torch.bool)
            unit_mask[list(keep.ffn)] = True
            w2.mul_(unit_mask.to(w2.dtype)[None, :])
    return model


def masked_hf_model(src: str | Path, spec: PruneSpec | None, attn_implementation: str = "eager") -> torch.nn.Module:
    """Stock HF QA model of `src`, masked by `spec` (unmasked when `spec` is None)."""
    model = hf_model(src, attn_implementation)
    if spec is None:
        return model
    ck = load_checkpoint(src)
    return mask_hf_model(model, spec, ck.cfg.head_dim)
