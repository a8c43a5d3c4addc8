"""The ragged encoder + QA head in plain PyTorch: the reference and the `torch` CPU backend.

A pruned model is a smaller dense model: layer l has `heads[l]` heads and `ffn[l]` FFN units, with no masks.
Everything runs on packed tokens (`[T, d]`, T = sum of sequence lengths) described by `cu_seqlens`.
Post-LN semantics (docs/DESIGN.md): a layer with 0 heads computes `LayerNorm(x + b_O)`; with 0 FFN units
`LayerNorm(h + b_2)`. Only the GEMMs and attention are skipped, never the bias and LayerNorm.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import Activation, EncoderConfig
from engine.packing import pack, positions, unpack

# Padded attention is used while padding costs at most this factor in tokens (B * S <= PAD_FACTOR * T).
PAD_FACTOR = 1.25

_ACTIVATIONS = {
    Activation.GELU: lambda x: F.gelu(x),
    Activation.GELU_TANH: lambda x: F.gelu(x, approximate="tanh"),
    Activation.RELU: F.relu,
}


def _keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """Bool mask of `shape`, each element True with probability 1 - p (p rounded to a multiple of 2^-16).

    Each 64-bit draw of torch's generator gives four 16-bit uniforms, so a mask costs a quarter of the draws that
    `bernoulli_` makes (one per element): on the CPU that is most of hidden-state dropout's time (docs/TRAINING.md).
    """
    n = shape.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)  # uniform 64-bit words
    return words.view(torch.int16)[:n].view(shape) >= -32768 + round(p * 65536)


class Dropout(nn.Module):
    """Hidden-state dropout (as `nn.Dropout`; a no-op in eval). On the CPU its mask comes from `_keep_mask`."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.p == 1.0:
            return F.dropout(x, self.p, True)
        return x * _keep_mask(x.shape, self.p).to(x.dtype) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def attention_packed(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """Bidirectional attention over packed `qkv` `[T, 3, h, dh]` -> `[T, h*dh]`, one sequence never sees another.

    bf16 `qkv` on the CPU (bf16 autocast training) is attended in fp32 and returned in fp32: the CPU's SDPA forward
    + backward is slower in bf16 than in fp32 (docs/TRAINING.md, "Speed on CPU"), and bf16 only adds error there,
    as in the engine's bf16 artifacts (docs/PRECISION.md).
    """
    if qkv.device.type == "cpu" and qkv.dtype == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):
            return attention_packed(qkv.float(), cu_seqlens, max_seqlen)
    total, _, h, dh = qkv.shape
    batch = cu_seqlens.numel() - 1
    if batch > 0 and total == batch * max_seqlen:
        # Every sequence has the same length: one batched call, no padding anywhere.
        q, k, v = qkv.view(batch, max_seqlen, 3, h, dh).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, S, dh) each
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, S, dh)
        return out.transpose(1, 2).reshape(total, h * dh)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.long)  # (B,)
    if batch > 0 and batch * max_seqlen <= PAD_FACTOR * total and bool((lengths > 0).all()):
        # Lengths differ a little (e.g. length-grouped training batches): pad to max_seqlen, mask padded keys,
        # one batched call. Padded query rows are computed and dropped; padded keys get probability 0.
        padded = unpack(qkv, cu_seqlens, max_seqlen)  # (B, S, 3, h, dh)
        q, k, v = padded.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, S, dh) each
        keep = torch.arange(max_seqlen, device=qkv.device)[None, :] < lengths.to(qkv.device)[:, None]  # (B, S)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])  # (B, h, S, dh)
        return pack(out.transpose(1, 2), lengths).reshape(total, h * dh)
    # Very uneven lengths: one call per sequence, no padding at all. One split and one cat, so that autograd adds
    # each sequence's gradient into its own rows (slicing qkv per sequence made a zero-filled [T, 3, h, dh] gradient
    # for every sequence: 60% of an fp32 training step at batch 32).
    outs = []
    for piece in qkv.split(lengths.tolist()):
        if piece.shape[0] == 0:
            continue
        q, k, v = piece.permute(1, 2, 0, 3)[:, None].unbind(0)  # (1, h, s, dh) each: 4-D, since 3-D inputs take
        # the CPU's unfused math kernel (1.65x slower forward + backward at (12, 200, 32))
        outs.append(F.scaled_dot_product_attention(q, k, v)[0].transpose(0, 1).reshape(piece.shape[0], h * dh))
    return torch.cat(outs) if outs else qkv.new_empty(0, h * dh)


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden)
        self.ln = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.position_offset = cfg.position_offset

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """`[T]` ids -> `[T, d]` embeddings."""
        pos = positions(cu_seqlens, self.position_offset).to(input_ids.device)
        x = self.word(input_ids) + self.position(pos) + self.token_type(token_type_ids)
        return self.ln(x)


class Layer(nn.Module):
    """One post-LN transformer layer with its own head count and FFN width."""

    def __init__(self, cfg: EncoderConfig, index: int, dropout: float = 0.0):
        super().__init__()
        self.drop = Dropout(dropout)  # training only; a no-op in eval
        d, self.heads, self.head_dim, self.ffn_width = cfg.hidden, cfg.heads[index], cfg.head_dim, cfg.ffn[index]
        width = self.heads * self.head_dim
        with warnings.catch_warnings():  # pruned-away sublayers have zero-element weights; nothing to initialise
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self.qkv = nn.Linear(d, 3 * width)  # rows ordered (q|k|v, head, dh)
            self.o = nn.Linear(width, d)
            self.ffn_in = nn.Linear(d, self.ffn_width)
            self.ffn_out = nn.Linear(self.ffn_width, d)
        self.ln1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.ln2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.act = _ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """`[T, d]` -> `[T, d]`."""
        if self.heads:
            qkv = self.qkv(x).view(-1, 3, self.heads, self.head_dim)  # (T, 3, h, dh)
            ctx = attention_packed(qkv, cu_seqlens, max_seqlen)  # (T, h*dh)
            x = self.ln1(x + self.drop(self.o(ctx)))
        else:
            x = self.ln1(x + self.o.bias)
        if self.ffn_width:
            inner = self.act(self.ffn_in(x))  # (T, f)
            x = self.ln2(x + self.drop(self.ffn_out(inner)))
        else:
            x = self.ln2(x + self.ffn_out.bias)
        return x


class RaggedQAModel(nn.Module):
    """Ragged BERT/RoBERTa encoder + span-extraction head over packed tokens.

    `dropout` (hidden-state dropout, as HF's hidden_dropout_prob) only matters in training mode.
    """

    def __init__(self, cfg: EncoderConfig, dropout: float = 0.0):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.emb_drop = Dropout(dropout)
        self.layers = nn.ModuleList(Layer(cfg, i, dropout) for i in range(cfg.num_layers))
        self.qa = nn.Linear(cfg.hidden, 2)

    def embed(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, cu_seqlens: torch.Tensor
    ) -> torch.Tensor:
        """Packed `[T]` ids (token types None: all 0) -> the first layer's input `[T, d]` (embeddings, dropout)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return self.emb_drop(self.embeddings(input_ids, token_type_ids, cu_seqlens))

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Packed `[T]` ids -> start and end logits `[T]` each (and every layer's `[T, d]` output if asked)."""
        x = self.embed(input_ids, token_type_ids, cu_seqlens)
        hidden = [x]
        for layer in self.layers:
            x = layer(x, cu_seqlens, max_seqlen)
            if output_hidden_states:
                hidden.append(x)
        logits = self.qa(x)  # (T, 2)
        start, end = logits[:, 0].contiguous(), logits[:, 1].contiguous()
        return (start, end, hidden) if output_hidden_states else (start, end)


def expected_shapes(cfg: EncoderConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of `RaggedQAModel(cfg)`'s state dict (the artifact's weight set)."""
    d = cfg.hidden
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word.weight": (cfg.vocab_size, d),
        "embeddings.position.weight": (cfg.max_position_embeddings, d),
        "embeddings.token_type.weight": (cfg.type_vocab_size, d),
        "embeddings.ln.weight": (d,),
        "embeddings.ln.bias": (d,),
    }
    for i, (h, f) in enumerate(zip(cfg.heads, cfg.ffn)):
        w, p = h * cfg.head_dim, f"layers.{i}."
        shapes.update(
            {
                p + "qkv.weight": (3 * w, d),
                p + "qkv.bias": (3 * w,),
                p + "o.weight": (d, w),
                p + "o.bias": (d,),
                p + "ln1.weight": (d,),
                p + "ln1.bias": (d,),
                p + "ffn_in.weight": (f, d),
                p + "ffn_in.bias": (f,),
                p + "ffn_out.weight": (d, f),
                p + "ffn_out.bias": (d,),
                p + "ln2.weight": (d,),
                p + "ln2.bias": (d,),
            }
        )
    shapes["qa.weight"] = (2, d)
    shapes["qa.bias"] = (2,)
    return shapes
