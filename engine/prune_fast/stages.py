"""The stages of `python -m engine.prune_fast` (engine/prune_fast/cli.py), each saved under OUT/state/ by a
`StageStore` and reused by --resume: Fisher scores, the search's scores, search, rearrangement, tuning and refit,
or (--select obs) the reconstruction-aware selection. The distillation stage is engine/prune_fast/distill.py."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from engine.config import EncoderConfig
from engine.data.squad import Example, TrainFeature, train_features
from engine.features import WindowMaker
from engine.latency_target import (
    meet_measured_latency,
    resolve_latency_target,
)
from engine.latency_timer import Shape
from engine.model import RaggedQAModel
from engine.prune_fast.masked import fisher, fold_masks, mask_gradients
from engine.prune_fast.search import CostFn, SearchResult, flops_cost, pruned_objective, rearrange, search
from engine.prune_fast.tune import refit_projections, tune_masks

FISHER_SAVE_EVERY = 8  # mini-batches between partial saves of the Fisher stage


# ------------------------------------------------------------------------------------------- saved stages


class StageStore:
    """OUT/state/: one JSON or safetensors file per finished stage, written atomically."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def json(self, name: str) -> dict[str, Any] | None:
        """A saved JSON stage, or None."""
        p = self.root / name
        return json.loads(p.read_text()) if p.is_file() else None

    def put_json(self, name: str, obj: dict[str, Any]) -> None:
        """Save a JSON stage."""
        tmp = self.root / (name + ".tmp")
        tmp.write_text(json.dumps(obj) + "\n")
        tmp.replace(self.root / name)

    def tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        """A saved tensor stage, or None."""
        p = self.root / name
        return load_file(str(p)) if p.is_file() else None

    def put_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Save a tensor stage."""
        tmp = self.root / (name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(self.root / name)


def _masks_to_json(heads: list[torch.Tensor], ffn: list[torch.Tensor]) -> dict[str, list[list[int]]]:
    return {
        "heads": [torch.nonzero(m).flatten().tolist() for m in heads],
        "ffn": [torch.nonzero(m).flatten().tolist() for m in ffn],
    }


def masks_from_indices(
    d: dict[str, list[list[int]]], cfg: EncoderConfig
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    def mk(idx: list[int], n: int) -> torch.Tensor:
        m = torch.zeros(n, dtype=torch.bool)
        m[idx] = True
        return m

    return ([mk(i, n) for i, n in zip(d["heads"], cfg.heads)], [mk(i, n) for i, n in zip(d["ffn"], cfg.ffn)])


# --------------------------------------------------------------------------------------------------- stages


def sample_features(train: list[Example], maker: WindowMaker, n: int, seed: int) -> list[TrainFeature]:
    """`n` train windows from a seeded shuffle of the examples (only as many examples are tokenized as needed)."""
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    feats: list[TrainFeature] = []
    for i in range(0, len(order), 256):
        if len(feats) >= n:
            break
        feats += train_features([train[k] for k in order[i : i + 256]], maker)
    if len(feats) < n:
        raise ValueError(
            f"the train files give only {len(feats)} windows, fewer than --samples {n}; lower --samples "
            f"or add train files"
        )
    return feats[:n]


@contextlib.contextmanager
def on_device(device: torch.device | str, *modules: torch.nn.Module) -> Iterator[None]:
    """`modules` on `device` for a stage (--device), back on the CPU after it: every stage takes and returns CPU
    tensors, so checkpoints, resumes and the CPU-side stages do not depend on where the others ran."""
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m in modules:
            m.cpu()


def stage_fisher(
    store: StageStore,
    model: RaggedQAModel,
    feats: list[TrainFeature],
    batch: int,
    progress: bool,
    device: torch.device | str = "cpu",
) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, Any]]:
    """Mask gradients per mini-batch (on `device`), resuming from a partial save."""
    cfg = model.cfg
    n_layers, n_batches = cfg.num_layers, math.ceil(len(feats) / batch)
    saved = store.tensors("fisher.safetensors") or store.tensors("fisher.partial.safetensors") or {}
    hg = [saved.get(f"head.{l}", torch.zeros(0, h)) for l, h in enumerate(cfg.heads)]
    fg = [saved.get(f"ffn.{l}", torch.zeros(0, f)) for l, f in enumerate(cfg.ffn)]
    done = int(saved["batches"]) if saved else 0
    elapsed = float(saved["seconds"]) if saved else 0.0
    cpu = float(saved["cpu_seconds"]) if saved else 0.0
    bar = tqdm(total=n_batches, initial=done, desc="fisher", unit="batch", disable=not progress)
    with on_device(device, model):
        for b in range(done, n_batches):
            t0, c0 = time.monotonic(), time.process_time()
            h, f = mask_gradients(model, feats, batch, [b])
            hg = [torch.cat([x, y.cpu()]) for x, y in zip(hg, h)]
            fg = [torch.cat([x, y.cpu()]) for x, y in zip(fg, f)]
            elapsed += time.monotonic() - t0
            cpu += time.process_time() - c0
            bar.update(1)
            if (b + 1) % FISHER_SAVE_EVERY and b + 1 < n_batches:
                continue
            tensors = {
                **{f"head.{l}": hg[l] for l in range(n_layers)},
                **{f"ffn.{l}": fg[l] for l in range(n_layers)},
                "batches": torch.tensor(b + 1),
                "seconds": torch.tensor(elapsed, dtype=torch.float64),
                "cpu_seconds": torch.tensor(cpu, dtype=torch.float64),
            }
            store.put_tensors("fisher.safetensors" if b + 1 == n_batches else "fisher.partial.safetensors", tensors)
    bar.close()
    (store.root / "fisher.partial.safetensors").unlink(missing_ok=True)
    return hg, fg, {"time_s": elapsed, "cpu_s": cpu, "batches": n_batches, "samples": len(feats), "batch": batch}


def stage_search(
    store: StageStore,
    args: argparse.Namespace,
    dense: EncoderConfig,
    hs: list[torch.Tensor],
    fs: list[torch.Tensor],
    progress: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    """Kwon et al.'s search under a FLOP or latency budget, on per-unit scores `hs`, `fs` (diagonal Fisher, or
    `stage_obs_scores`); latency results are re-measured on the engine."""
    saved = store.json("search.json")
    if saved is not None:
        return *masks_from_indices(saved["masks"], dense), saved["info"]
    t0, c0 = time.monotonic(), time.process_time()
    if args.target_sparsity is not None:
        cost = flops_cost(dense, args.flops_seq_len)
        budget = (1 - args.target_sparsity) * cost(dense.heads, dense.ffn)
        res = search(hs, fs, cost, budget)
        info: dict[str, Any] = {"by": "flops", "budget": budget, "cost": res.cost}
    else:
        res, info = _latency_search(args, dense, hs, fs, progress)
    info.update(
        time_s=time.monotonic() - t0,
        cpu_s=time.process_time() - c0,
        kept_fisher=res.kept_fisher,
        heads_kept=res.heads_kept,
        total_fisher=float(sum(s.sum() for s in hs) + sum(s.sum() for s in fs)),
    )
    store.put_json("search.json", {"masks": _masks_to_json(res.head_masks, res.ffn_masks), "info": info})
    return res.head_masks, res.ffn_masks, info


def _latency_search(
    args: argparse.Namespace, dense: EncoderConfig, hs: list[torch.Tensor], fs: list[torch.Tensor], progress: bool
) -> tuple[SearchResult, dict[str, Any]]:
    """Search with the latency table, then measure the chosen shape against the dense one on the engine and
    rescale the budget until the measured latency (or speedup) is within --latency-tolerance of the target."""
    table, budget = resolve_latency_target(args, progress)
    cost: CostFn = table.predict

    def choose(b: float) -> tuple[SearchResult, Shape, float]:
        res = search(hs, fs, cost, b)
        return res, (tuple(int(m.sum()) for m in res.head_masks), tuple(int(m.sum()) for m in res.ffn_masks)), res.cost

    best, rounds = meet_measured_latency(args, dense, table, budget, choose)
    info = {
        "by": "latency",
        "table_key": asdict(table.key),
        "table_dense_ms": table.dense_ms(),
        "table_base_ms": table.base_ms,
        "budget_ms": rounds[0]["budget_ms"],
        "verification": rounds,
        "cost": best.cost,
    }
    return best, info


def stage_scores(
    store: StageStore,
    args: argparse.Namespace,
    model: RaggedQAModel,
    feats: list[TrainFeature],
    hg: list[torch.Tensor],
    fg: list[torch.Tensor],
    progress: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    """The search's per-unit scores: diagonal Fisher (--scores fisher), or what a refit leaves of each removal on
    the Fisher scale (--scores obs: `obs.obs_scores` on the first --score-samples windows), saved for --resume."""
    if args.scores == "fisher":
        return fisher(hg), fisher(fg), {"by": "fisher", "time_s": 0.0, "cpu_s": 0.0}
    from engine.prune_fast.obs import obs_scores

    saved, info = store.tensors("scores.safetensors"), store.json("scores.json")
    n = model.cfg.num_layers
    if saved is None or info is None:
        t0, c0 = time.monotonic(), time.process_time()
        with on_device(args.device, model):
            hs, fs = obs_scores(model, feats[: args.score_samples], fisher(hg), fisher(fg), args.batch, progress)
        saved = {**{f"head.{l}": hs[l] for l in range(n)}, **{f"ffn.{l}": fs[l] for l in range(n)}}
        info = {
            "by": "obs",
            "samples": min(args.score_samples, len(feats)),
            "time_s": time.monotonic() - t0,
            "cpu_s": time.process_time() - c0,
        }
        store.put_tensors("scores.safetensors", saved)
        store.put_json("scores.json", info)
    return [saved[f"head.{l}"] for l in range(n)], [saved[f"ffn.{l}"] for l in range(n)], info


def stage_rearrange(
    store: StageStore,
    args: argparse.Namespace,
    dense: EncoderConfig,
    hg: list[torch.Tensor],
    fg: list[torch.Tensor],
    hk: list[torch.Tensor],
    fk: list[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    """Greedy within-layer rearrangement of heads and FFN units (same counts per layer)."""
    saved = store.json("rearrange.json")
    if saved is not None:
        return *masks_from_indices(saved["masks"], dense), saved["info"]
    t0, c0 = time.monotonic(), time.process_time()
    info: dict[str, Any] = {"skipped": bool(args.no_rearrange), "layers": []}
    if not args.no_rearrange:
        new_h, new_f = [], []
        for l in range(dense.num_layers):
            h2, f2 = rearrange(hg[l], hk[l]), rearrange(fg[l], fk[l])
            info["layers"].append(
                {
                    "heads_objective": [pruned_objective(hg[l], hk[l]), pruned_objective(hg[l], h2)],
                    "ffn_objective": [pruned_objective(fg[l], fk[l]), pruned_objective(fg[l], f2)],
                    "heads_changed": int((h2 != hk[l]).sum()) // 2,
                    "ffn_changed": int((f2 != fk[l]).sum()) // 2,
                }
            )
            new_h.append(h2)
            new_f.append(f2)
        hk, fk = new_h, new_f
    info.update(time_s=time.monotonic() - t0, cpu_s=time.process_time() - c0)
    store.put_json("rearrange.json", {"masks": _masks_to_json(hk, fk), "info": info})
    return hk, fk, info


def stage_tune(
    store: StageStore,
    args: argparse.Namespace,
    model: RaggedQAModel,
    feats: list[TrainFeature],
    hk: list[torch.Tensor],
    fk: list[torch.Tensor],
    progress: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    """Least-squares scales, layer by layer; resumes after the last finished layer."""
    if args.no_tune:
        return [m.float() for m in hk], [m.float() for m in fk], {"skipped": True, "time_s": 0.0, "cpu_s": 0.0}
    saved = store.json("tune.json") or {"layers": [], "time_s": 0.0, "cpu_s": 0.0}
    n_layers = model.cfg.num_layers
    if len(saved["layers"]) == n_layers:
        return (
            [torch.tensor(x["heads"]) for x in saved["layers"]],
            [torch.tensor(x["ffn"]) for x in saved["layers"]],
            {"time_s": saved["time_s"], "cpu_s": saved["cpu_s"], "layers": [x["info"] for x in saved["layers"]]},
        )
    t0, c0, before, cpu_before = time.monotonic(), time.process_time(), float(saved["time_s"]), float(saved["cpu_s"])
    done = [(torch.tensor(x["heads"]), torch.tensor(x["ffn"])) for x in saved["layers"]]

    def on_layer(l: int, hm: torch.Tensor, fm: torch.Tensor, info: dict) -> None:
        saved["layers"].append({"heads": hm.tolist(), "ffn": fm.tolist(), "info": info})
        saved["time_s"] = before + time.monotonic() - t0
        saved["cpu_s"] = cpu_before + time.process_time() - c0
        store.put_json("tune.json", saved)

    n = args.tune_samples or len(feats)
    with on_device(args.device, model):
        hm, fm, infos = tune_masks(model, feats[:n], hk, fk, args.batch, done, on_layer, progress)
    return hm, fm, {"time_s": saved["time_s"], "cpu_s": saved["cpu_s"], "samples": min(n, len(feats)), "layers": infos}


def stage_refit(
    store: StageStore,
    args: argparse.Namespace,
    teacher: RaggedQAModel,
    cfg: EncoderConfig,
    state: dict[str, torch.Tensor],
    feats: list[TrainFeature],
    progress: bool,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Least-squares refit of the folded model's output projections and QA head (`tune.refit_projections`) on the
    tuning windows or the first --refit-samples of `feats`; the refitted tensors are saved, so a resumed run reuses
    them."""
    if args.refit == "none":
        return state, {"skipped": True, "time_s": 0.0, "cpu_s": 0.0}
    saved, info = store.tensors("refit.safetensors"), store.json("refit.json")
    if saved is None or info is None:
        t0, c0 = time.monotonic(), time.process_time()
        student = RaggedQAModel(cfg)
        student.load_state_dict(state)
        n = args.refit_samples or args.tune_samples or args.samples
        with on_device(args.device, student, teacher):
            saved, info = refit_projections(
                student,
                teacher,
                feats[:n],
                args.batch,
                layers=args.refit in ("all", "layers"),
                head=args.refit in ("all", "head"),
                progress=progress,
                ridge=args.refit_ridge,
                ln_weighted=args.fit_error == "ln",
            )
        info.update(
            what=args.refit, samples=min(n, len(feats)), time_s=time.monotonic() - t0, cpu_s=time.process_time() - c0
        )
        store.put_tensors("refit.safetensors", saved)
        store.put_json("refit.json", info)
    return {**state, **saved}, info


def stage_obs(
    store: StageStore,
    args: argparse.Namespace,
    teacher: RaggedQAModel,
    hk: list[torch.Tensor],
    fk: list[torch.Tensor],
    feats: list[TrainFeature],
    progress: bool,
) -> tuple[EncoderConfig, dict[str, torch.Tensor], dict]:
    """--select obs: keep the searched number of heads and units per layer, chosen and refitted layer by layer
    (`obs.obs_prune`) on the first --refit-samples (default --samples) windows; returns the ragged config and
    state. The result is saved, so a resumed run reuses it."""
    from engine.prune_fast.obs import obs_prune

    saved, done = store.tensors("obs.safetensors"), store.json("obs.json")
    if saved is None or done is None:
        t0, c0 = time.monotonic(), time.process_time()
        n = args.refit_samples or args.samples
        with on_device(args.device, teacher):
            hk, fk, saved, info = obs_prune(
                teacher,
                feats[:n],
                [int(m.sum()) for m in hk],
                [int(m.sum()) for m in fk],
                args.batch,
                head=args.refit == "all",
                ridge=args.refit_ridge,
                progress=progress,
                ln_weighted=args.fit_error == "ln",
            )
        info.update(samples=min(n, len(feats)), time_s=time.monotonic() - t0, cpu_s=time.process_time() - c0)
        done = {"masks": _masks_to_json(hk, fk), "info": info}  # the masks stay here, as search.json's do
        store.put_tensors("obs.safetensors", saved)
        store.put_json("obs.json", done)
    hk, fk = masks_from_indices(done["masks"], teacher.cfg)
    info = done["info"]
    cfg, state = fold_masks(teacher, [m.float() for m in hk], [m.float() for m in fk])
    return cfg, {**state, **saved}, info
