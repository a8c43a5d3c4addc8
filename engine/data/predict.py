"""SQuAD 2.0 predictions and metrics of any packed QA model (RaggedQAModel, the gated student, ...).

Inference-side code: training imports it, never the other way round. Windows are grouped by length into
packed batches of at most `tokens_per_batch` tokens, decoded with `engine.decode.decode` (QAEngine's rules).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from engine.data.squad import EvalFeature, Example, eval_features, gold_of
from engine.data.squad_metric import auc, evaluate_gold
from engine.decode import decode
from engine.features import WindowMaker, pack_windows

MAX_ANSWER_TOKENS = 30


def _eval_batches(features: Sequence[EvalFeature], tokens_per_batch: int) -> Iterator[list[int]]:
    """Feature indices sorted by length, grouped into batches of at most `tokens_per_batch` tokens."""
    order = sorted(range(len(features)), key=lambda k: len(features[k].window.input_ids))
    batch: list[int] = []
    for k in order:
        n = len(features[k].window.input_ids)
        if batch and (len(batch) + 1) * n > tokens_per_batch:
            yield batch
            batch = []
        batch.append(k)
    if batch:
        yield batch


@torch.inference_mode()
def predict(
    model: nn.Module,
    examples: Sequence[Example],
    maker: WindowMaker,
    tokens_per_batch: int = 8192,
    max_answer_length: int = MAX_ANSWER_TOKENS,
    progress: bool = True,
) -> tuple[dict[str, str], dict[str, float]]:
    """(best non-null answer text, null_score_diff) per qid, decoded by `engine.decode.decode` (QAEngine's rules)."""
    was_training = model.training
    model.eval()
    features = eval_features(examples, maker)
    device = next(model.parameters()).device
    logits: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(features)
    bar = tqdm(total=len(features), desc="eval", unit="win", disable=not progress, mininterval=5)
    for idx in _eval_batches(features, tokens_per_batch):
        packed = pack_windows([features[k].window for k in idx])
        on = packed.to(device)
        start, end = model(on.input_ids, on.token_type_ids, on.cu_seqlens, on.max_seqlen)
        start, end = start.float().cpu().numpy(), end.float().cpu().numpy()  # (T,)
        bounds = packed.cu_seqlens.tolist()
        for b, k in enumerate(idx):
            logits[k] = (start[bounds[b] : bounds[b + 1]], end[bounds[b] : bounds[b + 1]])
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    per_example: list[list[int]] = [[] for _ in examples]
    for k, f in enumerate(features):
        per_example[f.example_index].append(k)
    preds, diffs = {}, {}
    for n, e in enumerate(examples):
        ks = per_example[n]
        spans, null = decode(
            [features[k].window for k in ks], [logits[k][0] for k in ks], [logits[k][1] for k in ks], max_answer_length
        )
        best = spans[0] if spans else None
        preds[e.qid] = e.context[best.start : best.end] if best else ""
        diffs[e.qid] = null - (best.score if best else -np.inf)
    return preds, diffs


def predictions_at(
    best_text: Mapping[str, str], null_score_diff: Mapping[str, float], threshold: float
) -> dict[str, str]:
    """Final SQuAD 2.0 answers: "" where null_score_diff > threshold, else the best span's text."""
    return {q: "" if null_score_diff[q] > threshold else t for q, t in best_text.items()}


def evaluate_model(
    model: nn.Module,
    examples: Sequence[Example],
    maker: WindowMaker,
    tokens_per_batch: int = 8192,
    progress: bool = True,
) -> dict[str, Any]:
    """Official metrics at threshold 0 and at the tuned best-F1 threshold, plus the null-score AUC (or None)."""
    best_text, diffs = predict(model, examples, maker, tokens_per_batch, progress=progress)
    gold = gold_of(examples)
    at_zero = evaluate_gold(gold, best_text, diffs, na_prob_thresh=0.0)
    threshold = float(at_zero["best_f1_thresh"])
    at_best = evaluate_gold(gold, best_text, diffs, na_prob_thresh=threshold)
    has_both = any(gold.values()) and not all(gold.values())
    return {
        "at_zero": at_zero,
        "at_best": at_best,
        "null_threshold": threshold,
        "auc": auc(diffs, gold) if has_both else None,
        "predictions": best_text,
        "null_score_diff": diffs,
    }


THRESHOLD_RULES = ("heldout", "teacher-rate")


def add_threshold_arg(ap: argparse.ArgumentParser, default: str | None) -> None:
    """--threshold-rule of the student CLIs (engine.prune, engine.prune_fast): how the stored null threshold is
    chosen on the held-out data (`stored_threshold`). A `default` of None leaves the choice to the CLI."""
    ap.add_argument(
        "--threshold-rule",
        choices=THRESHOLD_RULES,
        default=default,
        help="the stored null threshold: the student's own held-out best-F1 threshold (heldout), or the one at which "
        "it abstains on as many held-out questions as the teacher at the teacher's stored threshold (teacher-rate)"
        + (f"; default {default}" if default else ""),
    )


def rate_matched_threshold(
    null_score_diff: Mapping[str, float], reference: Mapping[str, float], reference_threshold: float
) -> float:
    """The threshold at which a model abstains (null_score_diff > threshold) on as many of the shared questions as
    `reference` (its teacher's null_score_diff) does at `reference_threshold`: the midpoint between the k-th and
    (k+1)-th largest finite score. Needs no labels, so it is as stable as the question count allows."""
    qids = [q for q in reference if q in null_score_diff]
    if not qids:
        raise ValueError("rate_matched_threshold: the two score sets share no question")
    k = sum(reference[q] > reference_threshold for q in qids)
    s = np.array([null_score_diff[q] for q in qids], dtype=np.float64)
    k -= int(np.isposinf(s).sum())  # no span at all: abstains at any finite threshold
    fin = np.sort(s[np.isfinite(s)])[::-1]
    if len(fin) == 0:
        return float(reference_threshold)
    if k <= 0:
        return float(fin[0])
    if k >= len(fin):
        return float(fin[-1] - 1.0)
    return float((fin[k - 1] + fin[k]) / 2)


def stored_threshold(
    rule: str,
    student: dict[str, Any],
    teacher: dict[str, Any] | None,
    teacher_threshold: float | None,
    examples: Sequence[Example],
) -> dict[str, Any]:
    """`student` (an `evaluate_model` result on the held-out `examples`) re-scored at the null threshold that
    `rule` picks, which becomes its "null_threshold" and "at_best": heldout = the student's own held-out best-F1
    threshold (evaluate_model's); teacher-rate = the threshold at which the student abstains on as many held-out
    questions as the teacher (`teacher`, its evaluate_model result) does at its stored `teacher_threshold` (or at
    the teacher's held-out best when it stores none)."""
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; choose from {', '.join(THRESHOLD_RULES)}")
    if rule == "heldout":
        return {**student, "threshold_rule": rule}
    if teacher is None:
        raise ValueError("the teacher-rate threshold needs the teacher's held-out scores (drop --no-teacher-eval)")
    ref = teacher["null_threshold"] if teacher_threshold is None else teacher_threshold
    threshold = rate_matched_threshold(student["null_score_diff"], teacher["null_score_diff"], ref)
    at = evaluate_gold(gold_of(examples), student["predictions"], student["null_score_diff"], na_prob_thresh=threshold)
    return {**student, "at_best": at, "null_threshold": threshold, "threshold_rule": rule}
