"""The gated student: hard-concrete gates on heads, FFN units and (optionally) whole sublayers.

The gated model wraps a `RaggedQAModel` and reuses its parameters; gates live only here, never in the
inference model. Where the gates act (per layer, packed tokens `[T, d]`):

    ctx = attention(...) * z_head (per head)                   # (T, h*dh)
    x   = LN1(x + z_mha * (ctx @ Oᵀ + b_O))                     # z_mha = 1 without sublayer gates
    u   = act(x @ W_inᵀ + b_in) * z_unit                       # (T, f)
    x   = LN2(x + z_ffn * (u @ W_outᵀ + b_out))

`export_ragged` cuts every unit whose deterministic gate is 0 and folds surviving gate values into the
following weight matrix (and, for sublayer gates, into the bias; a closed sublayer keeps a zero bias), so
the gated model in eval mode and its exported ragged model compute the same function.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import EncoderConfig
from engine.flops import exact_flops, exact_params, expected_counts, expected_flops, expected_params
from engine.latency_table import LatencyTable, dense_latency, expected_latency
from engine.model import RaggedQAModel, attention_packed
from engine.prune.gates import HardConcreteGate


class GatedQAModel(nn.Module):
    """A RaggedQAModel with hard-concrete gates; same packed forward signature as the model it wraps."""

    def __init__(self, base: RaggedQAModel, sublayer_gates: bool = False, init_prob: float = 0.95):
        super().__init__()
        self.base = base
        cfg = base.cfg
        self.head_gates = nn.ModuleList(HardConcreteGate(max(h, 1), init_prob) for h in cfg.heads)
        self.ffn_gates = nn.ModuleList(HardConcreteGate(max(f, 1), init_prob) for f in cfg.ffn)
        self.mha_gate = HardConcreteGate(cfg.num_layers, init_prob) if sublayer_gates else None
        self.ffn_layer_gate = HardConcreteGate(cfg.num_layers, init_prob) if sublayer_gates else None

    @property
    def cfg(self) -> EncoderConfig:
        """The wrapped model's (pre-export) config."""
        return self.base.cfg

    def gate_parameters(self) -> list[nn.Parameter]:
        """All log_alpha parameters (trained with their own learning rate)."""
        gates = [*self.head_gates, *self.ffn_gates, self.mha_gate, self.ffn_layer_gate]
        return [g.log_alpha for g in gates if g is not None]

    def model_parameters(self) -> list[nn.Parameter]:
        """The wrapped model's weights."""
        return list(self.base.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        output_hidden_states: bool = False,
    ):
        """Packed `[T]` ids -> start/end logits `[T]` (+ hidden states); gates sampled once per call in training."""
        base = self.base
        x = base.embed(input_ids, token_type_ids, cu_seqlens)
        hidden = [x]
        z_mha = self.mha_gate() if self.mha_gate is not None else None
        z_ffl = self.ffn_layer_gate() if self.ffn_layer_gate is not None else None
        for i, layer in enumerate(base.layers):
            if layer.heads:
                z = self.head_gates[i]().repeat_interleave(layer.head_dim)  # (h*dh,)
                qkv = layer.qkv(x).view(-1, 3, layer.heads, layer.head_dim)
                ctx = attention_packed(qkv, cu_seqlens, max_seqlen) * z
                a = torch.addmm(layer.o.bias, ctx, layer.o.weight.t())
            else:
                a = layer.o.bias.expand_as(x)
            if z_mha is not None:
                a = a * z_mha[i]
            x = layer.ln1(x + layer.drop(a))
            if layer.ffn_width:
                u = layer.act(layer.ffn_in(x)) * self.ffn_gates[i]()
                f = torch.addmm(layer.ffn_out.bias, u, layer.ffn_out.weight.t())
            else:
                f = layer.ffn_out.bias.expand_as(x)
            if z_ffl is not None:
                f = f * z_ffl[i]
            x = layer.ln2(x + layer.drop(f))
            if output_hidden_states:
                hidden.append(x)
        logits = base.qa(x)
        start, end = logits[:, 0].contiguous(), logits[:, 1].contiguous()
        return (start, end, hidden) if output_hidden_states else (start, end)

    # ------------------------------------------------------------------ sparsity bookkeeping

    def _probs(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        cfg = self.cfg
        ph = [g.prob_nonzero()[:h] for g, h in zip(self.head_gates, cfg.heads)]
        pf = [g.prob_nonzero()[:f] for g, f in zip(self.ffn_gates, cfg.ffn)]
        pm = self.mha_gate.prob_nonzero() if self.mha_gate is not None else None
        pl = self.ffn_layer_gate.prob_nonzero() if self.ffn_layer_gate is not None else None
        return ph, pf, pm, pl

    def expected_counts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer expected kept (heads, FFN units), 0-d tensors: sums of P(gate != 0), times the sublayer's."""
        return expected_counts(*self._probs())

    def expected_sparsity(
        self, dense: EncoderConfig, seq_len: int, by: str = "flops", table: LatencyTable | None = None
    ) -> torch.Tensor:
        """Differentiable expected fraction of `dense`'s encoder FLOPs, params or (with `table`) predicted latency
        removed by the gates; for latency `1 - expected_latency / dense_latency` (the empty model's `base` stays)."""
        if by == "latency":
            if table is None:
                raise ValueError("expected latency sparsity needs a latency table (engine.latency.load_or_measure)")
            counts = self.expected_counts()
            ms = expected_latency(table, [h for h, _ in counts], [f for _, f in counts])
            return 1 - ms / dense_latency(table)
        ph, pf, pm, pl = self._probs()
        if by == "flops":
            kept = expected_flops(ph, pf, dense.hidden, dense.head_dim, seq_len, pm, pl)
            full = exact_flops(dense.heads, dense.ffn, dense.hidden, dense.head_dim, seq_len)
        elif by == "params":
            kept = expected_params(ph, pf, dense.hidden, dense.head_dim, pm, pl)
            full = exact_params(dense.heads, dense.ffn, dense.hidden, dense.head_dim)
        else:
            raise ValueError(f"sparsity is measured by 'flops', 'params' or 'latency', got {by!r}")
        return 1 - kept / full

    def keep_masks(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer boolean masks of kept heads and FFN units under deterministic gates (sublayers included)."""
        cfg = self.cfg
        heads = [g.keep_mask()[:h] for g, h in zip(self.head_gates, cfg.heads)]
        ffn = [g.keep_mask()[:f] for g, f in zip(self.ffn_gates, cfg.ffn)]
        if self.mha_gate is not None:
            heads = [m & bool(k) for m, k in zip(heads, self.mha_gate.keep_mask())]
            ffn = [m & bool(k) for m, k in zip(ffn, self.ffn_layer_gate.keep_mask())]
        return heads, ffn


@torch.no_grad()
def export_ragged(gated: GatedQAModel) -> tuple[EncoderConfig, dict[str, torch.Tensor]]:
    """Cut closed heads/units and fold surviving deterministic gate values; returns (ragged cfg, state dict)."""
    cfg = gated.cfg
    state = {k: v.detach().clone() for k, v in gated.base.state_dict().items()}
    dh = cfg.head_dim
    heads_out, ffn_out = [], []
    z_mha = gated.mha_gate.deterministic() if gated.mha_gate is not None else torch.ones(cfg.num_layers)
    z_ffl = gated.ffn_layer_gate.deterministic() if gated.ffn_layer_gate is not None else torch.ones(cfg.num_layers)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        zh = gated.head_gates[i].deterministic()[: cfg.heads[i]] * z_mha[i]
        zf = gated.ffn_gates[i].deterministic()[: cfg.ffn[i]] * z_ffl[i]
        hk = torch.nonzero(zh > 0).flatten()
        fk = torch.nonzero(zf > 0).flatten()
        cols = (hk[:, None] * dh + torch.arange(dh)[None, :]).reshape(-1)
        width = cfg.heads[i] * dh
        rows = torch.cat([cols + j * width for j in range(3)])
        state[p + "qkv.weight"] = state[p + "qkv.weight"][rows].contiguous()
        state[p + "qkv.bias"] = state[p + "qkv.bias"][rows].contiguous()
        # Head gates scale ctx columns; the sublayer gate scales the whole output, bias included.
        state[p + "o.weight"] = (state[p + "o.weight"][:, cols] * zh[hk].repeat_interleave(dh)[None, :]).contiguous()
        state[p + "o.bias"] = state[p + "o.bias"] * z_mha[i]
        state[p + "ffn_in.weight"] = state[p + "ffn_in.weight"][fk].contiguous()
        state[p + "ffn_in.bias"] = state[p + "ffn_in.bias"][fk].contiguous()
        state[p + "ffn_out.weight"] = (state[p + "ffn_out.weight"][:, fk] * zf[fk][None, :]).contiguous()
        state[p + "ffn_out.bias"] = state[p + "ffn_out.bias"] * z_ffl[i]
        heads_out.append(len(hk))
        ffn_out.append(len(fk))
    return cfg.with_shape(tuple(heads_out), tuple(ffn_out)), state
