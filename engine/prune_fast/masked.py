"""The encoder with head and FFN-unit masks (training-free pruning), and Fisher information of those masks.

Masks act where L0 gates act (docs/PRUNING.md): a head's mask multiplies its context columns before the output
projection, an FFN unit's mask multiplies its activation before `ffn_out`. Folding a mask into the weights is
therefore `o.weight[:, head cols] *= m_h` and `ffn_out.weight[:, u] *= m_u` (see `fold_masks`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from engine.config import EncoderConfig
from engine.data.squad import TrainFeature
from engine.model import Layer, RaggedQAModel, attention_packed
from engine.spec import LayerKeep, PruneSpec, apply_spec
from engine.train.batching import collate
from engine.train.losses import span_loss


def head_context(
    layer: Layer, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-head attention context `[T, h*dh]` of `layer` on input `x` `[T, d]` (before the output projection);
    with a bool mask `keep` `[h]`, only the kept heads' `[T, K*dh]` (their Q/K/V rows alone are computed)."""
    if keep is None:
        qkv = layer.qkv(x).view(-1, 3, layer.heads, layer.head_dim)  # (T, 3, h, dh)
        return attention_packed(qkv, cu_seqlens, max_seqlen)
    w = layer.qkv.weight.view(3, layer.heads, layer.head_dim, -1)[:, keep].reshape(-1, x.shape[1])
    b = layer.qkv.bias.view(3, layer.heads, layer.head_dim)[:, keep].reshape(-1)
    qkv = torch.addmm(b, x, w.t()).view(-1, 3, int(keep.sum()), layer.head_dim)  # (T, 3, K, dh)
    return attention_packed(qkv, cu_seqlens, max_seqlen)


def masked_layer(
    layer: Layer,
    x: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    head_mask: torch.Tensor,
    ffn_mask: torch.Tensor,
) -> torch.Tensor:
    """One layer with masks `[h]` and `[f]` on its heads and FFN units: `[T, d]` -> `[T, d]`."""
    if layer.heads:
        ctx = head_context(layer, x, cu_seqlens, max_seqlen) * head_mask.repeat_interleave(layer.head_dim)
        a = torch.addmm(layer.o.bias, ctx, layer.o.weight.t())
    else:
        a = layer.o.bias
    x = layer.ln1(x + a)
    if layer.ffn_width:
        u = layer.act(layer.ffn_in(x)) * ffn_mask  # (T, f)
        f = torch.addmm(layer.ffn_out.bias, u, layer.ffn_out.weight.t())
    else:
        f = layer.ffn_out.bias
    return layer.ln2(x + f)


def masked_forward(
    model: RaggedQAModel,
    head_masks: Sequence[torch.Tensor],
    ffn_masks: Sequence[torch.Tensor],
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed `[T]` ids -> start and end logits `[T]` of `model` with per-layer masks."""
    x = model.embeddings(input_ids, token_type_ids, cu_seqlens)
    for layer, hm, fm in zip(model.layers, head_masks, ffn_masks):
        x = masked_layer(layer, x, cu_seqlens, max_seqlen, hm, fm)
    logits = model.qa(x)
    return logits[:, 0].contiguous(), logits[:, 1].contiguous()


def ones_masks(
    cfg: EncoderConfig,
    requires_grad: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """All-ones head and FFN masks of every layer."""
    return (
        [torch.ones(h, dtype=dtype, device=device, requires_grad=requires_grad) for h in cfg.heads],
        [torch.ones(f, dtype=dtype, device=device, requires_grad=requires_grad) for f in cfg.ffn],
    )


def mask_gradients(
    model: RaggedQAModel, features: Sequence[TrainFeature], batch: int, batches: Sequence[int]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradient of the span loss w.r.t. every mask (all ones), one row per mini-batch of `batch` windows.

    Returns per-layer `[len(batches), h_l]` and `[len(batches), f_l]` for the mini-batches numbered `batches`, on
    the model's device.
    Weights get no gradient, so the backward pass skips the weight-gradient GEMMs. The Fisher score of a unit is
    the sum of its squared gradients over mini-batches (`fisher`).
    """
    cfg = frozen(model).cfg
    hg: list[list[torch.Tensor]] = [[] for _ in cfg.heads]
    fg: list[list[torch.Tensor]] = [[] for _ in cfg.ffn]
    for b in batches:
        dev = model.qa.weight.device
        hm, fm = ones_masks(cfg, requires_grad=True, dtype=model.qa.weight.dtype, device=dev)
        packed, sp, ep = collate(features[b * batch : (b + 1) * batch])
        packed, sp, ep = packed.to(dev), sp.to(dev), ep.to(dev)
        s, e = masked_forward(
            model, hm, fm, packed.input_ids, packed.token_type_ids, packed.cu_seqlens, packed.max_seqlen
        )
        loss = span_loss(s, e, packed.cu_seqlens, packed.max_seqlen, sp, ep)
        grads = torch.autograd.grad(loss, [*hm, *fm], allow_unused=True)
        for l in range(cfg.num_layers):
            for out, g, m in ((hg[l], grads[l], hm[l]), (fg[l], grads[cfg.num_layers + l], fm[l])):
                out.append(torch.zeros_like(m) if g is None else g.detach())
    return (
        [torch.stack(g) if g else torch.zeros(0, h) for g, h in zip(hg, cfg.heads)],
        [torch.stack(g) if g else torch.zeros(0, f) for g, f in zip(fg, cfg.ffn)],
    )


def fisher(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Diagonal empirical Fisher per unit: sum over mini-batches of the squared mask gradient."""
    return [g.double().pow(2).sum(0) for g in grads]


def fold_masks(
    model: RaggedQAModel, head_masks: Sequence[torch.Tensor], ffn_masks: Sequence[torch.Tensor]
) -> tuple[EncoderConfig, dict[str, torch.Tensor]]:
    """Cut every unit whose mask is 0 and fold the other mask values into `o.weight` / `ffn_out.weight` columns;
    returns the ragged config and state dict (the same function as the masked model)."""
    cfg = model.cfg
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for l, (hm, fm) in enumerate(zip(head_masks, ffn_masks)):
        p = f"layers.{l}."
        state[p + "o.weight"] = state[p + "o.weight"] * hm.detach().float().repeat_interleave(cfg.head_dim)[None, :]
        state[p + "ffn_out.weight"] = state[p + "ffn_out.weight"] * fm.detach().float()[None, :]
    spec = PruneSpec(
        tuple(
            LayerKeep(tuple(torch.nonzero(hm).flatten().tolist()), tuple(torch.nonzero(fm).flatten().tolist()))
            for hm, fm in zip(head_masks, ffn_masks)
        )
    )
    return apply_spec(state, cfg, spec)


def frozen(model: nn.Module) -> nn.Module:
    """`model` in eval mode with no parameter requiring gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
