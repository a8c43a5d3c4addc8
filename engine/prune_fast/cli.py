"""`python -m engine.prune_fast`: post-training pruning of a QA teacher in minutes, with no retraining.

    python -m engine.prune_fast --teacher DIR --train FILE [FILE ...] (--eval FILE | --eval-fraction F) --out DIR
        (--target-sparsity S | --target-latency-ms T | --target-speedup X) [--latency-shape 8,384 --backend cpp]
        [--samples 2048]

Stages (Kwon et al., NeurIPS 2022); each one's result is saved under OUT/state/ and reused by --resume:
  1. fisher     gradients of the span loss w.r.t. all-ones head and FFN-unit masks, one row per mini-batch of
                --batch windows over --samples train windows (saved every few batches, so resumable mid-stage);
  2. search     keep the units with the largest diagonal Fisher under the budget: encoder FLOPs (engine.flops) or
                latency from a table measured on the target engine (engine.latency); a latency-targeted shape is
                then measured on the engine against the dense one and the budget corrected (by the median ratio of
                measured to predicted latency over the rounds so far) until within --latency-tolerance;
  3. rearrange  within each layer, a greedy swap lowers the pruned units' full (not diagonal) Fisher quadratic form;
  4. tune       kept masks become real scales, fitted layer by layer by least squares against the dense teacher;
then the scales are folded into `o.weight` / `ffn_out.weight` columns, and (SparseQA's addition, --refit)
  5. refit      every kept output projection (`o`, `ffn_out`, with bias), layer by layer, and the QA head are
                refitted by ridge least squares against the teacher on the same windows (--refit head: the QA
                head alone; --refit none: Kwon et al.'s method as published);
the null threshold is tuned on held-out data (as engine.prune), and OUT gets a ragged checkpoint and metrics.json
(docs/PRUNING.md).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.config import EncoderConfig
from engine.data.squad import Example, TrainFeature, train_features
from engine.features import WindowMaker, WindowSettings, load_tokenizer
from engine.finetune import add_data_args, add_negatives_args
from engine.flops import encoder_params, flop_sparsity
from engine.latency import Shape
from engine.latency_target import (
    add_latency_args,
    latency_args_error,
    latency_setting,
    latency_target_info,
    meet_measured_latency,
    resolve_latency_target,
)
from engine.model import RaggedQAModel
from engine.prune_fast.masked import fisher, fold_masks, mask_gradients
from engine.prune_fast.search import CostFn, SearchResult, flops_cost, pruned_objective, rearrange, search
from engine.prune_fast.tune import REFIT_RIDGE, refit_projections, tune_masks

MIN_SAMPLES = 16
FISHER_SAVE_EVERY = 8  # mini-batches between partial saves of the Fisher stage
_RESUME_IRRELEVANT = {"resume", "no_progress", "threads", "no_teacher_eval"}


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    ap = argparse.ArgumentParser(
        prog="python -m engine.prune_fast",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    ap.add_argument("--teacher", required=True, type=Path, help="fine-tuned QA checkpoint (BERT or RoBERTa)")
    add_data_args(ap)
    ap.add_argument("--out", required=True, type=Path)
    tgt = ap.add_mutually_exclusive_group(required=True)
    tgt.add_argument("--target-sparsity", type=float, help="fraction of encoder FLOPs to remove (at --flops-seq-len)")
    ap.add_argument("--flops-seq-len", type=int, default=384, help="sequence length at which FLOPs are counted")
    add_latency_args(ap, tgt)
    ap.add_argument("--samples", type=int, default=2048, help="train windows for Fisher scores and mask tuning")
    ap.add_argument("--tune-samples", type=int, help="windows for mask tuning (default: all --samples)")
    ap.add_argument("--batch", type=int, default=32, help="windows per Fisher mini-batch (one gradient row each)")
    ap.add_argument("--no-rearrange", action="store_true", help="skip mask rearrangement (ablation)")
    ap.add_argument("--no-tune", action="store_true", help="skip mask tuning: kept masks stay 1 (ablation)")
    ap.add_argument(
        "--refit",
        choices=("all", "layers", "head", "none"),
        default="all",
        help="after tuning, refit by least squares against the teacher every kept output projection and the QA "
        "head (all), the projections alone (layers), the QA head alone (head), or nothing (none: Kwon et al.'s "
        "method as published)",
    )
    ap.add_argument(
        "--refit-samples",
        type=int,
        help="train windows for the refit (default: the tuning windows); more than --samples draws further "
        "windows from the same seeded shuffle (a forward pass each, no gradients)",
    )
    ap.add_argument(
        "--refit-ridge",
        type=float,
        default=REFIT_RIDGE,
        help="the refit's ridge toward the tuned weights, relative to each system's mean Gram diagonal",
    )
    ap.add_argument(
        "--save-stages",
        action="store_true",
        help="also write the untuned search and rearrange models as ragged checkpoints in OUT/stages/",
    )
    add_negatives_args(ap)
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--doc-stride", type=int, default=128)
    ap.add_argument("--max-query-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch threads for pruning, and for latency measurement (default 2)")
    ap.add_argument("--no-teacher-eval", action="store_true", help="do not evaluate the teacher (no f1_loss)")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT")
    ap.add_argument("--no-progress", action="store_true")
    return ap


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


def _masks_from_json(
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


def stage_fisher(
    store: StageStore, model: RaggedQAModel, feats: list[TrainFeature], batch: int, progress: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, Any]]:
    """Mask gradients per mini-batch, resuming from a partial save."""
    cfg = model.cfg
    n_layers, n_batches = cfg.num_layers, math.ceil(len(feats) / batch)
    saved = store.tensors("fisher.safetensors") or store.tensors("fisher.partial.safetensors") or {}
    hg = [saved.get(f"head.{l}", torch.zeros(0, h)) for l, h in enumerate(cfg.heads)]
    fg = [saved.get(f"ffn.{l}", torch.zeros(0, f)) for l, f in enumerate(cfg.ffn)]
    done = int(saved["batches"]) if saved else 0
    elapsed = float(saved["seconds"]) if saved else 0.0
    cpu = float(saved["cpu_seconds"]) if saved else 0.0
    bar = tqdm(total=n_batches, initial=done, desc="fisher", unit="batch", disable=not progress)
    for b in range(done, n_batches):
        t0, c0 = time.monotonic(), time.process_time()
        h, f = mask_gradients(model, feats, batch, [b])
        hg = [torch.cat([x, y]) for x, y in zip(hg, h)]
        fg = [torch.cat([x, y]) for x, y in zip(fg, f)]
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
    hg: list[torch.Tensor],
    fg: list[torch.Tensor],
    progress: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    """Kwon et al.'s search under a FLOP or latency budget; latency results are re-measured on the engine."""
    saved = store.json("search.json")
    if saved is not None:
        return *_masks_from_json(saved["masks"], dense), saved["info"]
    t0, c0 = time.monotonic(), time.process_time()
    hs, fs = fisher(hg), fisher(fg)
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
        return *_masks_from_json(saved["masks"], dense), saved["info"]
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
        saved, info = refit_projections(
            student,
            teacher,
            feats[:n],
            args.batch,
            layers=args.refit in ("all", "layers"),
            head=args.refit in ("all", "head"),
            progress=progress,
            ridge=args.refit_ridge,
        )
        info.update(
            what=args.refit, samples=min(n, len(feats)), time_s=time.monotonic() - t0, cpu_s=time.process_time() - c0
        )
        store.put_tensors("refit.safetensors", saved)
        store.put_json("refit.json", info)
    return {**state, **saved}, info


# ------------------------------------------------------------------------------------------------- the run


def _check_resume(store: StageStore, args: argparse.Namespace) -> None:
    """Refuse to resume a run started with different arguments."""
    fp = {
        k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
        for k, v in vars(args).items()
        if k not in _RESUME_IRRELEVANT
    }
    old = store.json("run.json")
    if old is not None:
        diff = sorted(k for k in set(fp) | set(old) if fp.get(k) != old.get(k))
        if diff:
            raise ValueError(
                f"--resume: {store.root.parent} was started with other arguments ({', '.join(diff)}); "
                f"use the same arguments or another --out"
            )
    store.put_json("run.json", fp)


def _save_stage_model(
    out: Path,
    name: str,
    model: RaggedQAModel,
    hk: list[torch.Tensor],
    fk: list[torch.Tensor],
    hf_config: dict[str, Any],
    tokenizer: Any,
) -> None:
    cfg, state = fold_masks(model, [m.float() for m in hk], [m.float() for m in fk])
    save_checkpoint(out / "stages" / name, cfg, state, hf_config, tokenizer=tokenizer)


def prune_fast(args: argparse.Namespace) -> dict[str, Any]:
    """Run every stage; returns metrics.json's content."""
    from transformers import AutoTokenizer

    from engine.data.predict import evaluate_model
    from engine.finetune import prepare_data
    from engine.prune.train import metrics_row

    t_start = time.monotonic()
    progress = not args.no_progress
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise FileExistsError(f"{out} is not empty; pass --resume to continue that run or choose another --out")
    store = StageStore(out / "state")
    _check_resume(store, args)
    teacher_ck = load_checkpoint(args.teacher)
    dense = teacher_ck.cfg
    if teacher_ck.qa_head_initialised:
        print(
            "warning: the teacher has no trained QA head (a bare encoder); its scores are meaningless", file=sys.stderr
        )
    settings = WindowSettings(args.max_seq_length, args.doc_stride, args.max_query_length)
    settings.validate(dense.architecture, dense.max_position_embeddings)
    maker = WindowMaker(load_tokenizer(args.teacher), dense.architecture, settings)
    train, evals, data_info = prepare_data(args)
    pool = sample_features(train, maker, max(args.samples, args.refit_samples or 0), args.seed)
    feats = pool[: args.samples]  # a prefix: the same windows as sampling --samples alone
    data_info["train"]["windows_used"] = len(pool)
    model = RaggedQAModel(dense)
    model.load_state_dict(teacher_ck.state)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(args.teacher))

    hg, fg, fisher_info = stage_fisher(store, model, feats, args.batch, progress)
    hk, fk, search_info = stage_search(store, args, dense, hg, fg, progress)
    if args.save_stages:
        _save_stage_model(out, "search", model, hk, fk, teacher_ck.hf_config, tokenizer)
    hk, fk, rearrange_info = stage_rearrange(store, args, dense, hg, fg, hk, fk)
    if args.save_stages:
        _save_stage_model(out, "rearrange", model, hk, fk, teacher_ck.hf_config, tokenizer)
    hm, fm, tune_info = stage_tune(store, args, model, feats, hk, fk, progress)
    cfg, state = fold_masks(model, hm, fm)
    if args.save_stages and args.refit != "none":
        save_checkpoint(out / "stages" / "tune", cfg, state, teacher_ck.hf_config, tokenizer=tokenizer)
    state, refit_info = stage_refit(store, args, model, cfg, state, pool, progress)
    stages = {
        "fisher": fisher_info,
        "search": search_info,
        "rearrange": rearrange_info,
        "tune": tune_info,
        "refit": refit_info,
    }
    prune_time = sum(s["time_s"] for s in stages.values())
    prune_cpu = sum(s["cpu_s"] for s in stages.values())

    student = RaggedQAModel(cfg)
    student.load_state_dict(state)
    res_s = evaluate_model(student.eval(), evals, maker, progress=progress)
    res_t = None if args.no_teacher_eval else evaluate_model(model, evals, maker, progress=progress)
    save_checkpoint(out, cfg, state, teacher_ck.hf_config, tokenizer=tokenizer, null_threshold=res_s["null_threshold"])
    metrics = {
        "schema_version": 1,
        "method": "post-training",
        "target": _target_info(args),
        "achieved_flop_sparsity": flop_sparsity(cfg, dense, args.flops_seq_len),
        "achieved_param_sparsity": 1.0 - encoder_params(cfg) / encoder_params(dense),
        "heads": list(cfg.heads),
        "ffn": list(cfg.ffn),
        "dense_heads": list(dense.heads),
        "dense_ffn": list(dense.ffn),
        "teacher": metrics_row(res_t) if res_t else None,
        "student": metrics_row(res_s),
        "f1_loss": res_t["at_zero"]["f1"] - res_s["at_zero"]["f1"] if res_t else None,
        "stages": stages,
        "prune_time_s": prune_time,
        "prune_cpu_s": prune_cpu,
        "distillation": False,
        "data": data_info,
    }
    if args.latency_shape is not None:
        from engine.latency import measure_speedup

        batch, seq, threads = latency_setting(args)
        metrics["latency"] = measure_speedup(out, args.teacher, batch, seq, args.backend, threads, args.latency_dtype)
    metrics["wall_time_s"] = time.monotonic() - t_start
    metrics["args"] = store.json("run.json")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _target_info(args: argparse.Namespace) -> dict[str, Any]:
    if args.target_sparsity is not None:
        return {"by": "flops", "value": args.target_sparsity, "seq_len": args.flops_seq_len}
    return latency_target_info(args)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = build_parser()
    args = ap.parse_args(argv)
    for name in ("target_sparsity", "eval_fraction"):
        v = getattr(args, name)
        if v is not None and not 0 < v < 1:
            ap.error(f"--{name.replace('_', '-')} must lie in (0, 1)")
    if args.samples < MIN_SAMPLES:
        ap.error(
            f"--samples {args.samples} is too few for stable Fisher scores: use at least {MIN_SAMPLES} "
            f"(Kwon et al. use 2048)"
        )
    if args.refit_samples is not None and args.refit_samples < MIN_SAMPLES:
        ap.error(f"--refit-samples must be at least {MIN_SAMPLES}; got {args.refit_samples}")
    if args.batch < 1 or args.samples < args.batch:
        ap.error(f"--batch must lie in [1, --samples]; got {args.batch}")
    err = latency_args_error(args)
    if err is not None:
        ap.error(err)
    try:
        m = prune_fast(args)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                k: m[k]
                for k in (
                    "achieved_flop_sparsity",
                    "heads",
                    "ffn",
                    "teacher",
                    "student",
                    "f1_loss",
                    "prune_time_s",
                    "prune_cpu_s",
                    "wall_time_s",
                )
                if k in m
            },
            indent=2,
        )
    )
    if "latency" in m:
        print(json.dumps({"latency": m["latency"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
