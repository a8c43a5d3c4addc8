"""From trained gates to a ragged checkpoint: calibrate the deterministic gates to the target, then cut and fold."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch

from engine.config import EncoderConfig
from engine.flops import exact_flops, exact_params
from engine.latency_table import LatencyTable
from engine.latency_timer import Shape
from engine.prune.gated import GatedQAModel

OPEN, CLOSED = 10.0, -10.0  # log_alpha values whose deterministic gates are exactly 1 and exactly 0
# cost(heads per layer, FFN units per layer) of a ragged shape: FLOPs per token, params, or predicted ms
ShapeCost = Callable[[Sequence[int], Sequence[int]], float]


def shape_cost(dense: EncoderConfig, seq_len: int, by: str, table: LatencyTable | None = None) -> ShapeCost:
    """The cost sparsity is measured in: encoder FLOPs per token at `seq_len`, prunable params, or latency (ms)
    predicted by `table` (which includes the empty model's `base`)."""
    if by == "flops":
        return lambda h, f: float(exact_flops(h, f, dense.hidden, dense.head_dim, seq_len))
    if by == "params":
        return lambda h, f: float(exact_params(h, f, dense.hidden, dense.head_dim))
    if by == "latency":
        if table is None:
            raise ValueError("latency sparsity needs a latency table (engine.latency.load_or_measure)")
        return table.predict
    raise ValueError(f"sparsity is measured by 'flops', 'params' or 'latency', got {by!r}")


def achieved_sparsity(
    cfg: EncoderConfig, dense: EncoderConfig, seq_len: int, by: str, table: LatencyTable | None = None
) -> float:
    """Exact fraction of `dense`'s encoder FLOPs, prunable params or predicted latency (`table`) removed by `cfg`."""
    cost = shape_cost(dense, seq_len, by, table)
    return 1.0 - cost(cfg.heads, cfg.ffn) / cost(dense.heads, dense.ffn)


def deterministic_shape(gated: GatedQAModel) -> EncoderConfig:
    """The ragged shape the deterministic gates keep."""
    heads, ffn = gated.keep_masks()
    return gated.cfg.with_shape(tuple(int(m.sum()) for m in heads), tuple(int(m.sum()) for m in ffn))


@torch.no_grad()
def calibrate(
    gated: GatedQAModel,
    dense: EncoderConfig,
    target: float,
    seq_len: int = 384,
    by: str = "flops",
    tol: float = 0.005,
    table: LatencyTable | None = None,
) -> dict[str, float]:
    """Make the deterministic gates meet `target` within about `tol`, re-ranking heads and units by log_alpha.

    The Lagrangian steers *expected* sparsity; deterministic gates can land slightly off. When they miss by
    more than `tol`, heads and units are kept in order of log_alpha while the cost of the kept shape fits the
    budget `(1 - target) * cost(dense)`, and the rest are closed; units newly opened get gate 1, and the
    fixed-structure fine-tune that follows adapts. FLOPs and params (engine.flops) round each unit to the
    nearest side of the budget; latency (`table`: a budget the deployed model must meet) is strict: the cut
    model's predicted latency never exceeds the budget, and it is recalibrated when it does, or when it is more
    than `tol` faster than needed. Returns the achieved sparsity before and after, and how many gates changed.
    """
    cost = shape_cost(dense, seq_len, by, table)
    full = cost(dense.heads, dense.ffn)
    before = achieved_sparsity(deterministic_shape(gated), dense, seq_len, by, table)
    strict = by == "latency"
    if (0.0 <= before - target <= tol) if strict else abs(before - target) <= tol:
        return {"before": before, "after": before, "changed": 0}
    cfg = gated.cfg
    open_h = [True] * cfg.num_layers if gated.mha_gate is None else gated.mha_gate.keep_mask().tolist()
    open_f = [True] * cfg.num_layers if gated.ffn_layer_gate is None else gated.ffn_layer_gate.keep_mask().tolist()
    cands = []  # (log_alpha, layer, 0 = heads / 1 = FFN, gate module, index); closed sublayers stay closed
    for i in range(cfg.num_layers):
        for kind, gate, n, is_open in (
            (0, gated.head_gates[i], cfg.heads[i], open_h[i]),
            (1, gated.ffn_gates[i], cfg.ffn[i], open_f[i]),
        ):
            if is_open:
                cands += [(float(gate.log_alpha[j]), i, kind, gate, j) for j in range(n)]
    counts = [[0] * cfg.num_layers, [0] * cfg.num_layers]  # kept heads, kept FFN units per layer
    budget, kept, changed = (1 - target) * full, cost(*counts), 0
    for _, i, kind, gate, j in sorted(cands, key=lambda c: -c[0]):
        is_kept = bool(gate.deterministic()[j] > 0)
        counts[kind][i] += 1
        with_it = cost(*counts)
        if with_it <= budget + (0.0 if strict else 0.5 * (with_it - kept)):  # FLOPs/params: to the nearest unit
            kept = with_it
            if not is_kept:
                gate.log_alpha[j] = OPEN
                changed += 1
        else:
            counts[kind][i] -= 1
            if is_kept:
                gate.log_alpha[j] = CLOSED
                changed += 1
    after = achieved_sparsity(deterministic_shape(gated), dense, seq_len, by, table)
    return {"before": before, "after": after, "changed": changed}


def calibrate_measured(
    args: argparse.Namespace, gated: GatedQAModel, dense: EncoderConfig, table: LatencyTable, budget_ms: float
) -> dict[str, Any]:
    """`calibrate` to a latency budget, then measure the cut shape against the dense one on the engine and
    re-calibrate (from the trained log_alphas) with the budget corrected by the measured / predicted ratio, as
    engine.prune_fast does (engine.latency_target.meet_measured_latency). Leaves the gates of the round closest to
    the measured target; returns its calibration, its budget and every round."""
    from engine.latency_target import meet_measured_latency

    trained = [p.detach().clone() for p in gated.gate_parameters()]

    def choose(budget: float) -> tuple[tuple[float, dict[str, float]], Shape, float]:
        with torch.no_grad():
            for p, v in zip(gated.gate_parameters(), trained):
                p.copy_(v)
        info = calibrate(gated, dense, 1.0 - budget / table.dense_ms(), by="latency", table=table)
        shape = deterministic_shape(gated)
        return (budget, info), (shape.heads, shape.ffn), table.predict(shape.heads, shape.ffn)

    (budget, info), rounds = meet_measured_latency(args, dense, table, budget_ms, choose)
    choose(budget)
    return {**info, "budget_ms": budget, "verification": rounds}
