"""From trained gates to a ragged checkpoint: calibrate the deterministic gates to the target, then cut and fold."""

from __future__ import annotations

import torch

from engine.config import EncoderConfig
from engine.flops import encoder_params, flop_sparsity, unit_flops, unit_params
from engine.prune.gated import GatedQAModel

OPEN, CLOSED = 10.0, -10.0  # log_alpha values whose deterministic gates are exactly 1 and exactly 0


def achieved_sparsity(cfg: EncoderConfig, dense: EncoderConfig, seq_len: int, by: str) -> float:
    """Exact fraction of `dense`'s encoder FLOPs (by="flops") or prunable params (by="params") removed by `cfg`."""
    if by == "flops":
        return flop_sparsity(cfg, dense, seq_len)
    return 1.0 - encoder_params(cfg) / encoder_params(dense)


def deterministic_shape(gated: GatedQAModel) -> EncoderConfig:
    """The ragged shape the deterministic gates keep."""
    heads, ffn = gated.keep_masks()
    return gated.cfg.with_shape(tuple(int(m.sum()) for m in heads), tuple(int(m.sum()) for m in ffn))


@torch.no_grad()
def calibrate(
    gated: GatedQAModel, dense: EncoderConfig, target: float, seq_len: int = 384, by: str = "flops", tol: float = 0.005
) -> dict[str, float]:
    """Make the deterministic gates meet `target` within about `tol`, re-ranking heads and units by log_alpha.

    The Lagrangian steers *expected* sparsity; deterministic gates can land slightly off. When they miss by
    more than `tol`, heads and units are kept in order of log_alpha until the target cost is spent and the
    rest are closed; units newly opened get gate 1, and the fixed-structure fine-tune that follows adapts.
    Per-unit costs come from engine.flops (unit_flops / unit_params; costs are linear in heads and units).
    Returns the achieved sparsity before and after, and how many gates changed.
    """
    before = achieved_sparsity(deterministic_shape(gated), dense, seq_len, by)
    if abs(before - target) <= tol:
        return {"before": before, "after": before, "changed": 0}
    cfg = gated.cfg
    if by == "flops":
        head_cost, unit_cost = unit_flops(dense.hidden, dense.head_dim, seq_len)
    else:
        head_cost, unit_cost = unit_params(dense.hidden, dense.head_dim)
    full = sum(h * head_cost + f * unit_cost for h, f in zip(dense.heads, dense.ffn))
    open_h = [True] * cfg.num_layers if gated.mha_gate is None else gated.mha_gate.keep_mask().tolist()
    open_f = [True] * cfg.num_layers if gated.ffn_layer_gate is None else gated.ffn_layer_gate.keep_mask().tolist()
    cands = []  # (log_alpha, cost, gate module, index); closed sublayers stay closed
    for i in range(cfg.num_layers):
        for gate, n, cost, is_open in (
            (gated.head_gates[i], cfg.heads[i], head_cost, open_h[i]),
            (gated.ffn_gates[i], cfg.ffn[i], unit_cost, open_f[i]),
        ):
            if is_open:
                cands += [(float(gate.log_alpha[j]), cost, gate, j) for j in range(n)]
    budget, kept, changed = (1 - target) * full, 0.0, 0
    for _, cost, gate, j in sorted(cands, key=lambda c: -c[0]):
        is_kept = bool(gate.deterministic()[j] > 0)
        if kept + cost <= budget + 0.5 * cost:  # keep, rounding to the nearest unit
            kept += cost
            if not is_kept:
                gate.log_alpha[j] = OPEN
                changed += 1
        elif is_kept:
            gate.log_alpha[j] = CLOSED
            changed += 1
    after = achieved_sparsity(deterministic_shape(gated), dense, seq_len, by)
    return {"before": before, "after": after, "changed": changed}
