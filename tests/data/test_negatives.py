"""Tests for engine.data.negatives: sentence removal never leaks the answer, and sampling is seeded."""

import os
import re
from pathlib import Path

import pytest

from engine.data.negatives import (
    ANTONYMS,
    antonym_question,
    auc_by_kind,
    main,
    make_negatives,
    negated_question,
    negatives_by_kind,
    question_slots,
    remove_answer_sentences,
    sentence_spans,
    swap_question,
    with_negatives,
)
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


def test_question_slots_are_names_and_numbers_the_paragraph_mentions():
    q = "Who led the Kingdom of France's army in 1066 and 1,200 men against Harold?"
    ctx = "In 1066 the Kingdom of France's army of 1,200 men fought; Harold was not there."
    slots = [(q[a:b], kind) for a, b, kind in question_slots(q, ctx)]
    assert ("Kingdom of France's", "name") in slots and ("1066", "number") in slots and ("1,200", "number") in slots
    assert ("Harold", "name") in slots and not any(text == "Who" for text, _ in slots)  # not the first word
    assert question_slots("Who built it?", ctx) == []


@pytest.mark.parametrize("seed", range(20))
def test_swap_question_changes_one_grounded_slot_to_an_absent_one(seed: int):
    import random

    ctx = "The tower was finished in 1889 by Gustave Eiffel in Paris. It is 330 metres tall."
    e = Example("q", "Who finished the tower in Paris in 1889?", ctx, (("Gustave Eiffel", 34),), False, "T")
    names = ["Lyon", "Marseille", "Gustave Eiffel", "New York", "Paris"]
    swapped = swap_question(e, names, random.Random(seed))
    assert swapped is not None and swapped != e.question
    old = {e.question[a:b] for a, b, _ in question_slots(e.question, ctx)}
    new = {t for t in swapped.replace("?", "").split() if t[0].isupper() or t[0].isdigit()}
    introduced = new - set(" ".join(old).split()) - {"Who"}
    assert len(introduced) == 1  # exactly one name or number swapped in...
    (token,) = introduced
    assert token.lower() not in ctx.lower()  # ...and the paragraph does not mention it
    if token.isdigit():
        assert 1859 <= int(token) <= 1919 and token != "1889"  # a year moves by 1-30 years


def test_make_negatives_swap_share_keeps_the_context_and_is_deterministic():
    pool = [
        Example(
            f"a{i}",
            f"What did Gustave Eiffel build in {1880 + i}?",
            f"In {1880 + i} Gustave Eiffel built it.",
            (("it", 30),),
            False,
            "T",
        )
        for i in range(8)
    ] + [Example("n0", "What did Ada Lovelace write?", "Ada Lovelace wrote notes.", (("notes", 18),), False, "U")]
    neg = make_negatives(pool, ratio=1.0, seed=0, real_factor=0, swap_share=1.0)
    by_qid = {e.qid: e for e in pool}
    assert neg and all(e.qid.endswith("_swap") and e.is_impossible and e.answers == () for e in neg)
    for e in neg:
        src = by_qid[e.qid.removesuffix("_swap")]
        assert e.context == src.context and e.question != src.question
    assert neg == make_negatives(pool, ratio=1.0, seed=0, real_factor=0, swap_share=1.0)
    assert make_negatives(pool, 1.0, 0, 0) == make_negatives(pool, 1.0, 0, 0, swap_share=0.0)  # old behaviour
    with pytest.raises(ValueError, match="swap_share"):
        make_negatives(pool, 1.0, 0, other_paragraph_share=0.6, swap_share=0.6)


def _q(question: str, context: str, impossible: bool = False) -> Example:
    return Example("q", question, context, () if impossible else ((context.split()[0], 0),), impossible, "T")


def test_antonym_question_flips_a_word_the_paragraph_uses_into_one_it_does_not():
    ctx = "Lyon is the largest city of the region, founded before the Romans came."
    assert antonym_question(_q("Which is the largest city of the region?", ctx)) == (
        "Which is the smallest city of the region?"
    )
    # the first word with a usable opposite wins; "largest" has one that the paragraph uses, so "before" is taken
    both = ctx + " The smallest is Vienne."
    assert antonym_question(_q("Was the largest city founded before the Romans?", both)) == (
        "Was the largest city founded after the Romans?"
    )
    assert antonym_question(_q("Which is the largest city?", ctx, impossible=True)) is None
    assert antonym_question(_q("Which is the oldest city?", ctx)) is None  # the paragraph never says "oldest"
    # Capitalized words are names ("Last Supper", "Fall Out Boy"), never edited; matching is whole-word only.
    named = "Lyon hosted the Last Supper show and the utmost care was taken."
    assert antonym_question(_q("Where was the Last Supper show?", named)) is None
    assert antonym_question(_q("What was taken with utmost care?", named)) is None
    assert antonym_question(_q("Which non-public firm grew?", "The non-public firm grew.")) is None
    assert antonym_question(_q("What did the men and women wear?", "The men wore hats.")) is None
    assert ANTONYMS["smallest"] == "largest" and ANTONYMS["biggest"] == "smallest"  # the first listed pair wins
    assert all(ANTONYMS[w] != w and ANTONYMS[w] in ANTONYMS for w in ANTONYMS)
    assert all(w.islower() and " " not in w for w in ANTONYMS)


def test_negated_question_negates_the_auxiliary_over_a_paragraph_that_negates_nothing():
    ctx = "Gustave Eiffel built the tower in 1889 for the fair."
    assert negated_question(_q("When did Gustave Eiffel build the tower?", ctx)) == (
        "When didn't Gustave Eiffel build the tower?"
    )
    assert negated_question(_q("In what year was the tower built?", ctx)) == "In what year wasn't the tower built?"
    assert negated_question(_q("Who built the tower?", ctx)) is None  # no auxiliary among words 2-4
    assert negated_question(_q("When did Eiffel build it?", ctx, impossible=True)) is None
    for negating in ("It was not cheap.", "He never slept.", "It wasn't cheap.", "It wasn’t cheap.", "No one came."):
        assert negated_question(_q("When did Gustave Eiffel build the tower?", f"{ctx} {negating}")) is None
    assert negated_question(_q("Why didn't Eiffel build it?", ctx)) is None  # already negative


def test_make_negatives_antonym_and_negation_shares():
    ctx = "In {y} the largest firm, run by Ada, grew."
    pool = [
        Example(
            f"a{i}",
            f"When did the largest firm grow in {1880 + i}?",
            ctx.format(y=1880 + i),
            (("Ada", 30),),
            False,
            "T",
        )
        for i in range(10)
    ]
    neg = make_negatives(pool, ratio=1.0, seed=0, real_factor=0, antonym_share=0.5, negation_share=0.5)
    kinds = {e.qid.rsplit("_", 1)[1] for e in neg}
    assert kinds == {"antonym", "negation"} and len(neg) == 10
    assert sum(e.qid.endswith("_antonym") for e in neg) == 5  # each share of the budget, one edit per question
    by_qid = {e.qid: e for e in pool}
    for e in neg:
        kind = e.qid.rsplit("_", 1)[1]
        src = by_qid[e.qid.removesuffix(f"_{kind}")]
        assert e.is_impossible and e.answers == () and e.context == src.context
        assert ("smallest" in e.question) if kind == "antonym" else ("didn't" in e.question)
    assert neg == make_negatives(pool, ratio=1.0, seed=0, real_factor=0, antonym_share=0.5, negation_share=0.5)
    with pytest.raises(ValueError, match="negation_share 0.6"):
        make_negatives(pool, 1.0, 0, antonym_share=0.5, negation_share=0.6)


def _named_pool() -> list[Example]:
    """Two articles whose questions name what their paragraphs mention (so swaps exist), plus real unanswerables."""
    out = []
    for i, name in enumerate(["Gustave Eiffel", "Ada Lovelace", "Alan Turing", "Marie Curie", "Nikola Tesla", "Pele"]):
        year = str(1880 + i)
        ctx = f"In {year} {name} built a tower. Critics hated it. Paris later loved it."
        out.append(Example(f"a{i}", f"When did {name} build a tower?", ctx, ((year, 3),), False, f"T{i % 2}"))
    out += [Example(f"u{k}", "What did Eiffel paint?", out[k].context, (), True, out[k].title) for k in range(2)]
    return out


def test_negatives_by_kind_keeps_each_kind_to_itself():
    pool = _named_pool()
    kinds = negatives_by_kind(pool, seed=0)
    assert set(kinds) == {"real", "swap", "antonym", "negation", "nosent", "nopara"}
    assert [e.qid for e in kinds["real"]] == ["u0", "u1"]
    assert kinds["antonym"] == []  # no question here has a word with an opposite
    assert [e.question for e in kinds["negation"]][:1] == ["When didn't Gustave Eiffel build a tower?"]
    by_qid = {e.qid: e for e in pool}
    for kind in ("swap", "nosent", "nopara"):
        assert kinds[kind], kind
        assert len(kinds[kind]) <= 6  # at most one per answerable question
        for e in kinds[kind]:
            src = by_qid[e.qid.removesuffix(f"_{kind}")]
            assert e.is_impossible and e.answers == () and e.title == src.title
            if kind == "swap":
                assert e.context == src.context and e.question != src.question
            else:
                assert e.question == src.question and src.answers[0][0] not in e.context
    assert kinds == negatives_by_kind(pool, seed=0)
    assert negatives_by_kind(pool, seed=0, names=[])["swap"] == []  # nothing to swap in


def test_auc_by_kind_scores_each_kind_against_the_answerables():
    pool = _named_pool()
    kinds = negatives_by_kind(pool, seed=0)
    answerable = [e for e in pool if not e.is_impossible]
    # A model that is sure about swaps, blind to sentence removals, and backwards on real unanswerables.
    diff = {e.qid: 0.0 for e in answerable}
    diff |= {e.qid: 5.0 for e in kinds["swap"]} | {e.qid: 0.0 for e in kinds["nosent"]}
    diff |= {e.qid: -5.0 for e in kinds["real"]} | {e.qid: 1.0 + i for i, e in enumerate(kinds["nopara"])}
    diff |= {e.qid: 5.0 for e in kinds["negation"]}
    got = auc_by_kind(diff, answerable, kinds)
    assert "antonym" not in got  # an empty kind is left out
    assert got["swap"] == {"n": len(kinds["swap"]), "auc": 1.0} == got["negation"]
    assert got["nosent"]["auc"] == 0.5 and got["real"]["auc"] == 0.0 and got["nopara"]["auc"] == 1.0
    assert "swap" not in auc_by_kind(diff, answerable, {**kinds, "swap": []})
    with pytest.raises(ValueError, match="answerable"):
        auc_by_kind(diff, [], kinds)


def test_cli_scores_an_artifact_on_a_held_out_set(tiny_bert, tmp_path, capsys):
    import json

    from engine.build_model import build
    from engine.features import WindowSettings

    art = build(tiny_bert, tmp_path / "a", settings=WindowSettings(96, 16, 24))
    pool = _named_pool()
    paragraphs = {}
    for e in pool:
        qa = {"id": e.qid, "question": e.question, "is_impossible": e.is_impossible}
        qa["answers"] = [{"text": t, "answer_start": s} for t, s in e.answers]
        paragraphs.setdefault((e.title, e.context), []).append(qa)
    articles = {}
    for (title, ctx), qas in paragraphs.items():
        articles.setdefault(title, []).append({"context": ctx, "qas": qas})
    data = {"version": "v2.0", "data": [{"title": t, "paragraphs": ps} for t, ps in articles.items()]}
    path = tmp_path / "held-out.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "kinds.json"
    assert main([str(art), "--eval-set", str(path), "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["answerable"] == 6 and set(result["kinds"]) == {"real", "swap", "negation", "nosent", "nopara"}
    assert result["kinds"]["real"]["n"] == 2 and all(0.0 <= r["auc"] <= 1.0 for r in result["kinds"].values())
    printed = capsys.readouterr().out
    assert all(kind in printed for kind in result["kinds"])
    with pytest.raises(SystemExit):
        main([str(art)])  # --eval-set is required


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


@needs_data
def test_real_train_swaps_ask_about_something_the_paragraph_lacks():
    examples = [e for p in find_train_files(Path(DATA)) for e in load_squad(p)][:20000]
    neg = [e for e in make_negatives(examples, ratio=0.3, seed=0, swap_share=1.0) if e.qid.endswith("_swap")]
    by_qid = {e.qid: e for e in examples}
    assert len(neg) > 0.5 * 0.3 * len(examples)  # most questions have a name or number to swap
    for e in neg:
        src = by_qid[e.qid.removesuffix("_swap")]
        assert e.context == src.context
        # One slot swapped: the questions share a prefix and a suffix (cut back to word boundaries) around it.
        a, b = src.question, e.question
        head = os.path.commonprefix([a, b])
        head = head[: head.rfind(" ") + 1]
        tail = os.path.commonprefix([a[::-1], b[::-1]])[::-1]
        tail = tail[tail.find(" ") :] if " " in tail else ""
        new = b[len(head) : len(b) - len(tail)].strip("?.,\"'")
        assert new and new.lower() not in e.context.lower(), (a, b, new)


@needs_data
def test_real_train_antonym_and_negation_edits_ask_what_the_paragraph_does_not_say():
    examples = [e for p in find_train_files(Path(DATA)) for e in load_squad(p)][:20000]
    neg = make_negatives(examples, ratio=0.3, seed=0, antonym_share=0.2, negation_share=0.8)
    by_qid = {e.qid: e for e in examples}
    antonyms = [e for e in neg if e.qid.endswith("_antonym")]
    negations = [e for e in neg if e.qid.endswith("_negation")]
    # each share of the generated budget is filled (antonyms are rarer: about one question in eight has one)
    generated = round(0.3 * sum(not e.is_impossible for e in examples)) - 2 * sum(e.is_impossible for e in examples)
    assert len(antonyms) == round(0.2 * generated) and len(negations) == round(0.8 * generated)
    for e in antonyms:
        src = by_qid[e.qid.removesuffix("_antonym")]
        old, new = src.question.split(" "), e.question.split(" ")
        changed = [(a, b) for a, b in zip(old, new, strict=True) if a != b]  # one word, in place
        assert len(changed) == 1 and e.context == src.context, (src.question, e.question)
        was, now = (w.strip("?,.;:\"'()") for w in changed[0])
        assert ANTONYMS[was] == now and was in re.findall(r"[a-z]+", e.context.lower())
        assert now not in re.findall(r"[a-z]+", e.context.lower())
    for e in negations:
        assert "n't" in e.question and "n't" not in by_qid[e.qid.removesuffix("_negation")].question
