"""One resumable training phase shared by gate training and the fixed-structure fine-tune.

Loss per micro-batch: (1 - w)·CE + w·T²·KL(teacher‖student) [+ h·hidden MSE] [+ phase extra, e.g. Lagrangian].
Parameter groups carry their own lr; groups flagged `ascent` (the Lagrange multipliers) have their gradient
negated before the optimizer step, i.e. they are maximised. State (weights, gates, multipliers, AdamW moments,
RNG, step) is checkpointed every N steps and restored exactly by --resume.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from engine.data.squad import TrainFeature
from engine.packing import unpack
from engine.prune.distill import distill_loss, hidden_state_loss
from engine.prune.distributed import Dist
from engine.training import (check_finite, collate, epoch_order, latest_checkpoint, load_training_state, lr_at,
                             save_training_state, span_loss)

Group = tuple[str, list[nn.Parameter], float, float, bool]  # name, params, lr, weight decay, ascent


@dataclass
class PhaseConfig:
    """Length and parameter groups of one phase."""

    name: str
    epochs: float
    max_steps: int | None
    groups: Callable[[nn.Module], list[Group]]


def micro_loss(model: nn.Module, features: Sequence[TrainFeature], teacher: nn.Module | None,
               args: argparse.Namespace) -> torch.Tensor:
    """Task + distillation loss of one packed micro-batch."""
    batch, sp, ep = collate(features)
    want_hidden = teacher is not None and args.hidden_weight > 0
    out = model(batch.input_ids, batch.token_type_ids, batch.cu_seqlens, batch.max_seqlen,
                output_hidden_states=want_hidden)
    start, end = out[0], out[1]
    ce = span_loss(start, end, batch.cu_seqlens, batch.max_seqlen, sp, ep)
    if teacher is None:
        return ce
    with torch.no_grad():
        t_out = teacher(batch.input_ids, batch.token_type_ids, batch.cu_seqlens, batch.max_seqlen,
                        output_hidden_states=want_hidden)
    cu, n = batch.cu_seqlens, batch.max_seqlen
    mask = unpack(torch.ones_like(start, dtype=torch.bool), cu, n, fill=False)  # (B, S) real tokens
    kd = distill_loss(unpack(start, cu, n), unpack(end, cu, n), unpack(t_out[0], cu, n), unpack(t_out[1], cu, n),
                      args.temperature, mask)
    loss = (1 - args.distill_weight) * ce + args.distill_weight * kd
    if want_hidden:
        # Packed hiddens (T, d) as one (1, T, d) row; student and teacher have the same depth.
        ones = torch.ones(1, start.shape[0], dtype=torch.bool)
        loss = loss + args.hidden_weight * hidden_state_loss([h[None] for h in out[2]], [h[None] for h in t_out[2]],
                                                             ones)
    return loss


def run_phase(module: nn.Module, forward_of: Callable[[nn.Module], nn.Module], phase: PhaseConfig, ckpt_root: Path,
              features: Sequence[TrainFeature], teacher: nn.Module | None, dist: Dist, args: argparse.Namespace,
              extra_loss: Callable[[nn.Module, int, int], tuple[torch.Tensor, dict[str, float]]] | None = None
              ) -> dict[str, Any]:
    """Train `module` (forward through `forward_of(module)`) for one phase; resumes from `ckpt_root` if asked."""
    per_step = args.batch * args.grad_accum
    steps_per_epoch = len(features) // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{len(features)} training windows are fewer than one step's {per_step}")
    total = phase.max_steps or max(1, round(phase.epochs * steps_per_epoch))
    warmup = round(args.warmup * total)
    groups = phase.groups(module)
    # Gates and multipliers use a shorter second-moment memory (beta2 0.99): with 0.999, closed gates stall.
    opt = torch.optim.AdamW([{"params": p, "lr": lr, "weight_decay": wd, "betas": (0.9, 0.999 if n == "weights" else 0.99)}
                             for n, p, lr, wd, _ in groups])
    peak = [lr for _, _, lr, _, _ in groups]
    ascent = [p for _, ps, _, _, up in groups if up for p in ps]
    step, meta = 0, {"elapsed_s": 0.0, "log": []}
    last = latest_checkpoint(ckpt_root) if args.resume else None
    if last is not None:
        step, meta = load_training_state(last, module, opt)
        if dist.is_main:
            print(f"[{phase.name}] resumed from {last} at step {step}", file=sys.stderr)
    fwd = dist.wrap(forward_of(module))
    module.train()
    budget = args.time_budget_min * 60 if args.time_budget_min else None
    t_start, before = time.monotonic(), float(meta["elapsed_s"])
    bar = tqdm(total=total, initial=step, desc=phase.name, unit="step", mininterval=10,
               disable=args.no_progress or not dist.is_main)
    order_epoch, order = -1, None
    while step < total:
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order_epoch, order = epoch, epoch_order(len(features), args.seed, epoch)
        idx = order[pos * per_step: (pos + 1) * per_step]
        for g, base_lr, (name, *_rest) in zip(opt.param_groups, peak, groups):
            g["lr"] = lr_at(step, total, warmup, base_lr) if name == "weights" else base_lr
        opt.zero_grad(set_to_none=True)
        logged: dict[str, float] = {}
        step_loss = 0.0
        for m in range(args.grad_accum):
            micro = [features[k] for k in idx[m * args.batch: (m + 1) * args.batch]][dist.rank::dist.world]
            with torch.autocast("cuda", torch.bfloat16, enabled=args.bf16 and dist.device.type == "cuda"):
                loss = micro_loss(fwd, micro, teacher, args)
            if extra_loss is not None:
                penalty, logged = extra_loss(module, step, total)
                loss = loss + penalty
            check_finite(loss, step + 1)
            (loss / args.grad_accum).backward()
            step_loss += loss.item() / args.grad_accum
        for p in ascent:
            if p.grad is not None:
                p.grad.neg_()  # gradient ascent on the multipliers
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(groups[0][1], args.max_grad_norm)
        opt.step()
        step += 1
        meta["elapsed_s"] = before + time.monotonic() - t_start
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", **{k: f"{v:.3f}" for k, v in logged.items()}, refresh=False)
        if args.log_every and step % args.log_every == 0:
            row = {"step": step, "loss": round(dist.mean(step_loss), 5), **{k: round(v, 5) for k, v in logged.items()}}
            meta["log"].append(row)
            if dist.is_main:
                print(f"[{phase.name}] {row} elapsed {meta['elapsed_s'] / 60:.1f} min", file=sys.stderr, flush=True)
        over = budget is not None and meta["elapsed_s"] > budget
        if dist.is_main and ((args.checkpoint_every and step % args.checkpoint_every == 0) or step == total or over):
            save_training_state(ckpt_root, module, opt, step, meta)
        if over:
            print(f"[{phase.name}] time budget reached at step {step}/{total}", file=sys.stderr)
            break
    bar.close()
    dist.barrier()
    return meta
