"""`python -m engine.prune`: L0-gated structured pruning with distillation, then a fixed-structure fine-tune.

    python -m engine.prune --teacher DIR --train FILE [FILE ...] (--eval FILE | --eval-fraction F) --out DIR
        (--target-sparsity 0.5 | --target-params 0.5 | --target-speedup 1.5 | --target-latency-ms 300)
        [--latency-shape 8,384 --backend cpp --latency-threads 2]

Phase 1 trains the student (a copy of the teacher) with hard-concrete gates on heads and FFN units (optionally
whole sublayers): task CE + distillation + a Lagrangian that drives expected encoder-FLOP sparsity (or
parameter sparsity, --target-params; or latency sparsity 1 - latency / dense latency from a table measured on the
engine, --target-speedup / --target-latency-ms) to a target ramped up linearly. Phase 2 cuts the closed structure
(gates calibrated to the target, for latency also measured on the engine; surviving gate values folded) and
fine-tunes the ragged model with distillation (--finetune-epochs). Output: a ragged checkpoint in OUT,
OUT/gates.json and OUT/metrics.json (docs/PRUNING.md). Both phases checkpoint every N steps and resume exactly with
--resume. Works under torchrun (DDP).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.data.predict import add_threshold_arg, evaluate_model, stored_threshold
from engine.data.squad import train_features
from engine.features import WindowMaker, WindowSettings, load_tokenizer
from engine.finetune import (
    add_data_args,
    add_negatives_args,
    add_speed_args,
    cli_args,
    prepare_data,
    setup_threads,
    train_config,
)
from engine.latency_table import LatencyTable
from engine.latency_target import (
    add_latency_args,
    exported_latency,
    has_latency_target,
    latency_args_error,
    latency_target_info,
    resolve_latency_target,
)
from engine.model import RaggedQAModel
from engine.prune.distributed import Dist
from engine.prune.export import achieved_sparsity, calibrate, calibrate_measured
from engine.prune.gated import GatedQAModel, export_ragged
from engine.prune.l0 import LagrangianController, target_schedule
from engine.train import DistillConfig, Hooks, ParamGroup, curve_hook, resolve_device, train, weight_groups
from engine.train.teacher import TeacherSource, add_teacher_logits_args, teacher_source

DROPOUT = 0.1


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    ap = argparse.ArgumentParser(prog="python -m engine.prune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, type=Path, help="fine-tuned QA checkpoint (BERT or RoBERTa)")
    ap.add_argument("--student-init", type=Path, help="initialise the student from this checkpoint (default: teacher)")
    add_data_args(ap)
    ap.add_argument("--out", required=True, type=Path)
    tgt = ap.add_mutually_exclusive_group(required=True)
    tgt.add_argument("--target-sparsity", type=float, help="fraction of encoder FLOPs to remove (at --flops-seq-len)")
    tgt.add_argument("--target-params", type=float, help="fraction of prunable encoder parameters to remove instead")
    tgt.add_argument("--spec", type=Path, help="skip gate training: fixed structure from this spec (baselines)")
    ap.add_argument("--flops-seq-len", type=int, default=384, help="sequence length at which FLOPs are counted")
    add_latency_args(ap, tgt, default_shape="8,384")
    ap.add_argument("--sublayer-gates", action="store_true", help="also gate whole MHA/FFN sublayers (bias included)")
    ap.add_argument("--epochs", type=float, default=1.0, help="gate-training epochs")
    ap.add_argument("--max-steps", type=int, help="gate-training steps (overrides --epochs)")
    ap.add_argument("--target-warmup", type=float, default=0.5, help="fraction of gate steps over which t ramps up")
    ap.add_argument("--finetune-epochs", type=float, default=1.0, help="fixed-structure fine-tune epochs after cutting")
    ap.add_argument("--finetune-max-steps", type=int, help="fine-tune steps (overrides --finetune-epochs)")
    ap.add_argument("--lr", type=float, default=5e-5, help="peak learning rate of the weights")
    ap.add_argument("--gate-lr", type=float, default=0.05, help="learning rate of the gates' log_alpha")
    ap.add_argument("--lambda-lr", type=float, default=0.05, help="learning rate of the Lagrange multipliers (ascent)")
    ap.add_argument("--warmup", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--no-distill", action="store_true", help="task loss only (the ablation)")
    ap.add_argument("--distill-weight", type=float, default=0.9, help="weight of the KL term; CE gets 1 - this")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--hidden-weight", type=float, default=0.0, help="weight of the layer-wise hidden-state MSE")
    add_negatives_args(ap)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--doc-stride", type=int, default=128)
    ap.add_argument("--max-query-length", type=int, default=64)
    ap.add_argument("--checkpoint-every", type=int, default=200)
    ap.add_argument("--keep-checkpoints", type=int, default=2, help="how many resumable states to keep per phase")
    ap.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="score the student on the held-out data every N fine-tune steps (metrics.json finetune_curve)",
    )
    add_teacher_logits_args(ap, "cached")
    add_threshold_arg(ap, "heldout")  # the recorded L0 rows (docs/PRUNING.md measures both on prune_fast)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--time-budget-min", type=float, help="per phase: stop (and save) after this many minutes")
    ap.add_argument("--resume", action="store_true", help="continue from OUT's newest checkpoint")
    add_speed_args(ap)
    ap.add_argument("--bf16", action="store_const", const="bf16", dest="precision", help="same as --precision bf16")
    ap.add_argument("--no-progress", action="store_true")
    return ap


class GateTrainer(nn.Module):
    """Phase-1 state in one module, so checkpoints hold weights, gates and multipliers together."""

    def __init__(self, gated: GatedQAModel):
        super().__init__()
        self.gated = gated
        self.controller = LagrangianController()


def _teacher(args: argparse.Namespace, device: torch.device) -> RaggedQAModel:
    ck = load_checkpoint(args.teacher)
    t = RaggedQAModel(ck.cfg).eval()
    t.load_state_dict(ck.state)
    t.to(device)
    for p in t.parameters():
        p.requires_grad_(False)
    return t


def _teacher_source(
    args: argparse.Namespace, settings: WindowSettings, features, threads: int, device: torch.device
) -> TeacherSource | None:
    """Live teacher, cached teacher logits, or None (--no-distill)."""
    if args.no_distill:
        return None
    return teacher_source(args, settings, features, device, lambda: _teacher(args, device), threads)


def metrics_row(result: dict[str, Any]) -> dict[str, Any]:
    z, b = result["at_zero"], result["at_best"]
    return {
        "exact": z["exact"],
        "f1": z["f1"],
        "best_f1": z.get("best_f1"),
        "best_f1_thresh": z.get("best_f1_thresh"),
        "HasAns_f1": b.get("HasAns_f1"),
        "NoAns_f1": b.get("NoAns_f1"),
        "HasAns_f1_at_zero": z.get("HasAns_f1"),
        "NoAns_f1_at_zero": z.get("NoAns_f1"),
        "auc": result["auc"],
        "null_threshold": result["null_threshold"],
    }


def prune(args: argparse.Namespace) -> dict[str, Any]:
    """Run both phases; returns metrics.json's content (rank 0) or {} (other ranks)."""
    dist = Dist.from_env(resolve_device(args.device))
    t0 = time.monotonic()
    threads = setup_threads(args.threads)
    out: Path = args.out
    if dist.is_main and out.exists() and any(out.iterdir()) and not args.resume:
        raise FileExistsError(f"{out} is not empty; pass --resume to continue that run or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    teacher_ck = load_checkpoint(args.teacher)
    dense = teacher_ck.cfg
    table, budget_ms = None, None
    if has_latency_target(args):  # before any data or training: an unreachable target stops here
        if dist.is_main:  # rank 0 measures (or finds the cached table); the other ranks then read the cache
            table, budget_ms = resolve_latency_target(args, progress=not args.no_progress)
        dist.barrier()
        if table is None:
            table, budget_ms = resolve_latency_target(args, progress=False)
        torch.set_num_threads(threads)  # a measurement runs at the latency threads
    settings = WindowSettings(args.max_seq_length, args.doc_stride, args.max_query_length)
    maker = WindowMaker(load_tokenizer(args.teacher), dense.architecture, settings)
    train_set, evals, data_info = prepare_data(args)
    features = train_features(train_set, maker)
    teacher = None
    if not args.no_distill:
        if dist.is_main:
            teacher = _teacher_source(args, settings, features, threads, dist.device)
        dist.barrier()  # other ranks then read the cache rank 0 wrote
        teacher = teacher or _teacher_source(args, settings, features, threads, dist.device)
    distill = None if args.no_distill else DistillConfig(args.distill_weight, args.temperature, args.hidden_weight)
    by, target = _sparsity_target(args, table, budget_ms)
    common = dict(teacher=teacher, distill=distill, dist=dist)
    export_dir = out / "phase1-export"

    # ---------------------------------------------------------------- phase 1: gates
    gate_info: dict[str, Any] = {}
    if args.spec is not None:
        from engine.spec import apply_spec, parse_spec

        init = load_checkpoint(args.student_init or args.teacher)
        cfg, state = apply_spec(init.state, init.cfg, parse_spec(args.spec, init.cfg))
        gate_info = {"mode": "fixed spec", "spec": str(args.spec)}
    elif not (export_dir / "config.json").is_file():
        init = load_checkpoint(args.student_init or args.teacher)
        torch.manual_seed(args.seed)
        base = RaggedQAModel(init.cfg, dropout=DROPOUT)
        base.load_state_dict(init.state)
        trainer = GateTrainer(GatedQAModel(base, sublayer_gates=args.sublayer_gates)).to(dist.device)

        def penalty(step: int, total: int) -> tuple[torch.Tensor, dict[str, float]]:
            """The Lagrangian on expected sparsity, with the target ramped up over --target-warmup."""
            t = target_schedule(step, round(args.target_warmup * total), target)
            s_hat = trainer.gated.expected_sparsity(dense, args.flops_seq_len, by, table)
            return trainer.controller.penalty(s_hat, t), {"s_hat": float(s_hat.detach()), "t": t}

        # Gates and multipliers use a shorter second-moment memory (beta2 0.99): with 0.999, closed gates stall.
        groups = [
            *weight_groups(trainer.gated.base, args.lr, args.weight_decay),
            ParamGroup(
                "gates",
                tuple(trainer.gated.gate_parameters()),
                args.gate_lr,
                scheduled=False,
                clipped=False,
                beta2=0.99,
            ),
            ParamGroup(
                "lambdas",
                tuple(trainer.controller.lambda_parameters()),
                args.lambda_lr,
                scheduled=False,
                ascent=True,
                clipped=False,
                beta2=0.99,
            ),
        ]
        train(
            trainer,
            features,
            train_config(args, "gates", args.epochs, args.max_steps, dist.device),
            groups,
            out / "checkpoints" / "gates",
            forward=trainer.gated,
            hooks=Hooks(penalty=penalty),
            **common,
        )
        trainer.cpu()  # calibration and export run on the CPU, whatever device trained the gates
        trainer.gated.eval()
        if table is not None and args.latency_iterations > 0 and dist.is_main:  # only rank 0's export is kept
            cal = calibrate_measured(args, trainer.gated, dense, table, budget_ms)
            torch.set_num_threads(threads)  # the engine ran at the latency threads
        else:
            cal = calibrate(trainer.gated, dense, target, args.flops_seq_len, by, table=table)
        cfg, state = export_ragged(trainer.gated)
        gate_info = {
            "mode": "l0",
            "calibration": cal,
            "sparsity_by": by,
            "expected_sparsity": float(trainer.gated.expected_sparsity(dense, args.flops_seq_len, by, table).detach()),
            "lambda1": float(trainer.controller.lambda1.detach()),
            "lambda2": float(trainer.controller.lambda2.detach()),
            "log_alpha": {
                n: p.detach().tolist() for n, p in trainer.gated.named_parameters() if n.endswith("log_alpha")
            },
        }
        if dist.is_main:
            save_checkpoint(export_dir, cfg, state, teacher_ck.hf_config)
            (out / "gates.json").write_text(json.dumps(gate_info) + "\n")
        dist.barrier()
    if args.spec is None:
        ck = load_checkpoint(export_dir)
        cfg, state = ck.cfg, ck.state
        gate_info = json.loads((out / "gates.json").read_text())

    # ---------------------------------------------------------------- phase 2: fixed-structure fine-tune
    torch.manual_seed(args.seed + 1)
    student = RaggedQAModel(cfg, dropout=DROPOUT)
    student.load_state_dict(state)
    student.to(dist.device)

    def held_out() -> dict[str, Any]:  # a point of the fixed-structure phase's held-out step curve
        return metrics_row(evaluate_model(student, evals, maker, progress=False))

    ft_meta: dict[str, Any] = {}
    if args.finetune_epochs > 0 or args.finetune_max_steps:
        cfg_ft = train_config(args, "finetune", args.finetune_epochs, args.finetune_max_steps, dist.device)
        ft_meta = train(
            student,
            features,
            cfg_ft,
            weight_groups(student, args.lr, args.weight_decay),
            out / "checkpoints" / "finetune",
            hooks=Hooks(evaluate=curve_hook("finetune", held_out) if args.eval_every else None),
            **common,
        )
    if not dist.is_main:
        dist.close()
        return {}

    # ---------------------------------------------------------------- evaluation and output
    student.eval()
    res_s = evaluate_model(student, evals, maker, progress=not args.no_progress)
    teacher_eval = _teacher(args, dist.device)
    res_t = evaluate_model(teacher_eval, evals, maker, progress=not args.no_progress)
    res_s = stored_threshold(args.threshold_rule, res_s, res_t, teacher_ck.null_threshold, evals)
    from transformers import AutoTokenizer

    save_checkpoint(
        out,
        cfg,
        {k: v.detach() for k, v in student.state_dict().items()},
        teacher_ck.hf_config,
        tokenizer=AutoTokenizer.from_pretrained(str(args.teacher)),
        null_threshold=res_s["null_threshold"],
    )
    metrics = {
        "schema_version": 1,
        "target": _target_info(args, by, target),
        "achieved_flop_sparsity": achieved_sparsity(cfg, dense, args.flops_seq_len, "flops"),
        "achieved_param_sparsity": achieved_sparsity(cfg, dense, args.flops_seq_len, "params"),
        "heads": list(cfg.heads),
        "ffn": list(cfg.ffn),
        "dense_heads": list(dense.heads),
        "dense_ffn": list(dense.ffn),
        "teacher": metrics_row(res_t),
        "student": metrics_row(res_s),
        "f1_loss": res_t["at_zero"]["f1"] - res_s["at_zero"]["f1"],
        "finetune_curve": ft_meta.get("curve", []),
        "gates": {k: v for k, v in gate_info.items() if k != "log_alpha"},
        "distillation": not args.no_distill,
        "threshold_rule": args.threshold_rule,
        "data": data_info,
        "wall_time_s": time.monotonic() - t0,
        "args": cli_args(args),
    }
    if table is not None:
        metrics["latency"] = exported_latency(args, out, cfg, table, budget_ms)
        metrics["wall_time_s"] = time.monotonic() - t0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    dist.close()
    return metrics


def _sparsity_target(
    args: argparse.Namespace, table: LatencyTable | None, budget_ms: float | None
) -> tuple[str, float]:
    """What the Lagrangian steers ("flops", "params" or "latency") and the final target sparsity in it."""
    if table is not None:
        return "latency", 1.0 - budget_ms / table.dense_ms()
    if args.target_params is not None:
        return "params", args.target_params
    return "flops", args.target_sparsity  # None with --spec: no gates are trained


def _target_info(args: argparse.Namespace, by: str, target: float | None) -> dict[str, Any]:
    """metrics.json's `target` from `_sparsity_target`'s (by, target) (the latency form is engine.prune_fast's)."""
    if args.spec is not None:
        return {"by": "spec", "spec": str(args.spec)}
    if by == "latency":
        return latency_target_info(args)
    return {"by": by, "value": target, "seq_len": args.flops_seq_len}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = build_parser()
    args = ap.parse_args(argv)
    for name in ("target_sparsity", "target_params", "eval_fraction"):
        v = getattr(args, name)
        if v is not None and not 0 < v < 1:
            ap.error(f"--{name.replace('_', '-')} must lie in (0, 1)")
    err = latency_args_error(args)
    if err is not None:
        ap.error(err)
    try:
        m = prune(args)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if m:
        print(
            json.dumps(
                {
                    k: m[k]
                    for k in ("achieved_flop_sparsity", "heads", "ffn", "teacher", "student", "f1_loss", "latency")
                    if k in m
                },
                indent=2,
            )
        )
    return 0
