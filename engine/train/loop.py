"""The one training loop: fine-tuning, L0 gate training and the fixed-structure fine-tune all run here.

Per optimizer step (read top to bottom in `train`):
  1. the step's windows come from `epoch_order` (seeded per epoch, grouped by length), split into
     `grad_accum` micro-batches (and across DDP ranks);
  2. each micro-batch is packed padding-free, the student runs under bf16 autocast if asked, and the loss
     is `engine.train.losses.task_and_distill` (CE, plus KD against `teacher` logits, live or cached);
  3. `hooks.penalty` adds a phase's extra term (the L0 Lagrangian, with its target schedule);
  4. NaN guard, backward, gradient clipping of the `clipped` groups, one AdamW step over all groups
     (`ascent` groups are maximised by AdamW itself);
  5. log, `hooks.evaluate` (epoch ends, every `eval_every` steps, the end), resumable checkpoint, time budget.
State (module, optimizer, RNG, step, metadata) is checkpointed every `checkpoint_every` steps; `resume`
continues from the newest state and ends exactly where an uninterrupted run ends. SIGTERM or SIGINT (`timeout`, a
scheduler's pre-emption, Ctrl-C) stops at the end of the current step: its state is saved and `Interrupted` (exit
status 128 + the signal) is raised, so nothing since the last periodic checkpoint is lost. A second Ctrl-C stops at
once; a repeated SIGTERM (a supervisor that resends it) changes nothing, SIGKILL remains the hard stop. Under
torchrun the workers run in sessions of their own: a SIGTERM to the job reaches them through torchrun, which waits
(30 s) for them to save and exit.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from engine.data.squad import TrainFeature
from engine.prune.distributed import Dist
from engine.train.batching import collate, epoch_order
from engine.train.config import ParamGroup, Precision, TrainConfig, make_optimizer
from engine.train.losses import DistillConfig, task_and_distill
from engine.train.state import check_finite, latest_checkpoint, load_training_state, lr_at, save_training_state
from engine.train.teacher import TeacherSource

Penalty = Callable[[int, int], tuple[torch.Tensor, dict[str, float]]]  # (step, total) -> (penalty, logged scalars)
Evaluate = Callable[[int, dict[str, Any]], None]  # (step, meta); may record results in meta (checkpointed)


@dataclass(frozen=True)
class Hooks:
    """What a phase plugs into the loop besides its model and parameter groups."""

    penalty: Penalty | None = None
    evaluate: Evaluate | None = None


def curve_hook(name: str, score: Callable[[], dict[str, Any]]) -> Evaluate:
    """An `evaluate` hook that appends {"step", **score()} to meta["curve"] (checkpointed with the trainer, so a
    resumed phase keeps its curve) and logs the point: a phase's held-out step curve."""

    def hook(step: int, meta: dict[str, Any]) -> None:
        row = {"step": step, **score()}
        meta.setdefault("curve", []).append(row)
        print(f"[{name}] held-out @ step {step}: f1 {row['f1']:.2f} best_f1 {row['best_f1']:.2f}", file=sys.stderr)

    return hook


class Interrupted(SystemExit):
    """Training stopped by a signal after saving its state; the exit status is 128 + the signal number."""


@contextlib.contextmanager
def _stop_requests() -> Iterator[list[int]]:
    """Catch SIGTERM/SIGINT while training: the yielded list receives the signal numbers. A second SIGINT raises
    KeyboardInterrupt at once; a repeated SIGTERM changes nothing. The previous handlers come back when training
    ends. Off the main thread, where Python cannot install handlers, nothing is caught."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    caught = (signal.SIGTERM, signal.SIGINT)
    old = {s: signal.getsignal(s) for s in caught}

    def handler(signum: int, frame: Any) -> None:
        if got and signum == signal.SIGINT:
            raise KeyboardInterrupt
        got.append(signum)

    for s in caught:
        signal.signal(s, handler)
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def new_meta() -> dict[str, Any]:
    """The loop's checkpointed metadata: train time, per-step losses, log rows, eval history (hooks may add)."""
    return {"elapsed_s": 0.0, "losses": [], "log": [], "history": [], "best": None, "stopped_by": "steps", "windows": 0}


def train(
    module: nn.Module,
    features: Sequence[TrainFeature],
    cfg: TrainConfig,
    groups: Sequence[ParamGroup],
    ckpt_root: Path,
    *,
    forward: nn.Module | None = None,
    teacher: TeacherSource | None = None,
    distill: DistillConfig | None = None,
    hooks: Hooks = Hooks(),
    dist: Dist | None = None,
) -> dict[str, Any]:
    """Train `module` (called through `forward`, default the module itself) for one phase; returns the metadata.

    `module` is what gets checkpointed: it must own every parameter in `groups` (e.g. weights, gates and
    Lagrange multipliers together).
    """
    dist = dist or Dist()
    forward = forward if forward is not None else module
    n_steps_epoch, total = cfg.steps_per_epoch(len(features)), cfg.total_steps(len(features))
    warmup = round(cfg.warmup * total)
    opt = make_optimizer(groups)
    step, meta = 0, new_meta()
    last = latest_checkpoint(ckpt_root) if cfg.resume else None
    if last is not None:
        step, meta = load_training_state(last, module, opt)
        if dist.is_main:
            print(f"[{cfg.name}] resumed from {last} at step {step}", file=sys.stderr)
    fwd = dist.wrap(forward)
    module.train()
    lengths = [len(f.input_ids) for f in features]
    want_hidden = teacher is not None and distill is not None and distill.hidden_weight > 0
    clipped = [p for g in groups if g.clipped for p in g.params]
    bf16 = cfg.precision is Precision.BF16
    budget = cfg.time_budget_min * 60 if cfg.time_budget_min else None
    t_start, before = time.monotonic(), float(meta["elapsed_s"])
    t_log, windows_log, loss_log = time.monotonic(), 0, []
    bar = tqdm(
        total=total,
        initial=step,
        desc=cfg.name,
        unit="step",
        mininterval=10,
        disable=not cfg.progress or not dist.is_main,
    )
    with _stop_requests() as signals:
        order_epoch, order = -1, None
        while step < total:
            epoch, pos = divmod(step, n_steps_epoch)
            if epoch != order_epoch:
                order_epoch, order = epoch, epoch_order(lengths, cfg.per_step, cfg.seed, epoch, cfg.group_by_length)
            idx = order[pos * cfg.per_step : (pos + 1) * cfg.per_step]
            for g, spec in zip(opt.param_groups, groups):
                g["lr"] = lr_at(step, total, warmup, spec.lr) if spec.scheduled else spec.lr
            opt.zero_grad(set_to_none=True)
            logged: dict[str, float] = {}
            step_loss = 0.0
            for m in range(cfg.grad_accum):
                micro = idx[m * cfg.batch : (m + 1) * cfg.batch][dist.rank :: dist.world]
                batch, sp, ep = collate([features[k] for k in micro])
                batch, sp, ep = batch.to(dist.device), sp.to(dist.device), ep.to(dist.device)
                with torch.autocast(dist.device.type, torch.bfloat16, enabled=bf16):
                    out = fwd(
                        batch.input_ids,
                        batch.token_type_ids,
                        batch.cu_seqlens,
                        batch.max_seqlen,
                        output_hidden_states=want_hidden,
                    )
                t_out = teacher.logits(micro, batch, want_hidden) if teacher is not None else None
                loss = task_and_distill(
                    out[0].float(),
                    out[1].float(),
                    batch.cu_seqlens,
                    batch.max_seqlen,
                    sp,
                    ep,
                    teacher=t_out[:2] if t_out is not None else None,
                    cfg=distill,
                    hidden=(out[2], t_out[2]) if want_hidden else None,
                )
                if hooks.penalty is not None:
                    penalty, logged = hooks.penalty(step, total)
                    loss = loss + penalty
                check_finite(loss, step + 1)
                (loss / cfg.grad_accum).backward()
                step_loss += loss.item() / cfg.grad_accum
                windows_log += len(micro) * dist.world
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(clipped, cfg.max_grad_norm)
            opt.step()
            step += 1
            meta["elapsed_s"] = before + time.monotonic() - t_start
            meta["windows"] += len(idx)
            meta["losses"].append(round(step_loss, 5))
            loss_log.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", **{k: f"{v:.3f}" for k, v in logged.items()}, refresh=False)
            if cfg.log_every and step % cfg.log_every == 0:
                rate = windows_log / (time.monotonic() - t_log)
                row = {
                    "step": step,
                    "loss": round(dist.mean(sum(loss_log) / len(loss_log)), 5),
                    "lr": opt.param_groups[0]["lr"],
                    "windows_per_s": round(rate, 2),
                    **{k: round(v, 5) for k, v in logged.items()},
                }
                meta["log"].append(row)
                if dist.is_main:
                    eta = (total - step) * cfg.per_step / max(rate, 1e-9) / 60
                    print(
                        f"[{cfg.name}] step {step}/{total} epoch {step / n_steps_epoch:.3f} {row} "
                        f"elapsed {meta['elapsed_s'] / 60:.1f} min eta {eta:.1f} min",
                        file=sys.stderr,
                        flush=True,
                    )
                t_log, windows_log, loss_log = time.monotonic(), 0, []
            over = budget is not None and meta["elapsed_s"] > budget
            if over:
                meta["stopped_by"] = "time_budget"
            periodic = bool(cfg.eval_every) and step % cfg.eval_every == 0
            if (
                dist.is_main
                and hooks.evaluate is not None
                and (step % n_steps_epoch == 0 or step == total or over or periodic)
            ):
                hooks.evaluate(step, meta)
                module.train()
            stop = dist.any(bool(signals))  # a stop request (also one during the evaluation): every rank, this step
            if dist.is_main and (
                (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == total or over or stop
            ):
                save_training_state(ckpt_root, module, opt, step, meta, keep=cfg.keep_checkpoints)
            if over:
                print(
                    f"[{cfg.name}] time budget of {cfg.time_budget_min} min reached at step {step}/{total}; stopping",
                    file=sys.stderr,
                )
                break
            if stop:
                dist.barrier()  # no rank exits (and makes torchrun stop the others) before rank 0 has saved
                name = signal.Signals(signals[0]).name if signals else "a signal on another rank"
                if dist.is_main:
                    print(
                        f"[{cfg.name}] {name} at step {step}/{total}: state saved; rerun with --resume to continue",
                        file=sys.stderr,
                        flush=True,
                    )
                bar.close()
                raise Interrupted(128 + (signals[0] if signals else signal.SIGTERM))
    bar.close()
    dist.barrier()
    meta["steps"], meta["total_steps"], meta["steps_per_epoch"] = step, total, n_steps_epoch
    return meta
