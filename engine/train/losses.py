"""Every training loss in one place: span cross-entropy, logit distillation, hidden-state matching.

Logit distillation follows Hinton et al. (2015) as used by McCarley et al. (2019): soften both start and
end distributions with a temperature T and minimise T^2 * KL(teacher || student); the T^2 keeps gradient
magnitudes comparable across temperatures. `task_and_distill` combines them the way every phase trains:
(1 - w) * CE + w * KD [+ h * hidden MSE].

Shapes: padded logits (B, S); packed logits `[T]` with `cu_seqlens` int32 `[B+1]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.packing import unpack


def _check_logits(name: str, student: Tensor, teacher: Tensor, mask: Tensor | None) -> None:
    """Raise a clear error for mismatched logits or mask shapes."""
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"{name}: student and teacher logits must both be (batch, seq), got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != student.shape:
            raise ValueError(
                f"{name}: mask must be a bool tensor of shape {tuple(student.shape)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        if not bool(mask.any(dim=-1).all()):
            raise ValueError(f"{name}: every row of mask needs at least one valid position (keep [CLS])")


def _kl_rows(student: Tensor, teacher: Tensor, temperature: float, mask: Tensor | None) -> Tensor:
    """Per-example KL(softmax(teacher/T) || softmax(student/T)) over valid positions, shape (batch,)."""
    s = student.float() / temperature
    t = teacher.float() / temperature
    if mask is not None:
        # Masked positions get probability 0 in both distributions and are then zeroed out of the sum, so
        # neither -inf * 0 nor its gradient can produce NaN.
        s = s.masked_fill(~mask, float("-inf"))
        t = t.masked_fill(~mask, float("-inf"))
    log_ps = F.log_softmax(s, dim=-1)
    log_pt = F.log_softmax(t, dim=-1)
    if mask is not None:
        log_ps = log_ps.masked_fill(~mask, 0.0)
        log_pt = log_pt.masked_fill(~mask, 0.0)
    pt = log_pt.exp()
    if mask is not None:
        pt = pt.masked_fill(~mask, 0.0)
    return (pt * (log_pt - log_ps)).sum(dim=-1)


def distill_loss(
    student_start: Tensor,
    student_end: Tensor,
    teacher_start: Tensor,
    teacher_end: Tensor,
    temperature: float,
    mask: Tensor | None = None,
) -> Tensor:
    """T^2 * mean over {start, end} of the batch-mean KL(teacher_T || student_T); logits (B, S), mask (B, S) bool.

    mask is True at positions that may hold an answer (context tokens and [CLS]); other positions are
    excluded from both softmaxes. The teacher is detached.
    """
    if temperature <= 0.0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    _check_logits("start", student_start, teacher_start, mask)
    _check_logits("end", student_end, teacher_end, mask)
    kl_start = _kl_rows(student_start, teacher_start.detach(), temperature, mask).mean()
    kl_end = _kl_rows(student_end, teacher_end.detach(), temperature, mask).mean()
    return temperature**2 * 0.5 * (kl_start + kl_end)


def hidden_state_loss(student_hiddens: Sequence[Tensor], teacher_hiddens: Sequence[Tensor], mask: Tensor) -> Tensor:
    """MSE over valid tokens and hidden units, averaged over layers; hiddens (B, S, D) each, mask (B, S) bool.

    The caller picks which teacher layer each student layer matches; both lists must be the same length.
    """
    if len(student_hiddens) != len(teacher_hiddens) or len(student_hiddens) == 0:
        raise ValueError(
            f"need the same non-zero number of student and teacher layers, got "
            f"{len(student_hiddens)} and {len(teacher_hiddens)}"
        )
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask must be a (batch, seq) bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    n_valid = mask.sum()
    if int(n_valid) == 0:
        raise ValueError("mask selects no tokens")
    w = mask.unsqueeze(-1).float()  # (B, S, 1)
    losses = []
    for i, (hs, ht) in enumerate(zip(student_hiddens, teacher_hiddens)):
        if hs.shape != ht.shape or hs.shape[:2] != mask.shape:
            raise ValueError(
                f"layer {i}: student {tuple(hs.shape)} and teacher {tuple(ht.shape)} hiddens must match and "
                f"start with the mask shape {tuple(mask.shape)}"
            )
        sq = (hs.float() - ht.detach().float()).pow(2) * w  # (B, S, D), zero at padding
        losses.append(sq.sum() / (n_valid * hs.shape[-1]))
    return torch.stack(losses).mean()


def qa_ce_loss(start_logits: Tensor, end_logits: Tensor, start_pos: Tensor, end_pos: Tensor) -> Tensor:
    """Mean of start and end cross-entropy (batch-averaged); logits (B, S) float, positions (B,) long in [0, S)."""
    if start_logits.dim() != 2 or start_logits.shape != end_logits.shape:
        raise ValueError(
            f"start/end logits must both be (batch, seq), got {tuple(start_logits.shape)} and {tuple(end_logits.shape)}"
        )
    seq = start_logits.shape[1]
    for name, pos in (("start_pos", start_pos), ("end_pos", end_pos)):
        if pos.shape != start_logits.shape[:1]:
            raise ValueError(f"{name} must have shape ({start_logits.shape[0]},), got {tuple(pos.shape)}")
        if bool(((pos < 0) | (pos >= seq)).any()):
            raise ValueError(f"{name} must lie in [0, {seq}); point unanswerable windows at [CLS] (index 0)")
    return 0.5 * (F.cross_entropy(start_logits.float(), start_pos) + F.cross_entropy(end_logits.float(), end_pos))


def span_loss(
    start: Tensor, end: Tensor, cu_seqlens: Tensor, max_seqlen: int, start_pos: Tensor, end_pos: Tensor
) -> Tensor:
    """Mean start/end cross-entropy of packed logits `[T]`, each window normalised over its own tokens only."""
    # Padding gets -inf, so it has probability 0 and no gradient.
    s = unpack(start.float(), cu_seqlens, max_seqlen, fill=float("-inf"))  # (B, S)
    e = unpack(end.float(), cu_seqlens, max_seqlen, fill=float("-inf"))
    return qa_ce_loss(s, e, start_pos, end_pos)


@dataclass(frozen=True)
class DistillConfig:
    """How a student learns from its teacher: KL weight w (CE gets 1 - w), temperature, hidden-MSE weight."""

    weight: float = 0.9
    temperature: float = 2.0
    hidden_weight: float = 0.0


def task_and_distill(
    start: Tensor,
    end: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    start_pos: Tensor,
    end_pos: Tensor,
    teacher: tuple[Tensor, Tensor] | None = None,
    cfg: DistillConfig | None = None,
    hidden: tuple[Sequence[Tensor], Sequence[Tensor]] | None = None,
) -> Tensor:
    """(1 - w)·CE + w·KD [+ h·hidden MSE] of packed student logits `[T]` against packed teacher logits `[T]`.

    `hidden` is (student, teacher) lists of packed `[T, d]` layer outputs, matched one to one.
    """
    ce = span_loss(start, end, cu_seqlens, max_seqlen, start_pos, end_pos)
    if teacher is None or cfg is None:
        return ce
    cu, n = cu_seqlens, max_seqlen
    mask = unpack(torch.ones_like(start, dtype=torch.bool), cu, n, fill=False)  # (B, S) real tokens
    kd = distill_loss(
        unpack(start, cu, n),
        unpack(end, cu, n),
        unpack(teacher[0], cu, n),
        unpack(teacher[1], cu, n),
        cfg.temperature,
        mask,
    )
    loss = (1 - cfg.weight) * ce + cfg.weight * kd
    if hidden is not None and cfg.hidden_weight > 0:
        # Packed hiddens (T, d) as one (1, T, d) row; student and teacher have the same depth.
        ones = torch.ones(1, start.shape[0], dtype=torch.bool, device=start.device)
        loss = loss + cfg.hidden_weight * hidden_state_loss(
            [h[None] for h in hidden[0]], [h[None] for h in hidden[1]], ones
        )
    return loss
