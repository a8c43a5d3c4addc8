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

Judge a generator before trusting it: `python -m engine.data.negatives ARTIFACT --eval-set EVAL.json` prints, for
each kind, the AUC of the model's null score separating that kind from the held-out answerable questions. A kind
the model already separates far better than the real unanswerables teaches it little about them.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import replace

from engine.data.squad import Example, load_squad
from engine.data.squad_metric import auc, normalize_answer

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


def _contexts_by_title(examples: Sequence[Example]) -> dict[str, list[str]]:
    """{title: its distinct contexts, in order of first appearance}: where other-paragraph pairs are drawn from."""
    by_title: dict[str, list[str]] = defaultdict(list)
    for e in examples:
        if e.context not in by_title[e.title]:
            by_title[e.title].append(e.context)
    return by_title


def _unanswerable(e: Example, kind: str, question: str | None = None, context: str | None = None) -> Example:
    """The negative `{qid}_{kind}` made from answerable `e` with its question or context replaced."""
    return Example(f"{e.qid}_{kind}", question or e.question, context or e.context, (), True, e.title)


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


def question_names(examples: Sequence[Example]) -> list[str]:
    """The names (sorted, unique) that the examples' questions share with their paragraphs: what swaps draw from."""
    slots = ((e.question, question_slots(e.question, e.context)) for e in examples)
    return sorted({question[a:b] for question, spans in slots for a, b, kind in spans if kind == "name"})


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
    names = question_names(answerable) if n_swap > len(out) else []
    for i in order if names else ():
        if len(out) >= n_swap:
            break
        question = swap_question(answerable[i], names, rng)
        if question is not None:
            e = answerable[i]
            out.append(_unanswerable(e, "swap", question=question))
            used.add(i)
    for i in order:
        if len(out) >= budget - n_other:
            break
        if i in used:
            continue
        context = remove_answer_sentences(answerable[i])
        if context is not None:
            e = answerable[i]
            out.append(_unanswerable(e, "nosent", context=context))
            used.add(i)
    by_title = _contexts_by_title(examples)
    for i in order:
        if len(out) >= budget:
            break
        if i in used:
            continue
        e = answerable[i]
        context = _other_paragraph(e, by_title[e.title], rng)
        if context is not None:
            out.append(_unanswerable(e, "nopara", context=context))
    return out


def with_negatives(examples: Sequence[Example], ratio: float, seed: int, **generators: float) -> list[Example]:
    """The answerable examples plus `make_negatives(examples, ratio, seed, **generators)`, shuffled by `seed`."""
    out = [e for e in examples if not e.is_impossible]
    out += make_negatives(examples, ratio, seed, **generators)
    random.Random(seed + 1).shuffle(out)
    return out


KINDS = ("real", "swap", "nosent", "nopara")


def negatives_by_kind(
    examples: Sequence[Example], seed: int = 0, names: Sequence[str] | None = None
) -> dict[str, list[Example]]:
    """The real unanswerables of `examples`, plus one negative of each generated kind per answerable question.

    Unlike `make_negatives`, no kind makes up for another's shortfall, so each list holds only its own kind.
    `names` (default: the names in the examples' own questions) are what swaps draw from.
    """
    rng = random.Random(seed)
    answerable = [e for e in examples if not e.is_impossible]
    if names is None:
        names = question_names(answerable)
    by_title = _contexts_by_title(examples)
    out: dict[str, list[Example]] = {k: [] for k in KINDS}
    out["real"] = [e for e in examples if e.is_impossible]
    for e in answerable:
        question = swap_question(e, names, rng) if names else None
        if question is not None:
            out["swap"].append(_unanswerable(e, "swap", question=question))
        context = remove_answer_sentences(e)
        if context is not None:
            out["nosent"].append(_unanswerable(e, "nosent", context=context))
        context = _other_paragraph(e, by_title[e.title], rng)
        if context is not None:
            out["nopara"].append(_unanswerable(e, "nopara", context=context))
    return out


def auc_by_kind(
    null_score_diff: Mapping[str, float], answerable: Sequence[Example], kinds: Mapping[str, Sequence[Example]]
) -> dict[str, dict[str, float]]:
    """{kind: {"n": count, "auc": AUC of null_score_diff, that kind against the answerable questions}}."""
    if not answerable:
        raise ValueError("need answerable questions to compare the negatives with")
    gold_pos = {e.qid: [t for t, _ in e.answers] or [""] for e in answerable}
    out = {}
    for kind, negs in kinds.items():
        if negs:
            gold = {**gold_pos, **{e.qid: [] for e in negs}}
            out[kind] = {"n": len(negs), "auc": auc(null_score_diff, gold)}
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: AUC of an artifact's null score against each kind of negative on a held-out set."""
    ap = argparse.ArgumentParser(
        prog="python -m engine.data.negatives",
        description="How well an engine artifact's null score separates each kind of unanswerable question (real, "
        "question swap, sentence removal, other paragraph) from the answerable questions of a held-out set.",
    )
    ap.add_argument("artifact", help="engine artifact directory (python -m engine.build_model)")
    ap.add_argument("--eval-set", required=True, help="held-out SQuAD 2.0 JSON (e.g. a run's eval-set.json)")
    ap.add_argument(
        "--names-from",
        nargs="+",
        default=None,
        help="train files whose questions' names swaps draw from, as in training (default: the eval set's own)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="also write the result JSON here")
    args = ap.parse_args(argv)
    from engine.qa import QAEngine

    examples = load_squad(args.eval_set)
    names = None
    if args.names_from is not None:
        pool = [e for f in args.names_from for e in load_squad(f) if not e.is_impossible]
        names = question_names(pool)
    kinds = negatives_by_kind(examples, args.seed, names)
    answerable = [e for e in examples if not e.is_impossible]
    eng = QAEngine.load(args.artifact, threads=args.threads)
    scored = answerable + [e for negs in kinds.values() for e in negs]
    answers = eng.answer_batch([(e.question, e.context) for e in scored], null_threshold=float("inf"))
    diff = {e.qid: a.null_score_diff for e, a in zip(scored, answers)}
    result = {"artifact": str(args.artifact), "eval_set": str(args.eval_set), "answerable": len(answerable)}
    result["kinds"] = auc_by_kind(diff, answerable, kinds)
    for kind, r in result["kinds"].items():
        print(f"{kind:7s} n={r['n']:5d}  AUC {r['auc']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
