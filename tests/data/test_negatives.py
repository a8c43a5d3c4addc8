"""Tests for engine.data.negatives: sentence removal never leaks the answer, and sampling is seeded."""

import os
from pathlib import Path

import pytest

from engine.data.negatives import make_negatives, remove_answer_sentences, sentence_spans, with_negatives
from engine.data.squad import Example, find_train_files, load_squad


def _data_root() -> Path | None:
    repo = Path(__file__).resolve().parents[2]
    for root in (os.environ.get("SPARSEQA_DATA"), repo.parent / "shared" / "data"):
        if root and (Path(root) / "squad2").is_dir():
            return Path(root)
    return None


DATA = _data_root()
needs_data = pytest.mark.skipif(DATA is None, reason="real SQuAD data not found in ../shared/data or $SPARSEQA_DATA")

_CTX = (
    "The tower was finished in 1889. It was designed by Gustave Eiffel's company! Was it popular? "
    "Many artists disliked it at first. Today it draws millions of visitors."
)


def _ex(qid: str, answer: str, context: str = _CTX, title: str = "T", occurrence: int = 0) -> Example:
    start = -1
    for _ in range(occurrence + 1):
        start = context.index(answer, start + 1)
    return Example(qid, f"Question {qid}?", context, ((answer, start),), False, title)


def test_sentence_spans():
    spans = sentence_spans(_CTX)
    assert [_CTX[s:e] for s, e in spans] == [
        "The tower was finished in 1889.",
        "It was designed by Gustave Eiffel's company!",
        "Was it popular?",
        "Many artists disliked it at first.",
        "Today it draws millions of visitors.",
    ]
    assert [(s, e) for s, e in sentence_spans('He said "Go." Then left.')] == [(0, 13), (14, 24)]
    assert sentence_spans("no split here. lower case follows") == [(0, 33)]


@pytest.mark.parametrize("answer", ["1889", "Gustave Eiffel", "millions", "Many artists"])
def test_removal_drops_the_answer_sentence(answer: str):
    context = remove_answer_sentences(_ex("a", answer))
    assert context is not None and answer.lower() not in context.lower()
    assert len(context) < len(_CTX) and context.count(".") + context.count("?") + context.count("!") == 4


def test_removal_rejects_leftover_answers():
    twice = "Paris is big. I love Paris."
    assert remove_answer_sentences(_ex("a", "Paris", twice)) is None  # the other sentence still says Paris
    partial = "Kris Allen won the final. Allen then toured the country."
    assert remove_answer_sentences(_ex("b", "Kris Allen", partial)) is None  # "Allen" alone would still answer it
    assert remove_answer_sentences(_ex("c", "1889", "It opened in 1889.")) is None  # nothing left
    unanswerable = Example("d", "Q?", _CTX, (), True, "T")
    assert remove_answer_sentences(unanswerable) is None


def test_removal_covers_every_gold_answer_and_cross_sentence_spans():
    start = _CTX.index("1889. It was")
    multi = Example("m", "Q?", _CTX, (("1889", start), ("Gustave", _CTX.index("Gustave"))), False, "T")
    context = remove_answer_sentences(multi)
    assert context == "Was it popular? Many artists disliked it at first. Today it draws millions of visitors."
    short = "Made in 1889. Eiffel built it. Nobody cared."
    spanning = Example("s", "Q?", short, (("1889. Eiffel", short.index("1889")),), False, "T")
    assert remove_answer_sentences(spanning) == "Nobody cared."


def _pool() -> list[Example]:
    contexts = [f"Alpha{k} was founded in {1800 + k}. It is old. Bravo{k} lives there." for k in range(6)]
    out = [_ex(f"q{k}", f"{1800 + k}", c, title=f"T{k % 2}") for k, c in enumerate(contexts)]
    out += [_ex(f"r{k}", f"Bravo{k}", c, title=f"T{k % 2}") for k, c in enumerate(contexts)]
    out += [Example(f"u{k}", "Who cares?", contexts[k], (), True, f"T{k % 2}") for k in range(2)]
    return out


def test_make_negatives_counts_sources_and_determinism():
    pool = _pool()
    neg = make_negatives(pool, ratio=0.5, seed=0, real_factor=2)
    assert len(neg) == 6 and all(e.is_impossible and e.answers == () for e in neg)
    assert sum(e.qid.startswith("u") for e in neg) == 4  # 2 real unanswerables, twice each
    assert len({e.qid for e in neg}) == len(neg)
    assert neg == make_negatives(pool, ratio=0.5, seed=0, real_factor=2)
    assert [e.qid for e in make_negatives(pool, 1.0, seed=1)] != [e.qid for e in make_negatives(pool, 1.0, seed=2)]
    by_qid = {e.qid: e for e in pool}
    for e in neg:
        if e.qid.endswith("_nosent"):
            src = by_qid[e.qid.removesuffix("_nosent")]
            assert src.answers[0][0].lower() not in e.context.lower()


def test_make_negatives_other_paragraph_share():
    pool = _pool()
    neg = make_negatives(pool, ratio=1.0, seed=0, real_factor=0, other_paragraph_share=1.0)
    assert neg and all(e.qid.endswith("_nopara") for e in neg)
    by_qid = {e.qid: e for e in pool}
    for e in neg:
        src = by_qid[e.qid.removesuffix("_nopara")]
        assert e.context != src.context and e.title == src.title
        assert src.answers[0][0].lower() not in e.context.lower()


def test_with_negatives_and_argument_checks():
    pool = _pool()
    mixed = with_negatives(pool, ratio=0.5, seed=0)
    assert len(mixed) == 12 + 6 and sum(e.is_impossible for e in mixed) == 6
    assert with_negatives(pool, 0.5, 0) == mixed
    with pytest.raises(ValueError, match="ratio"):
        make_negatives(pool, -1.0, 0)


@needs_data
def test_real_train_sentence_removal_never_leaks_the_answer():
    examples = [e for p in find_train_files(Path(DATA)) for e in load_squad(p)]
    neg = make_negatives(examples, ratio=0.6, seed=0)
    by_qid = {e.qid: e for e in examples}
    n_sent = 0
    for e in neg:
        if e.qid.endswith("_nosent"):
            n_sent += 1
            for text, _ in by_qid[e.qid.removesuffix("_nosent")].answers:
                assert text.lower() not in e.context.lower()
    assert n_sent > 0.8 * (len(neg) - 2 * sum(e.is_impossible for e in examples))
