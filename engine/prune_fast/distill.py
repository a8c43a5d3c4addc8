"""The distillation stage of `python -m engine.prune_fast` (--distill-steps): the cut model trained against the
dense teacher's logits by the one training loop, saved under OUT/state/ by the run's `StageStore`."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.config import EncoderConfig
from engine.data.squad import TrainFeature
from engine.features import WindowSettings
from engine.model import RaggedQAModel
from engine.prune_fast.stages import StageStore


def stage_distill(
    store: StageStore,
    args: argparse.Namespace,
    teacher: RaggedQAModel,
    pruned: tuple[EncoderConfig, dict[str, torch.Tensor]],
    pool: list[TrainFeature],
    settings: WindowSettings,
    progress: bool,
    held_out: Callable[[RaggedQAModel], dict[str, Any]] | None = None,
    teacher_dir: Path | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """--distill-steps N (SparseQA's, off by default): N optimizer steps of logit distillation from the dense
    teacher on the first --distill-samples (default --samples) windows of the pool, through the one training loop
    (`engine.train.loop.train`: checkpoints under OUT/state/distill/, resumed mid-stage), updating only the biases
    and LayerNorms (--distill-params bias-ln) or every weight (all), on --distill-device (or --device) in
    --precision (auto: bf16 autocast on a GPU or a CPU with native bf16, else fp32), from the dense teacher's logits:
    cached once per teacher and windows by the inference engine (--teacher-logits cached; `auto` on the CPU) or the
    teacher run live on every step (live; `auto` on a GPU, where it goes for the stage and comes back). `pruned` is
    the cut model's (config, state); the shape does not change. The result is saved, so a resumed run reuses it.
    `held_out` (with --distill-eval-every N) scores a CPU copy of the student every N steps and at the last one; the
    rows, kept in the trainer's checkpointed meta, are the stage's "curve". `teacher` is the model distilled from:
    the pruned one, or the --distill-teacher checkpoint `teacher_dir` (iterative pruning)."""
    cfg, state = pruned
    if not args.distill_steps:
        return state, {"skipped": True, "time_s": 0.0, "cpu_s": 0.0}
    saved, info = store.tensors("distill.safetensors"), store.json("distill.json")
    if saved is None or info is None:
        from engine.prune.distributed import Dist
        from engine.train.config import ParamGroup, TrainConfig, resolve_device, resolve_precision
        from engine.train.loop import Hooks, curve_hook, train
        from engine.train.losses import DistillConfig
        from engine.train.teacher import teacher_source

        t0, c0 = time.monotonic(), time.process_time()
        flags = [p.requires_grad for p in teacher.parameters()]
        device = resolve_device(args.distill_device or args.device)
        student = RaggedQAModel(cfg)
        student.load_state_dict(state)
        student.to(device)
        for p in student.parameters():
            p.requires_grad_(args.distill_params == "all" or p.dim() < 2)
        params = [p for p in student.parameters() if p.requires_grad]
        tc = TrainConfig(
            name="distill",
            max_steps=args.distill_steps,
            batch=args.batch,
            warmup=0.1,
            seed=args.seed,
            precision=resolve_precision(args.precision, device),
            checkpoint_every=max(1, args.distill_steps // 4),
            keep_checkpoints=1,
            log_every=0,
            eval_every=args.distill_eval_every if held_out else 0,
            resume=True,
            progress=progress,
        )
        feats = pool[: args.distill_samples or args.samples]
        source = teacher_source(args, settings, feats, device, lambda: teacher.to(device), args.threads, teacher_dir)

        def score() -> dict[str, Any]:  # a CPU copy of the student (load_state_dict copies across devices)
            copy = RaggedQAModel(cfg)
            copy.load_state_dict(student.state_dict())
            return held_out(copy)

        meta = train(
            student,
            feats,
            tc,
            [ParamGroup("distilled", tuple(params), args.distill_lr)],
            store.root / "distill",
            teacher=source,
            distill=DistillConfig(args.distill_weight, args.distill_temperature, args.hidden_weight),
            dist=Dist(device=device),
            hooks=Hooks(evaluate=curve_hook("distill", score) if held_out else None),
        )
        teacher.cpu()
        for p, flag in zip(teacher.parameters(), flags):  # LiveTeacher froze the dense model; restore it
            p.requires_grad_(flag)
        student.eval()
        saved = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
        losses = meta["losses"]
        info = {
            "params": args.distill_params,
            "trained_parameters": sum(p.numel() for p in params),
            "steps": meta["steps"],
            "windows": meta["windows"],
            "samples": len(feats),
            "lr": args.distill_lr,
            "hidden_weight": args.hidden_weight,
            "device": str(device),
            "precision": tc.precision.value,
            "teacher_logits": type(source).__name__,
            "teacher": str(teacher_dir or args.teacher),
            "loss_first": losses[0] if losses else None,
            "loss_last": sum(losses[-8:]) / len(losses[-8:]) if losses else None,
            "time_s": time.monotonic() - t0,
            "cpu_s": time.process_time() - c0,
        }
        if held_out:
            info["curve"] = meta.get("curve", [])
        store.put_tensors("distill.safetensors", saved)
        store.put_json("distill.json", info)
    return {**state, **saved}, info
