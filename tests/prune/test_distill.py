"""Distillation and span losses against torch.nn.functional references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.train.losses import distill_loss, hidden_state_loss, qa_ce_loss

B, S = 3, 11


def _logits(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (start, end) pair of (B, S) logits."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, generator=g) * 2, torch.randn(B, S, generator=g) * 2


def _ref_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """Batch-mean KL(teacher_T || student_T) via F.kl_div."""
    log_s, log_t = F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)


def test_zero_for_identical_logits_positive_otherwise() -> None:
    s_start, s_end = _logits(0)
    t_start, t_end = _logits(1)
    assert distill_loss(s_start, s_end, s_start.clone(), s_end.clone(), 2.0).abs().item() < 1e-6
    assert distill_loss(s_start, s_end, t_start, t_end, 2.0).item() > 1e-3


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_matches_kl_div(temperature: float) -> None:
    s_start, s_end = _logits(2)
    t_start, t_end = _logits(3)
    ref = temperature**2 * 0.5 * (_ref_kl(s_start, t_start, temperature) + _ref_kl(s_end, t_end, temperature))
    got = distill_loss(s_start, s_end, t_start, t_end, temperature)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_temperature_scaling() -> None:
    s_start, s_end = _logits(4)
    t_start, t_end = _logits(5)
    # Scaling every logit by T at temperature T gives T^2 times the T=1 loss on the original logits.
    base = distill_loss(s_start, s_end, t_start, t_end, 1.0)
    scaled = distill_loss(3 * s_start, 3 * s_end, 3 * t_start, 3 * t_end, 3.0)
    torch.testing.assert_close(scaled, 9 * base, atol=1e-5, rtol=1e-5)
    # A higher temperature softens both distributions, so the KL itself (without the T^2) shrinks.
    assert distill_loss(s_start, s_end, t_start, t_end, 4.0) / 16 < base


def test_masked_positions_are_ignored() -> None:
    s_start, s_end = _logits(6)
    t_start, t_end = _logits(7)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, 7:] = False
    mask[1, 3:5] = False
    mask[2, 1:] = False  # only [CLS] left: KL over a single position is 0
    got = distill_loss(s_start, s_end, t_start, t_end, 2.0, mask=mask)
    # Changing logits at masked positions, even to huge values, leaves the loss unchanged.
    noise = torch.where(mask, torch.zeros(B, S), torch.full((B, S), 1e4))
    again = distill_loss(s_start + noise, s_end - noise, t_start - noise, t_end + noise, 2.0, mask=mask)
    torch.testing.assert_close(again, got)
    # Reference: per-row KL over the valid positions only.
    ref = 0.0
    for lo_s, lo_t in ((s_start, t_start), (s_end, t_end)):
        rows = [_ref_kl(lo_s[i, mask[i]][None], lo_t[i, mask[i]][None], 2.0) for i in range(B)]
        ref = ref + torch.stack(rows).mean()
    torch.testing.assert_close(got, 4.0 * 0.5 * ref, atol=1e-6, rtol=1e-5)


def test_gradients_are_finite_with_mask_and_teacher_detached() -> None:
    s_start, s_end = (x.requires_grad_() for x in _logits(8))
    t_start, t_end = (x.requires_grad_() for x in _logits(9))
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[:, 5:] = False
    distill_loss(s_start, s_end, t_start, t_end, 2.0, mask=mask).backward()
    assert torch.isfinite(s_start.grad).all() and torch.isfinite(s_end.grad).all()
    assert (s_start.grad[:, 5:] == 0).all()
    assert t_start.grad is None


def test_distill_validation() -> None:
    s, e = _logits(10)
    with pytest.raises(ValueError, match="at least one valid position"):
        distill_loss(s, e, s, e, 1.0, mask=torch.zeros(B, S, dtype=torch.bool))
    with pytest.raises(ValueError, match="must both be"):
        distill_loss(s, e, s[:, :-1], e, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(s, e, s, e, 0.0)


def test_hidden_state_loss_matches_masked_mse() -> None:
    g = torch.Generator().manual_seed(11)
    d = 6
    student = [torch.randn(B, S, d, generator=g) for _ in range(3)]
    teacher = [torch.randn(B, S, d, generator=g) for _ in range(3)]
    mask = torch.rand(B, S, generator=g) > 0.4
    mask[:, 0] = True
    ref = torch.stack([F.mse_loss(s[mask], t[mask]) for s, t in zip(student, teacher)]).mean()
    got = hidden_state_loss(student, teacher, mask)
    torch.testing.assert_close(got, ref)
    # Padding positions do not matter.
    bumped = [torch.where(mask[..., None], s, s + 100.0) for s in student]
    torch.testing.assert_close(hidden_state_loss(bumped, teacher, mask), got)
    assert hidden_state_loss(teacher, teacher, mask).item() == 0.0
    with pytest.raises(ValueError, match="same non-zero number"):
        hidden_state_loss(student[:2], teacher, mask)


def test_qa_ce_loss_matches_cross_entropy() -> None:
    s_start, s_end = _logits(12)
    start = torch.tensor([0, 4, 10])
    end = torch.tensor([0, 6, 10])
    ref = (F.cross_entropy(s_start, start) + F.cross_entropy(s_end, end)) / 2
    torch.testing.assert_close(qa_ce_loss(s_start, s_end, start, end), ref)
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        qa_ce_loss(s_start, s_end, torch.tensor([0, 4, 11]), end)
