"""Harder unanswerable training examples for SQuAD 2.0-style abstention.

The train files here are ~3-7% unanswerable while dev is 50%, and pairing a question with another paragraph
of its article was measured to be too easy (null-score AUC 0.46 on dev). Three sources, in this order:
  (a) sentence removal: the question's own paragraph minus every sentence that overlaps a gold answer span.
      The topic, the entities and most of the wording stay, only the answer-bearing sentence goes. A candidate
      is dropped when any gold answer text still occurs in what is left (case-insensitive), or when at least
      half of an answer's normalized words do (so "Allen won ..." does not survive removing "Kris Allen");
  (b) the real unanswerable questions, repeated `real_factor` times;
  (c) optionally, another paragraph of the same article that does not contain the answer text.
`make_negatives` returns only negatives; `with_negatives` returns the answerable examples plus them.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace

from engine.data.squad import Example
from engine.data.squad_metric import normalize_answer

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) before whitespace + a capital.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z])")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Char spans [start, end) of the sentences of `text` (split on .!? followed by whitespace and a capital)."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        # Keep a closing quote/bracket with the sentence it closes.
        end = m.start() + len(m.group(0).rstrip())
        spans.append((start, end))
        start = m.end()
    spans.append((start, len(text)))
    return [(s, e) for s, e in spans if text[s:e].strip()]


def remove_answer_sentences(e: Example) -> str | None:
    """`e.context` without the sentences overlapping any gold answer, or None if no clean context is left."""
    if e.is_impossible or not e.answers:
        return None
    answer_spans = [(s, s + len(t)) for t, s in e.answers]
    kept = [(s, t) for s, t in sentence_spans(e.context) if not any(a < t and s < b for a, b in answer_spans)]
    if not kept:
        return None
    context = " ".join(e.context[s:t] for s, t in kept)
    if any(text.lower() in context.lower() for text, _ in e.answers):
        return None
    # Also reject partial leftovers ("Allen won ..." after removing "Kris Allen"): half the answer's words remain.
    rest = set(normalize_answer(context).split())
    for text, _ in e.answers:
        words = normalize_answer(text).split()
        if words and 2 * sum(w in rest for w in words) >= len(words):
            return None
    return context


def _other_paragraph(e: Example, contexts: Sequence[str], rng: random.Random) -> str | None:
    """A random other context of e's article that contains none of e's answer texts, or None."""
    answers = [t.lower() for t, _ in e.answers]
    options = [c for c in contexts if c != e.context and not any(a in c.lower() for a in answers)]
    return rng.choice(options) if options else None


def make_negatives(
    examples: Sequence[Example], ratio: float, seed: int, real_factor: int = 2, other_paragraph_share: float = 0.0
) -> list[Example]:
    """Unanswerable examples numbering about `ratio` x (#answerable examples); deterministic in `seed`.

    The budget is filled first with the real unanswerables (each `real_factor` times, at most the budget), then
    `other_paragraph_share` of the remainder with other-paragraph pairs and the rest with sentence removals
    (one per answerable question at most). If sentence removal runs short, other-paragraph pairs make up the
    difference. New qids are `{qid}_nosent`, `{qid}_nopara` and `{qid}_dup{k}`.
    """
    if ratio < 0 or real_factor < 0 or not 0.0 <= other_paragraph_share <= 1.0:
        raise ValueError(
            f"need ratio >= 0, real_factor >= 0, 0 <= other_paragraph_share <= 1; got {ratio}, "
            f"{real_factor}, {other_paragraph_share}"
        )
    rng = random.Random(seed)
    answerable = [e for e in examples if not e.is_impossible]
    real = [e for e in examples if e.is_impossible]
    budget = round(ratio * len(answerable))
    out: list[Example] = []
    for k in range(real_factor):
        for e in real:
            out.append(e if k == 0 else replace(e, qid=f"{e.qid}_dup{k}"))
    rng.shuffle(out)
    out = out[:budget]
    remaining = budget - len(out)
    n_other = round(other_paragraph_share * remaining)
    order = list(range(len(answerable)))
    rng.shuffle(order)
    used: set[int] = set()
    for i in order:
        if len(out) >= budget - n_other:
            break
        context = remove_answer_sentences(answerable[i])
        if context is not None:
            e = answerable[i]
            out.append(Example(f"{e.qid}_nosent", e.question, context, (), True, e.title))
            used.add(i)
    by_title: dict[str, list[str]] = defaultdict(list)
    for e in examples:
        if e.context not in by_title[e.title]:
            by_title[e.title].append(e.context)
    for i in order:
        if len(out) >= budget:
            break
        if i in used:
            continue
        e = answerable[i]
        context = _other_paragraph(e, by_title[e.title], rng)
        if context is not None:
            out.append(Example(f"{e.qid}_nopara", e.question, context, (), True, e.title))
    return out


def with_negatives(
    examples: Sequence[Example], ratio: float, seed: int, real_factor: int = 2, other_paragraph_share: float = 0.0
) -> list[Example]:
    """The answerable examples plus `make_negatives(...)`, shuffled by `seed`."""
    out = [e for e in examples if not e.is_impossible]
    out += make_negatives(examples, ratio, seed, real_factor, other_paragraph_share)
    random.Random(seed + 1).shuffle(out)
    return out
