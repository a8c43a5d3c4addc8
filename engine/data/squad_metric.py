"""The official SQuAD 2.0 metric (evaluate-v2.0.py semantics) plus the ROC AUC of null-score differences.

Differences from the official script, all deliberate:
  * a question without a prediction scores 0 (exact and F1) at every threshold and stays in every total, with a
    warning; the official script prints "Missing prediction" and then crashes with a KeyError when it splits
    HasAns/NoAns;
  * `find_best_thresh` divides by the number of questions in the dataset (the official divides by the number of
    predicted questions; the two agree when nothing is missing);
  * a qid in `predictions` but not in `na_probs` raises ValueError naming it (the official raises KeyError).
Everything else, including `find_best_thresh` starting from the all-null score with threshold 0.0, follows the
official script line by line.
"""

from __future__ import annotations

import collections
import re
import string
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, and collapse whitespace (official order)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def get_tokens(s: str) -> list[str]:
    """Whitespace tokens of the normalized answer (empty for an empty string)."""
    return normalize_answer(s).split() if s else []


def compute_exact(a_gold: str, a_pred: str) -> int:
    """1 if the normalized strings are equal, else 0."""
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    """Token-overlap F1 in [0, 1]; when either side is empty, 1 if both are, else 0."""
    gold_toks, pred_toks = get_tokens(a_gold), get_tokens(a_pred)
    if not gold_toks or not pred_toks:
        return float(gold_toks == pred_toks)
    num_same = sum((collections.Counter(gold_toks) & collections.Counter(pred_toks)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(pred_toks), num_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def gold_answers(dataset: Mapping[str, Any] | list[dict[str, Any]]) -> dict[str, list[str]]:
    """qid -> gold answer texts of a parsed SQuAD dict (or its "data" list); [] for unanswerable questions."""
    articles = dataset["data"] if isinstance(dataset, Mapping) else dataset
    out: dict[str, list[str]] = {}
    for article in articles:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                if qa["id"] in out:
                    raise ValueError(f"question id {qa['id']!r} occurs twice in the dataset")
                # SQuAD 2.0 marks unanswerables with is_impossible and empty answers; 1.1 has neither flag.
                out[qa["id"]] = [] if qa.get("is_impossible", False) else [a["text"] for a in qa["answers"]]
    return out


def raw_scores(gold: Mapping[str, list[str]], preds: Mapping[str, str]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-qid exact and F1 (0/1 scale) of predicted qids, max over gold answers; no-answer gold is [""]."""
    exact, f1 = {}, {}
    for qid, answers in gold.items():
        if qid not in preds:
            continue
        golds = [a for a in answers if normalize_answer(a)] or [""]
        pred = preds[qid]
        exact[qid] = float(max(compute_exact(a, pred) for a in golds))
        f1[qid] = max(compute_f1(a, pred) for a in golds)
    return exact, f1


def apply_no_ans_threshold(
    scores: Mapping[str, float], na_probs: Mapping[str, float], has_ans: Mapping[str, bool], na_prob_thresh: float
) -> dict[str, float]:
    """Scores after predicting "no answer" wherever na_prob > na_prob_thresh."""
    return {qid: float(not has_ans[qid]) if na_probs[qid] > na_prob_thresh else s for qid, s in scores.items()}


def _eval_dict(exact: Mapping[str, float], f1: Mapping[str, float], qids: Iterable[str]) -> dict[str, float]:
    """exact/f1 (0-100) and total over `qids`; a qid missing from the scores counts 0."""
    qids = list(qids)
    total = len(qids)
    return {
        "exact": 100.0 * sum(exact.get(q, 0.0) for q in qids) / total,
        "f1": 100.0 * sum(f1.get(q, 0.0) for q in qids) / total,
        "total": total,
    }


def find_best_thresh(
    preds: Mapping[str, str], scores: Mapping[str, float], na_probs: Mapping[str, float], has_ans: Mapping[str, bool]
) -> tuple[float, float]:
    """(best score 0-100, its threshold), sweeping na_probs ascending from the all-null score as the official does."""
    # Start as if every question were answered "no answer"; threshold 0.0 stands for that state (official quirk).
    cur = sum(1 for q, h in has_ans.items() if not h and q in scores)
    best, best_thresh = cur, 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if has_ans[qid]:
            diff = scores[qid]
        else:
            diff = -1 if preds[qid] else 0
        cur += diff
        if cur > best:
            best, best_thresh = cur, na_probs[qid]
    return 100.0 * best / len(has_ans), best_thresh


def _require_na_probs(qids: Iterable[str], na_probs: Mapping[str, float]) -> None:
    """ValueError naming the predicted questions that `na_probs` lacks."""
    lacking = [q for q in qids if q not in na_probs]
    if lacking:
        raise ValueError(f"na_probs lacks {len(lacking)} predicted question(s), e.g. {lacking[0]!r}")


def evaluate_gold(
    gold: Mapping[str, list[str]],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> dict[str, float]:
    """Official SQuAD 2.0 scores of `predictions` against qid -> gold texts ([] = unanswerable)."""
    if not gold:
        raise ValueError("the dataset has no questions")
    missing = [q for q in gold if q not in predictions]
    if missing:
        warnings.warn(
            f"{len(missing)} of {len(gold)} questions have no prediction (e.g. {missing[0]!r}); they count as wrong",
            stacklevel=3,
        )
    preds = {q: p for q, p in predictions.items() if q in gold}
    has_na_probs = na_probs is not None
    if na_probs is None:
        na_probs = dict.fromkeys(preds, 0.0)
    else:
        _require_na_probs(preds, na_probs)
        na_probs = {q: float(na_probs[q]) for q in preds}
    has_ans = {q: bool(a) for q, a in gold.items()}
    exact_raw, f1_raw = raw_scores(gold, preds)
    exact = apply_no_ans_threshold(exact_raw, na_probs, has_ans, na_prob_thresh)
    f1 = apply_no_ans_threshold(f1_raw, na_probs, has_ans, na_prob_thresh)
    out = _eval_dict(exact, f1, gold)
    for prefix, want in (("HasAns", True), ("NoAns", False)):
        qids = [q for q, h in has_ans.items() if h is want]
        if qids:
            out.update({f"{prefix}_{k}": v for k, v in _eval_dict(exact, f1, qids).items()})
    if has_na_probs:
        out["best_exact"], out["best_exact_thresh"] = find_best_thresh(preds, exact_raw, na_probs, has_ans)
        out["best_f1"], out["best_f1_thresh"] = find_best_thresh(preds, f1_raw, na_probs, has_ans)
    return out


def bootstrap_best_thresholds(
    gold: Mapping[str, list[str]],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float],
    resamples: int,
    seed: int = 0,
) -> np.ndarray:
    """`find_best_thresh`'s best-F1 threshold on each of `resamples` bootstrap samples of the questions (drawn with
    replacement, as many as there are, from a generator seeded with `seed`): how far the tuned threshold moves when
    the held-out questions are a different draw of the same kind. Same sweep as the official one, vectorised over the
    resamples: the all-null start (threshold 0.0 while nothing beats it), then the questions by ascending na_prob."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    qids = [q for q in gold if q in predictions]
    if not qids:
        raise ValueError("no question of the dataset has a prediction")
    _require_na_probs(qids, na_probs)
    _, f1 = raw_scores(gold, {q: predictions[q] for q in qids})
    na = np.array([float(na_probs[q]) for q in qids], dtype=np.float64)
    # what moving one question from "no answer" to its span changes: its F1 if answerable, else -1 for a span, 0 for ""
    delta = np.array([f1[q] if gold[q] else (-1.0 if predictions[q] else 0.0) for q in qids])
    order = np.argsort(na, kind="stable")
    n = len(qids)
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
    gain = np.cumsum(counts[:, order] * delta[order], axis=1)  # (resamples, n): above the all-null start
    best = gain.argmax(axis=1)  # the first prefix at the maximum, as the sweep's strict ">" keeps
    return np.where(gain[np.arange(resamples), best] > 0, na[order][best], 0.0)


def auc(null_score_diff: Mapping[str, float], gold: Mapping[str, list[str]]) -> float:
    """ROC AUC of null_score_diff ranking unanswerable (positive) above answerable questions; ties count half."""
    qids = [q for q in gold if q in null_score_diff]
    scores = np.array([float(null_score_diff[q]) for q in qids], dtype=np.float64)
    positive = np.array([not gold[q] for q in qids], dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes; got {n_pos} unanswerable and {n_neg} answerable questions")
    # Average ranks (1-based) with ties sharing the mean of the ranks they span.
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
