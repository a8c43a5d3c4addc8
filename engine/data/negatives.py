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
      that the question and the passage agree, not merely that an answer-shaped span exists;
  (e) optionally, two more of SQuAD 2.0's kinds over the untouched paragraph: an antonym edit (a lowercase word of
      the question that the paragraph uses, such as "largest" or "before", becomes its opposite, which the
      paragraph never uses) and a negation (the question's auxiliary verb becomes its negative contraction, "did"
      -> "didn't", over a paragraph that negates nothing).
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


# Opposites for antonym edits, both ways: superlatives, comparatives, order, direction and polarity words of the
# kind SQuAD 2.0's writers flipped ("antonym", 20% of its unanswerables). Single lowercase words only; a pair whose
# words are also common names or nouns in questions ("fall", "rose", "end") is left out.
_ANTONYM_PAIRS = (
    "largest smallest", "biggest smallest", "highest lowest", "most least", "first last", "earliest latest",
    "oldest youngest", "oldest newest", "longest shortest", "best worst", "maximum minimum", "before after",
    "north south", "east west", "northern southern", "eastern western", "northernmost southernmost",
    "easternmost westernmost", "increase decrease", "increased decreased", "larger smaller", "higher lower",
    "older younger", "earlier later", "won lost", "win lose", "strongest weakest", "richest poorest",
    "wealthiest poorest", "heaviest lightest", "fastest slowest", "top bottom", "upper lower", "inside outside",
    "major minor", "positive negative", "success failure", "successful unsuccessful", "ancient modern",
    "public private", "internal external", "import export", "imports exports", "majority minority",
    "legal illegal", "common rare", "accepted rejected", "included excluded", "male female", "men women",
)  # fmt: skip
ANTONYMS: dict[str, str] = {}  # a word with two opposites ("smallest") takes the first listed ("largest")
for _pair in _ANTONYM_PAIRS:
    for _a, _b in (_pair.split(), _pair.split()[::-1]):
        ANTONYMS.setdefault(_a, _b)
_LOWER_WORD = re.compile(r"(?<![\w'-])[a-z]+(?![\w'-])")  # whole words: not "public" in "non-public"


def antonym_question(e: Example) -> str | None:
    """e.question with its first word that has an opposite in ANTONYMS, is used by the paragraph and whose opposite
    is used by neither the paragraph nor the question, replaced by that opposite; None when there is no such word.
    Capitalized words (names) and parts of compounds ("non-public") are never edited.
    """
    if e.is_impossible:
        return None
    used = set(re.findall(r"[a-z]+", e.context.lower()))  # loosely: "men's" and "non-public" use "men", "public"
    taken = used | set(re.findall(r"[a-z]+", e.question.lower()))  # "men and women" must not become "men and men"
    for m in _LOWER_WORD.finditer(e.question):
        word = m.group(0)
        if word in ANTONYMS and word in used and ANTONYMS[word] not in taken:
            return e.question[: m.start()] + ANTONYMS[word] + e.question[m.end() :]
    return None


# The auxiliaries a wh-question puts 2nd to 4th ("When did ...", "In what year was ...") and their negatives.
_NEGATIVE_OF = {
    "did": "didn't", "does": "doesn't", "do": "don't", "is": "isn't", "was": "wasn't", "are": "aren't",
    "were": "weren't", "can": "can't", "could": "couldn't", "would": "wouldn't", "will": "won't", "has": "hasn't",
    "have": "haven't", "had": "hadn't", "should": "shouldn't",
}  # fmt: skip
_NEGATION = re.compile(r"\b(?:not|never|no|none|nor|neither|cannot|without)\b|n't|n’t", re.IGNORECASE)


def negated_question(e: Example) -> str | None:
    """e.question with its auxiliary (the 2nd-4th word, "did", "was", ...) made negative ("didn't", "wasn't"), or
    None: no auxiliary there, or the paragraph negates something (then "What wasn't ...?" might have an answer).
    """
    if e.is_impossible or _NEGATION.search(e.context) or _NEGATION.search(e.question):
        return None
    words = e.question.split(" ")
    for k in range(1, min(4, len(words))):
        negative = _NEGATIVE_OF.get(words[k])
        if negative is not None:
            return " ".join(words[:k] + [negative] + words[k + 1 :])
    return None


# The question edits that need nothing but the example itself, in the order make_negatives fills them.
_QUESTION_EDITS = (("antonym", antonym_question), ("negation", negated_question))


def make_negatives(
    examples: Sequence[Example],
    ratio: float,
    seed: int,
    real_factor: int = 2,
    other_paragraph_share: float = 0.0,
    swap_share: float = 0.0,
    antonym_share: float = 0.0,
    negation_share: float = 0.0,
) -> list[Example]:
    """Unanswerable examples numbering about `ratio` x (#answerable examples); deterministic in `seed`.

    The budget is filled first with the real unanswerables (each `real_factor` times, at most the budget), then
    `swap_share`, `antonym_share` and `negation_share` of the remainder with those question edits (in that order),
    `other_paragraph_share` of the remainder with other-paragraph pairs and the rest with sentence removals (one
    generated negative per answerable question at most). If a generator runs short, the next one (sentence removal,
    then other-paragraph pairs) makes up the difference. New qids are `{qid}_swap`, `{qid}_antonym`,
    `{qid}_negation`, `{qid}_nosent`, `{qid}_nopara` and `{qid}_dup{k}`.
    """
    shares = {"other_paragraph_share": other_paragraph_share, "swap_share": swap_share}
    shares |= {"antonym_share": antonym_share, "negation_share": negation_share}
    if ratio < 0 or real_factor < 0 or not all(0.0 <= v <= 1.0 for v in shares.values()) or sum(shares.values()) > 1:
        raise ValueError(
            f"need ratio >= 0, real_factor >= 0, shares in [0, 1] summing to at most 1; got ratio {ratio}, "
            f"real_factor {real_factor}, " + ", ".join(f"{k} {v}" for k, v in shares.items())
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
    names = question_names(answerable) if round(swap_share * remaining) > 0 else []
    swap = (lambda e: swap_question(e, names, rng)) if names else None
    for kind, edit in (("swap", swap), *_QUESTION_EDITS):
        quota = len(out) + round(shares[f"{kind}_share"] * remaining)
        for i in order if edit is not None and quota > len(out) else ():
            if len(out) >= quota:
                break
            if i in used:
                continue
            question = edit(answerable[i])
            if question is not None:
                out.append(_unanswerable(answerable[i], kind, question=question))
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


KINDS = ("real", "swap", "antonym", "negation", "nosent", "nopara")


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
        for kind, edit in _QUESTION_EDITS:
            question = edit(e)
            if question is not None:
                out[kind].append(_unanswerable(e, kind, question=question))
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
        "question swap, antonym edit, negation, sentence removal, other paragraph) from the answerable questions of "
        "a held-out set.",
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
        print(f"{kind:8s} n={r['n']:5d}  AUC {r['auc']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
