"""Where a student's teacher logits come from: the live teacher run on every step, or a cache computed once by the
inference engine (engine.train.logit_cache). Hidden-state distillation needs the live teacher (`LiveTeacher`).

Shapes: packed logits `[T]` (fp32), `cu_seqlens` int32 `[B+1]`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from engine.data.squad import TrainFeature
from engine.features import PackedBatch, WindowSettings

# Precisions an artifact can hold (engine.build_model --dtype) -> the name used in cache keys and file names.
PRECISIONS = ("float32", "bfloat16", "int8")


def add_teacher_logits_args(ap: argparse.ArgumentParser, default: str) -> None:
    """--teacher-logits, --teacher-cache and --teacher-precision (engine.prune, engine.prune_fast)."""
    ap.add_argument(
        "--teacher-logits",
        choices=["cached", "live", "auto"],
        default=default,
        help="cached: teacher logits computed once by the inference engine on the CPU and reused by every student "
        "of this teacher on the same windows; live: the teacher runs on every training step; auto: cached when "
        f"training on the CPU, live on a GPU (default {default}; hidden-state distillation always runs it live)",
    )
    ap.add_argument("--teacher-cache", type=Path, help="cache file or directory (default: OUT/../teacher-logits)")
    ap.add_argument(
        "--teacher-precision",
        choices=PRECISIONS,
        default="float32",
        help="artifact precision the cached teacher logits are computed in",
    )


def teacher_source(
    args: argparse.Namespace,
    settings: WindowSettings,
    features: Sequence[TrainFeature],
    device: torch.device,
    live: Callable[[], nn.Module],
    threads: int | None = None,
    teacher_dir: Path | None = None,
) -> TeacherSource:
    """What the add_teacher_logits_args flags (and --teacher, --out, --no-progress, --hidden-weight) ask for on
    `device`: the teacher module `live()` builds, run on every step, or its logits for `features` from the cache.
    `teacher_dir`: the checkpoint `live()` loads, if not --teacher (the cache is keyed by it)."""
    from engine.train.logit_cache import cached_teacher  # the cache's sources subclass TeacherSource, defined here

    choice = args.teacher_logits
    if choice == "live" or (choice == "auto" and device.type == "cuda") or getattr(args, "hidden_weight", 0) > 0:
        return LiveTeacher(live())
    cache = args.teacher_cache or Path(args.out).resolve().parent / "teacher-logits"
    return cached_teacher(
        teacher_dir or args.teacher,
        settings,
        features,
        cache,
        args.teacher_precision,
        threads=threads,
        progress=not args.no_progress,
    )


class TeacherSource:
    """Teacher outputs for a micro-batch of training windows (by index into the run's feature list)."""

    needs_hidden: bool = False

    def logits(
        self, indices: Sequence[int], batch: PackedBatch, want_hidden: bool
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None]:
        """Packed start, end `[T]` (and layer outputs `[T, d]` if `want_hidden`) of the windows `indices`, on the
        device of `batch`."""
        raise NotImplementedError


class LiveTeacher(TeacherSource):
    """Runs the frozen teacher module on every micro-batch (needed for hidden-state distillation)."""

    needs_hidden = True

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def logits(self, indices, batch, want_hidden):
        out = self.model(
            batch.input_ids, batch.token_type_ids, batch.cu_seqlens, batch.max_seqlen, output_hidden_states=want_hidden
        )
        return out[0].float(), out[1].float(), (out[2] if want_hidden else None)
