"""Harder unanswerable training examples for SQuAD 2.0-style abstention.

The train files here are ~3-7% unanswerable while dev is 50%, and pairing a question with another paragraph
of its article was measured to be too easy (null-score AUC 0.46 on dev). Three sources, in this order:
  (a) sentence removal: the question's own paragraph minus every sentence that overlaps a gold answer span.
      The topic, the entities and most of the wording stay, only the answer-bearing sentence goes. A candidate
      is dropped when any gold answer text still occurs in what is left (case-insensitive), or when at least
      half of an answer's normalized words do (so "Allen won ..." does not survive removing "Kris Allen");
  (b) the real unanswerable questions, repeated `real_factor` times;
  (c) optionally, another paragraph of the same article that does not contain the answer text;
  (d) optionally, a swapped question over its own, untouched paragraph (SQuAD 2.0's most common kind of
      unanswerable, "entity swap"): a name (a run of capitalized words after the first word) or a number of the
      question that occurs in the paragraph is replaced by one that does not, drawn from other questions' names,
      or a nearby year / a scaled number. The paragraph still holds a plausible answer, so the model must check
      that the question and the passage agree, not merely that an answer-shaped span exists.
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


_NAME = re.compile(r"(?<!^)\b[A-Z][\w-]*(?:'[a-z]\w*)?(?: (?:of |de |the |and )?[A-Z][\w-]*(?:'[a-z]\w*)?)*")
_NUMBER = re.compile(r"\b\d[\d,]*(?:\.\d+)?\b")


def question_slots(question: str, context: str) -> list[tuple[int, int, str]]:
    """Spans (start, end, kind) of the question's names and numbers that occur in `context` (kind: name/number)."""
    out = []
    for kind, pattern in (("name", _NAME), ("number", _NUMBER)):
        for m in pattern.finditer(question):
            if m.group(0) in context:
                out.append((m.start(), m.end(), kind))
    return out


def _swapped_number(text: str, context: str, rng: random.Random) -> str | None:
    """A different number of the same shape that `context` does not contain (a year moves by 1-30 years)."""
    digits = text.replace(",", "")
    if not digits.isdigit():
        return None
    value = int(digits)
    for _ in range(8):
        if len(digits) == 4 and 1000 <= value <= 2100:  # a year
            new = str(value + rng.choice([-1, 1]) * rng.randint(1, 30))
        else:
            new = str(max(1, round(value * rng.choice([0.5, 2, 3, 1.5]) + rng.randint(1, 3))))
            new = f"{int(new):,}" if "," in text else new
        if new != text and new not in context:
            return new
    return None


def swap_question(e: Example, names: Sequence[str], rng: random.Random) -> str | None:
    """e.question with one name or number that its paragraph mentions replaced by one it does not, or None."""
    slots = question_slots(e.question, e.context)
    if not slots or e.is_impossible:
        return None
    start, end, kind = rng.choice(slots)
    old = e.question[start:end]
    if kind == "number":
        new = _swapped_number(old, e.context, rng)
    else:
        lowered, words = e.context.lower(), old.count(" ")
        options = [n for n in (rng.choice(names) for _ in range(32)) if n.lower() not in lowered and n != old]
        same_shape = [n for n in options if n.count(" ") == words]  # a one-word name for a one-word name
        new = (same_shape or options or [None])[0]
    if new is None:
        return None
    return e.question[:start] + new + e.question[end:]


def make_negatives(
    examples: Sequence[Example],
    ratio: float,
    seed: int,
    real_factor: int = 2,
    other_paragraph_share: float = 0.0,
    swap_share: float = 0.0,
) -> list[Example]:
    """Unanswerable examples numbering about `ratio` x (#answerable examples); deterministic in `seed`.

    The budget is filled first with the real unanswerables (each `real_factor` times, at most the budget), then
    `swap_share` of the remainder with swapped questions, `other_paragraph_share` of the remainder with
    other-paragraph pairs and the rest with sentence removals (one generated negative per answerable question at
    most). If a generator runs short, the next one (sentence removal, then other-paragraph pairs) makes up the
    difference. New qids are `{qid}_swap`, `{qid}_nosent`, `{qid}_nopara` and `{qid}_dup{k}`.
    """
    shares_ok = 0.0 <= other_paragraph_share <= 1.0 and 0.0 <= swap_share <= 1.0
    if ratio < 0 or real_factor < 0 or not shares_ok or other_paragraph_share + swap_share > 1.0:
        raise ValueError(
            "need ratio >= 0, real_factor >= 0, shares in [0, 1] with other_paragraph_share + swap_share <= 1; got "
            f"{ratio}, {real_factor}, {other_paragraph_share}, {swap_share}"
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
    n_swap = len(out) + round(swap_share * remaining)
    order = list(range(len(answerable)))
    rng.shuffle(order)
    used: set[int] = set()
    names = (
        sorted(
            {e.question[a:b] for e in answerable for a, b, k in question_slots(e.question, e.context) if k == "name"}
        )
        if n_swap > len(out)
        else []
    )
    for i in order if names else ():
        if len(out) >= n_swap:
            break
        question = swap_question(answerable[i], names, rng)
        if question is not None:
            e = answerable[i]
            out.append(Example(f"{e.qid}_swap", question, e.context, (), True, e.title))
            used.add(i)
    for i in order:
        if len(out) >= budget - n_other:
            break
        if i in used:
            continue
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


def with_negatives(examples: Sequence[Example], ratio: float, seed: int, **generators: float) -> list[Example]:
    """The answerable examples plus `make_negatives(examples, ratio, seed, **generators)`, shuffled by `seed`."""
    out = [e for e in examples if not e.is_impossible]
    out += make_negatives(examples, ratio, seed, **generators)
    random.Random(seed + 1).shuffle(out)
    return out
