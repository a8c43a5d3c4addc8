"""Mask search under a cost budget (FLOPs or a latency table) and within-layer mask rearrangement (Kwon et al.)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.config import EncoderConfig
from engine.flops import encoder_flops

# cost(heads per layer, FFN units per layer) -> cost of that ragged shape (FLOPs, or ms from a latency table)
CostFn = Callable[[Sequence[int], Sequence[int]], float]


def flops_cost(dense: EncoderConfig, seq_len: int) -> CostFn:
    """Encoder FLOPs of one sequence of `seq_len` tokens (engine.flops), as a cost function of the shape."""
    return lambda heads, ffn: float(encoder_flops(dense.with_shape(tuple(heads), tuple(ffn)), 1, seq_len))


@dataclass(frozen=True)
class SearchResult:
    """Kept-unit masks (bool, per layer) and what the search saw."""

    head_masks: list[torch.Tensor]
    ffn_masks: list[torch.Tensor]
    cost: float
    kept_fisher: float
    heads_kept: int


def _ranked(scores: Sequence[torch.Tensor]) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Units (layer, index) by descending score, and the cumulative score of the top-n for n = 0..N."""
    units = [(float(s[j]), l, j) for l, s in enumerate(scores) for j in range(len(s))]
    units.sort(key=lambda u: (-u[0], u[1], u[2]))
    cum = torch.zeros(len(units) + 1, dtype=torch.float64)
    if units:
        cum[1:] = torch.tensor([u[0] for u in units], dtype=torch.float64).cumsum(0)
    return [(l, j) for _, l, j in units], cum


def _counts(order: list[tuple[int, int]], n_layers: int) -> torch.Tensor:
    """`[N+1, L]`: how many of the top-n units fall in each layer."""
    out = torch.zeros(len(order) + 1, n_layers, dtype=torch.long)
    for n, (l, _) in enumerate(order):
        out[n + 1] = out[n]
        out[n + 1, l] += 1
    return out


def _masks(order: list[tuple[int, int]], n: int, sizes: Sequence[int]) -> list[torch.Tensor]:
    masks = [torch.zeros(s, dtype=torch.bool) for s in sizes]
    for l, j in order[:n]:
        masks[l][j] = True
    return masks


def search(
    head_scores: Sequence[torch.Tensor], ffn_scores: Sequence[torch.Tensor], cost: CostFn, budget: float
) -> SearchResult:
    """Kwon et al.'s mask search: for every number of kept heads n_h (the n_h most important, across layers), keep
    the most important FFN units that still fit `budget`, and return the choice with the largest kept Fisher sum.

    Head and unit scores are diagonal Fisher values of their masks, so they are on one scale (the loss increase a
    pruned unit causes, to second order) and can be compared across kinds. `cost` must not decrease as units are
    added (true of FLOPs and of fitted latency tables), which makes the largest fitting FFN count a binary search.
    """
    n_layers = len(head_scores)
    h_order, h_cum = _ranked(head_scores)
    f_order, f_cum = _ranked(ffn_scores)
    h_counts, f_counts = _counts(h_order, n_layers), _counts(f_order, n_layers)
    best: tuple[float, int, int, float] | None = None
    for nh in range(len(h_order) + 1):
        hc = h_counts[nh].tolist()
        if cost(hc, f_counts[0].tolist()) > budget:
            continue
        lo, hi = 0, len(f_order)  # largest nf with cost <= budget lies in [lo, hi]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if cost(hc, f_counts[mid].tolist()) <= budget:
                lo = mid
            else:
                hi = mid - 1
        score = float(h_cum[nh] + f_cum[lo])
        if best is None or score > best[0]:
            best = (score, nh, lo, cost(hc, f_counts[lo].tolist()))
    if best is None:
        raise ValueError(
            f"no pruned shape fits the budget {budget:.4g}: even the model with every head and FFN unit "
            f"removed costs {cost([0] * n_layers, [0] * n_layers):.4g}; loosen the target"
        )
    score, nh, nf, c = best
    return SearchResult(
        _masks(h_order, nh, [len(s) for s in head_scores]),
        _masks(f_order, nf, [len(s) for s in ffn_scores]),
        c,
        score,
        nh,
    )


def pruned_objective(grads: torch.Tensor, keep: torch.Tensor) -> float:
    """Kwon et al.'s within-layer objective: `(1-m)^T F (1-m)` with the empirical Fisher `F = G^T G` of the
    layer's mask gradients `grads` `[n_batches, n]`, i.e. the squared norm of the summed gradients of pruned units."""
    return float(grads.double()[:, ~keep].sum(1).pow(2).sum())


def rearrange(grads: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Greedy swap within one layer, keeping the number of kept units: minimises `pruned_objective`.

    Start from `keep` (the search's choice: within a layer, the units with the largest diagonal Fisher); then take
    the kept units one at a time (in increasing Fisher order), add each to the pruned set and drop from that set
    the unit whose removal leaves the smallest objective. Dropping the unit just added restores the previous set,
    so no step raises the objective.
    """
    n, n_keep = keep.numel(), int(keep.sum())
    if n_keep in (0, n):
        return keep.clone()
    g = grads.double().t().contiguous()  # (n, n_batches)
    diag = g.pow(2).sum(1)
    pruned = torch.nonzero(~keep).flatten().tolist()
    kept = torch.nonzero(keep).flatten()
    total = g[pruned].sum(0)  # (n_batches,)
    for idx in kept[diag[kept].argsort()].tolist():
        cand = pruned + [idx]
        total = total + g[idx]
        left = (total[None, :] - g[cand]).pow(2).sum(1)  # objective after dropping each candidate
        drop = int(left.argmin())
        total = total - g[cand[drop]]
        del cand[drop]
        pruned = cand
    out = torch.ones(n, dtype=torch.bool)
    out[pruned] = False
    return out
