"""SQuAD 2.0 span decoding: best valid spans across windows versus the CLS null score."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.features import Window


@dataclass(frozen=True)
class Span:
    """A candidate answer: char span [start, end) in the context and its start+end logit sum."""

    score: float
    start: int
    end: int


def window_spans(
    start_logits: np.ndarray, end_logits: np.ndarray, window: Window, max_answer_length: int, top_k: int
) -> list[Span]:
    """The `top_k` best context spans of one window (end >= start, at most `max_answer_length` tokens)."""
    ctx = [i for i, off in enumerate(window.offsets) if off is not None]
    if not ctx:
        return []
    lo, hi = ctx[0], ctx[-1] + 1  # context tokens are contiguous
    s = start_logits[lo:hi].astype(np.float64)
    e = end_logits[lo:hi].astype(np.float64)
    n = hi - lo
    scores = s[:, None] + e[None, :]  # (start, end)
    i, j = np.indices((n, n))
    scores[(j < i) | (j - i >= max_answer_length)] = -np.inf
    k = min(top_k, n * n)
    flat = np.argpartition(-scores, k - 1, axis=None)[:k]
    out = []
    for f in flat[np.argsort(-scores.reshape(-1)[flat], kind="stable")]:
        a, b = divmod(int(f), n)
        if np.isfinite(scores[a, b]):
            out.append(Span(float(scores[a, b]), window.offsets[lo + a][0], window.offsets[lo + b][1]))
    return out


def decode(
    windows: list[Window], starts: list[np.ndarray], ends: list[np.ndarray], max_answer_length: int = 30, top_k: int = 1
) -> tuple[list[Span], float]:
    """Best `top_k` distinct spans over all windows of one example, and the null score (min CLS score)."""
    null = min(float(s[0]) + float(e[0]) for s, e in zip(starts, ends))
    best: dict[tuple[int, int], Span] = {}
    for w, s, e in zip(windows, starts, ends):
        for sp in window_spans(s, e, w, max_answer_length, top_k):
            key = (sp.start, sp.end)
            if key not in best or best[key].score < sp.score:
                best[key] = sp  # the same chars seen from two overlapping windows: keep the better score
    spans = sorted(best.values(), key=lambda sp: -sp.score)[:top_k]
    return spans, null
