"""Reconstruction-aware selection (`--select obs`): which heads and FFN units each layer keeps, chosen by the error a
least-squares refit is left with, then refitted as they are chosen.

The Fisher search fixes how many heads and units every layer keeps. Kwon et al. then choose *which* ones by the
Fisher quadratic form (rearrangement), which scores a unit as if nothing compensated for its removal; the refit
stage (tune.py) then compensates anyway. Here the choice and the refit are one problem, layer by layer in order, on
the pruned model's own input (as the refit): the features are the dense layer's per-unit outputs on that input
(the head contexts `[T, h*dh]` before `o`, the FFN activations `[T, f]` before `ffn_out`), plus a constant for the
bias; the target is the teacher's pre-LayerNorm output minus the input (tune.py's module docstring). With `H` the
(damped) Gram matrix of the features and `W = H^-1 X^T R` the least-squares weights, removing a group S of
features and re-solving the rest raises the error by `tr(W_S^T [H^-1]_SS^-1 W_S)` (optimal brain surgeon; Hassibi &
Stork 1993, and ZipLM, Kurtic et al. 2023, for structured groups). `obs_remove` removes the cheapest group, updates
`W` and `H^-1` in closed form, and repeats until the layer's count is met; the kept features' weights are then the
ridge solution toward the dense weights (tune.refit_solve), the same solve as the refit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from engine.data.squad import TrainFeature
from engine.model import Layer, RaggedQAModel
from engine.prune_fast.masked import head_context
from engine.prune_fast.tune import (
    REFIT_RIDGE,
    _Chunk,
    _Normal,
    _stacked,
    embedded_chunks,
    ln_rows,
    refit_head,
    refit_solve,
    teacher_attention,
    teacher_ffn,
)

OBS_DAMP = 1e-4  # damping of the selection's Gram matrix, relative to its mean diagonal
OBS_REFRESH = 64  # removals between exact re-inversions of the kept features' Gram matrix (bounds drift)


def _inverse(gram: torch.Tensor, alive: torch.Tensor, lam: float) -> torch.Tensor:
    """`[H + lam I]^-1` over the `alive` features, zero elsewhere (float64)."""
    idx = torch.nonzero(alive).flatten()
    inv = torch.zeros_like(gram)
    sub = gram[idx][:, idx] + lam * torch.eye(len(idx), dtype=gram.dtype, device=gram.device)
    inv[idx[:, None], idx[None, :]] = torch.cholesky_inverse(torch.linalg.cholesky(sub))
    return inv


def obs_remove(
    gram: torch.Tensor, rhs: torch.Tensor, group: int, n_remove: int, damp: float = OBS_DAMP
) -> tuple[list[int], list[float]]:
    """Greedily remove `n_remove` of the `G = (n - 1) // group` feature groups (group g = features
    `[g*group, (g+1)*group)`; the last feature, the bias, is never removed) from the least-squares system
    `gram = X^T X` `[n, n]`, `rhs = X^T R` `[n, d]`, each time the group whose removal (with the other weights
    re-solved) raises `||X W - R||^2` least. Returns the removed groups in removal order, and what each removal
    raised the error by."""
    n = gram.shape[0]
    n_groups = (n - 1) // group
    if n_groups * group != n - 1:
        raise ValueError(f"{n - 1} features do not split into groups of {group}")
    if not 0 <= n_remove <= n_groups:
        raise ValueError(f"cannot remove {n_remove} of {n_groups} groups")
    gram, rhs = gram.double(), rhs.double()
    lam = damp * float(gram.diagonal().mean().clamp_min(1e-30))
    dev = gram.device
    alive = torch.ones(n, dtype=torch.bool, device=dev)
    dead = torch.zeros(n_groups, dtype=torch.bool, device=dev)
    eye = torch.eye(group, dtype=torch.float64, device=dev).expand(n_groups, group, group)
    ar = torch.arange(n_groups, device=dev)
    removed: list[int] = []
    costs: list[float] = []
    inv = w = None
    for step in range(n_remove):
        if step % OBS_REFRESH == 0:
            inv = _inverse(gram, alive, lam)
            w = inv @ rhs
        assert inv is not None and w is not None
        ws = w[: n - 1].view(n_groups, group, -1)  # (G, g, d)
        if group == 1:  # the common FFN case: 1x1 blocks, no batched solve
            blocks = torch.where(dead, 1.0, inv.diagonal()[: n - 1]).view(n_groups, 1, 1)
            crit = ws.pow(2).sum((1, 2)) / blocks.flatten()
        else:
            blocks = inv[: n - 1, : n - 1].view(n_groups, group, n_groups, group)[ar, :, ar, :]  # (G, g, g)
            blocks = torch.where(dead[:, None, None], eye, blocks)
            crit = (ws * torch.linalg.solve(blocks, ws)).sum((1, 2))
        crit[dead] = float("inf")
        g = int(crit.argmin())
        costs.append(max(float(crit[g]), 0.0))
        s = slice(g * group, (g + 1) * group)
        gain = torch.linalg.solve(blocks[g], inv[s])  # (g, n): [H^-1]_SS^-1 [H^-1]_S,:
        w = w - inv[:, s] @ torch.linalg.solve(blocks[g], w[s])
        inv = inv - inv[:, s] @ gain
        alive[s] = False
        dead[g] = True
        removed.append(g)
    return removed, costs


def _select_and_fit(
    system: _Normal, w0: torch.Tensor, group: int, keep_count: int, ridge: float, gain: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keep mask over the groups, kept-feature mask with the bias `[n]`, refitted `[kept features + 1, d]`
    weights) for one sublayer's system; `gain` `[d]` weighs each output's error in the selection by `gain**2`
    (the LayerNorm gain; each output's refit is a separate regression, unchanged by it)."""
    n_groups = (system.gram.shape[0] - 1) // group
    keep = torch.ones(n_groups, dtype=torch.bool, device=system.gram.device)
    rhs = system.rhs if gain is None else system.rhs * gain.double()[None, :]
    keep[obs_remove(system.gram, rhs, group, n_groups - keep_count)[0]] = False
    cols = torch.cat([keep.repeat_interleave(group), keep.new_ones(1)])
    idx = torch.nonzero(cols).flatten()
    w = refit_solve(system.gram[idx][:, idx], system.rhs[idx], w0[idx], ridge)
    return keep, cols, w


@torch.inference_mode()
def obs_prune(
    teacher: RaggedQAModel,
    features: Sequence[TrainFeature],
    head_counts: Sequence[int],
    ffn_counts: Sequence[int],
    batch: int = 32,
    head: bool = True,
    ridge: float = REFIT_RIDGE,
    progress: bool = True,
    ln_weighted: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, torch.Tensor], dict]:
    """Choose `head_counts[l]` heads and `ffn_counts[l]` FFN units of every layer of the dense `teacher` and refit
    their output projections (module docstring), then the QA head (with `head`) as `tune.refit_projections` does.
    With `ln_weighted`, errors are measured after each sublayer's LayerNorm, to first order (`tune.ln_rows`, and
    the LayerNorm gain on each output in the selection).

    Returns the keep masks (heads `[h]`, units `[f]` per layer), the refitted tensors by the *pruned* model's
    state-dict names (`layers.l.o.weight` `[d, K*dh]`, ..., `qa.weight`) and per-layer info (relative errors of
    the dense weights restricted to the kept units, and after the refit). `teacher` may be on any device; what
    comes back is on the CPU.
    """
    teacher.eval()
    cfg = teacher.cfg
    chunks = embedded_chunks(teacher, None, features, batch)
    head_keep: list[torch.Tensor] = []
    ffn_keep: list[torch.Tensor] = []
    out: dict[str, torch.Tensor] = {}
    infos: list[dict] = []
    bar = tqdm(
        total=cfg.num_layers * len(chunks) * 4 + len(chunks) * head, desc="obs", unit="batch", disable=not progress
    )
    for l, t_layer in enumerate(teacher.layers):
        info: dict = {}
        hk, w = _attention(t_layer, chunks, head_counts[l], ridge, info, bar, ln_weighted)
        head_keep.append(hk.cpu())
        out[f"layers.{l}.o.weight"], out[f"layers.{l}.o.bias"] = w[:-1].t().cpu().contiguous(), w[-1].cpu().clone()
        fk, w = _ffn(t_layer, chunks, ffn_counts[l], ridge, info, bar, ln_weighted)
        ffn_keep.append(fk.cpu())
        out[f"layers.{l}.ffn_out.weight"] = w[:-1].t().cpu().contiguous()
        out[f"layers.{l}.ffn_out.bias"] = w[-1].cpu().clone()
        info.update(heads_kept=int(hk.sum()), ffn_kept=int(fk.sum()))
        infos.append(info)
    head_info: dict = {}
    if head:
        w = refit_head(teacher.qa, teacher, chunks, head_info, ridge, bar)
        out["qa.weight"], out["qa.bias"] = w[:-1].t().cpu().contiguous(), w[-1].cpu().clone()
    bar.close()
    return head_keep, ffn_keep, out, {"layers": infos, "head": head_info}


def _record(system: _Normal, w0: torch.Tensor, keep_cols: torch.Tensor, w: torch.Tensor, info: dict, kind: str) -> None:
    """Relative errors of the dense weights restricted to the kept features (before) and of the refit (after)."""
    full = torch.zeros_like(w0)
    full[keep_cols] = w0[keep_cols]
    info[f"{kind}_rel_err_before"] = system.rel_err(full)
    full[keep_cols] = w
    info[f"{kind}_rel_err_after"] = system.rel_err(full)


def _attention(
    t_layer: Layer, chunks: list[_Chunk], count: int, ridge: float, info: dict, bar: tqdm, ln_weighted: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select and refit one attention sublayer; moves both models' states past LN1. Returns (head keep `[h]`,
    weights `[K*dh + 1, d]`)."""
    dh, d = t_layer.head_dim, t_layer.o.out_features
    w0 = _stacked(t_layer.o)
    system, targets = _Normal(t_layer.heads * dh, d, w0.device), []
    for c in chunks:
        z = teacher_attention(t_layer, c)
        ctx = head_context(t_layer, c.student, c.cu_seqlens, c.max_seqlen) if t_layer.heads else None
        rows = ln_rows(z, t_layer.ln1 if ln_weighted else None)
        system.add(ctx if ctx is not None else z.new_zeros(len(z), 0), z - c.student, rows)
        targets.append(z)
        bar.update(1)
    gain = t_layer.ln1.weight if ln_weighted else None
    keep, cols, w = _select_and_fit(system, w0, dh, count, ridge, gain)
    _record(system, w0, cols, w, info, "attention")
    for c, z in zip(chunks, targets):
        if bool(keep.any()):
            ctx = head_context(t_layer, c.student, c.cu_seqlens, c.max_seqlen, keep)
            c.student = t_layer.ln1(c.student + torch.addmm(w[-1], ctx, w[:-1]))
        else:
            c.student = t_layer.ln1(c.student + w[-1])
        c.teacher = t_layer.ln1(z)
        bar.update(1)
    return keep, w


def _ffn(
    t_layer: Layer, chunks: list[_Chunk], count: int, ridge: float, info: dict, bar: tqdm, ln_weighted: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select and refit one FFN sublayer; moves both models' states past LN2. Returns (unit keep `[f]`, weights
    `[K + 1, d]`)."""
    d = t_layer.ffn_out.out_features
    w0 = _stacked(t_layer.ffn_out)
    system, targets = _Normal(t_layer.ffn_width, d, w0.device), []
    for c in chunks:
        z = teacher_ffn(t_layer, c.teacher)
        rows = ln_rows(z, t_layer.ln2 if ln_weighted else None)
        system.add(t_layer.act(t_layer.ffn_in(c.student)), z - c.student, rows)
        targets.append(z)
        bar.update(1)
    gain = t_layer.ln2.weight if ln_weighted else None
    keep, cols, w = _select_and_fit(system, w0, 1, count, ridge, gain)
    _record(system, w0, cols, w, info, "ffn")
    w_in, b_in = t_layer.ffn_in.weight[keep], t_layer.ffn_in.bias[keep]
    for c, z in zip(chunks, targets):
        a = t_layer.act(torch.addmm(b_in, c.student, w_in.t()))
        c.student = t_layer.ln2(c.student + torch.addmm(w[-1], a, w[:-1]))
        c.teacher = t_layer.ln2(z)
        bar.update(1)
    return keep, w


# ------------------------------------------------------------------------------------ search scores (--scores obs)


def _path_scores(system: _Normal, w0: torch.Tensor, group: int, fisher: torch.Tensor) -> torch.Tensor:
    """Per-group scores `[G]` of one sublayer for the search: each group's removal cost along the full greedy
    removal path (made non-decreasing along it), converted to the Fisher scale of the layer (see `obs_scores`)."""
    n_groups = (system.gram.shape[0] - 1) // group
    if n_groups == 0:
        return torch.zeros(0, dtype=torch.float64)
    removed, costs = obs_remove(system.gram, system.rhs, group, n_groups)
    w = w0[:-1].double().view(n_groups, group, -1)  # (G, g, d)
    ar = torch.arange(n_groups, device=w.device)
    blocks = system.gram[:-1, :-1].view(n_groups, group, n_groups, group)[ar, :, ar, :]  # (G, g, g)
    alone = torch.einsum("gad,gab,gbd->g", w, blocks, w)  # error of dropping each group with nothing refitted
    scale = float(fisher.double().sum()) / max(float(alone.sum()), 1e-30)  # returned on the CPU, as `fisher` is
    out = torch.zeros(n_groups, dtype=torch.float64)
    out[torch.tensor(removed)] = scale * torch.tensor(costs, dtype=torch.float64).cummax(0).values
    return out


@torch.inference_mode()
def obs_scores(
    teacher: RaggedQAModel,
    features: Sequence[TrainFeature],
    head_fisher: Sequence[torch.Tensor],
    ffn_fisher: Sequence[torch.Tensor],
    batch: int = 32,
    progress: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Scores for the search (`--scores obs`) that price what a refit leaves of each removal, in place of the
    diagonal Fisher, which prices a removal with nothing compensating for it.

    On the dense model's own hidden states, every sublayer's features are removed greedily down to none
    (`obs_remove`); the score of a head or unit is what its removal raised the sublayer's squared error by, on that
    path (non-decreasing along it, so the k most important are the last k removed and the summed scores of the
    removed are the path's error). Errors are in each sublayer's output units, so each sublayer's scores are
    scaled by its Fisher per unit of error: (summed diagonal Fisher of its heads or units) / (summed error of
    dropping each alone, with no refit). Scores then compare across layers and kinds as Fisher values do. The
    errors are pre-LayerNorm whatever --fit-error says: weighting them as after LN (`tune.ln_rows`) was measured
    and lost F1 (docs/PRUNING.md).
    Returns per-layer head scores `[h]` and FFN scores `[f]`, on the CPU (`teacher` may be on any device).
    """
    teacher.eval()
    chunks = embedded_chunks(teacher, None, features, batch)
    dev = teacher.qa.weight.device
    hs: list[torch.Tensor] = []
    fs: list[torch.Tensor] = []
    bar = tqdm(total=teacher.cfg.num_layers * len(chunks) * 2, desc="obs scores", unit="batch", disable=not progress)
    for l, t_layer in enumerate(teacher.layers):
        dh, d = t_layer.head_dim, t_layer.o.out_features
        system = _Normal(t_layer.heads * dh, d, dev)
        for c in chunks:
            z = teacher_attention(t_layer, c)
            if t_layer.heads:
                system.add(head_context(t_layer, c.teacher, c.cu_seqlens, c.max_seqlen), z - c.teacher)
            c.teacher = c.student = t_layer.ln1(z)
            bar.update(1)
        hs.append(_path_scores(system, _stacked(t_layer.o), dh, head_fisher[l]))
        system = _Normal(t_layer.ffn_width, d, dev)
        for c in chunks:
            z = teacher_ffn(t_layer, c.teacher)
            if t_layer.ffn_width:
                system.add(t_layer.act(t_layer.ffn_in(c.teacher)), z - c.teacher)
            c.teacher = c.student = t_layer.ln2(z)
            bar.update(1)
        fs.append(_path_scores(system, _stacked(t_layer.ffn_out), 1, ffn_fisher[l]))
    bar.close()
    return hs, fs
