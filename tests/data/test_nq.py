"""Tests for engine.data.nq on hand-written lines of both NQ formats, scored by the official eval."""

import copy
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.data.nq import (
    char_span_to_token_span,
    evaluate_nq,
    examples_to_squad,
    make_prediction,
    read_nq,
    write_predictions,
)

# --------------------------------------------------------------------------------------------- test documents

# Original format: (token, is_html). Byte offsets are computed below from the html text the tokens come from.
_DOC = [
    ("<H1>", True), ("Eiffel", False), ("Tower", False), ("</H1>", True),
    ("<P>", True), ("The", False), ("tower", False), ("is", False), ("330", False), ("metres", False),
    ("tall", False), (".", False), ("</P>", True),
    ("<P>", True), ("It", False), ("was", False), ("built", False), ("in", False), ("1889", False),
    (".", False), ("</P>", True),
]  # fmt: skip
# token indices: <P> 4 .. </P> 12 is paragraph 1; <P> 13 .. </P> 20 is paragraph 2.


def _original_tokens() -> list[dict]:
    """document_tokens with byte offsets into a synthetic document_html (tokens joined by one blank, UTF-8)."""
    out, pos = [], 100  # documents start with some markup before the first token
    for tok, html in _DOC:
        n = len(tok.encode("utf-8"))
        out.append({"token": tok, "start_byte": pos, "end_byte": pos + n, "html_token": html})
        pos += n + 1
    return out


def _span(tokens: list[dict] | None, start: int, end: int) -> dict:
    """An NQ span dict over [start, end) tokens; byte offsets only when tokens are given (original format)."""
    span = {"start_token": start, "end_token": end}
    if tokens is not None:
        span.update(start_byte=tokens[start]["start_byte"], end_byte=tokens[end - 1]["end_byte"])
    return span


def _null(original: bool) -> dict:
    """A null NQ span."""
    return {"start_token": -1, "end_token": -1, **({"start_byte": -1, "end_byte": -1} if original else {})}


def _candidates(tokens: list[dict] | None) -> list[dict]:
    """Two top-level paragraph candidates plus a nested one inside the first."""
    cands = [_span(tokens, 4, 13), _span(tokens, 13, 21), _span(tokens, 5, 12)]
    for c, top in zip(cands, (True, True, False)):
        c["top_level"] = top
    return cands


def _annotation(tokens: list[dict] | None, short: tuple[int, int] | None, long: tuple[int, int] | None) -> dict:
    """One NQ annotation with an optional short span and long span."""
    original = tokens is not None
    return {
        "annotation_id": 1,
        "long_answer": {**(_span(tokens, *long) if long else _null(original)), "candidate_index": 0 if long else -1},
        "short_answers": [_span(tokens, *short)] if short else [],
        "yes_no_answer": "NONE",
    }


def original_line(example_id: int, question: str, annotations: list[tuple]) -> dict:
    """An original-format NQ dev line; annotations are (short, long) token-span pairs."""
    tokens = _original_tokens()
    return {
        "example_id": example_id,
        "question_text": question,
        "document_title": "Eiffel Tower",
        "document_url": "https://en.wikipedia.org/wiki/Eiffel_Tower",
        "document_html": "<html>...</html>",
        "document_tokens": tokens,
        "long_answer_candidates": _candidates(tokens),
        "annotations": [_annotation(tokens, s, lg) for s, lg in annotations],
    }


def simplified_line(example_id: int, question: str, short: tuple[int, int] | None) -> dict:
    """A simplified-format NQ train line with one annotation."""
    return {
        "example_id": example_id,
        "question_text": question,
        "document_url": "https://en.wikipedia.org/wiki/Eiffel_Tower",
        "document_text": " ".join(tok for tok, _ in _DOC),
        "long_answer_candidates": _candidates(None),
        "annotations": [_annotation(None, short, (4, 13) if short else None)],
    }


CONTEXT = "Eiffel Tower The tower is 330 metres tall . It was built in 1889 ."
HEIGHT, YEAR, NONE = (8, 11), (18, 19), None  # "330 metres tall", "1889"
P1, P2 = (4, 13), (13, 21)

# Five-way annotated dev lines: height (4 of 5 agree), year (3 of 5), no short answer (only 1 of 5 gives one).
DEV = [
    original_line(101, "how tall is the eiffel tower", [(HEIGHT, P1)] * 4 + [(NONE, None)]),
    original_line(-202, "when was the eiffel tower built", [(YEAR, P2)] * 3 + [(NONE, P2), (NONE, None)]),
    original_line(303, "who painted the eiffel tower", [(NONE, None)] * 4 + [(HEIGHT, P1)]),
]
TRAIN = [
    simplified_line(1, "how tall is the eiffel tower", HEIGHT),
    simplified_line(2, "what colour is the eiffel tower", NONE),
]


def write_jsonl(path: Path, lines: list[dict], gz: bool = False) -> Path:
    """Write dicts as jsonl, gzipped when gz."""
    data = "".join(json.dumps(line) + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


# ------------------------------------------------------------------------------------------------------ reader


@pytest.mark.parametrize("gz", [False, True])
def test_reader_both_formats_in_one_file(tmp_path: Path, gz: bool) -> None:
    path = write_jsonl(tmp_path / ("mixed.jsonl.gz" if gz else "mixed.jsonl"), TRAIN + DEV, gz=gz)
    examples = list(read_nq(path))
    assert [ex.example_id for ex in examples] == [1, 2, 101, -202, 303]
    for ex in examples:
        assert ex.context == CONTEXT
        assert [t.text for t in ex.tokens] == CONTEXT.split(" ")
        assert all(ex.context[t.char_start : t.char_end] == t.text for t in ex.tokens)
        assert all(_DOC[t.index][0] == t.text for t in ex.tokens)
    height, colour, dev_height, dev_year, dev_none = examples
    assert height.answer_text == "330 metres tall" and not height.is_impossible
    assert not height.has_bytes and dev_height.has_bytes
    assert colour.is_impossible and colour.answer_start == -1 and colour.answer_text == ""
    assert dev_height.answer_text == "330 metres tall" and dev_height.num_annotations == 5
    assert dev_year.answer_text == "1889" and dev_year.long_answer == P2
    # Only one of five annotators gives a short answer; for training the first one that has one is used.
    assert dev_none.answer_text == "330 metres tall"
    assert dev_height.tokens[0].start_byte == 105 and dev_height.tokens[0].end_byte == 111  # "Eiffel" after "<H1> "


def test_examples_to_squad(tmp_path: Path) -> None:
    squad = examples_to_squad(read_nq(write_jsonl(tmp_path / "train.jsonl", TRAIN)))
    assert squad["version"] == "v2.0" and len(squad["data"]) == 2
    para = squad["data"][0]["paragraphs"][0]
    qa = para["qas"][0]
    assert qa["id"] == "1" and qa["is_impossible"] is False
    answer = qa["answers"][0]
    assert para["context"][answer["answer_start"] :].startswith(answer["text"]) and answer["text"] == "330 metres tall"
    no_answer = squad["data"][1]["paragraphs"][0]["qas"][0]
    assert no_answer["is_impossible"] is True and no_answer["answers"] == []


# ------------------------------------------------------------------------------------------------- predictions


def test_char_span_round_trip_is_exact(tmp_path: Path) -> None:
    dev = DEV[0]
    ex = next(read_nq(write_jsonl(tmp_path / "dev.jsonl", [dev])))
    gold_short = dev["annotations"][0]["short_answers"][0]
    pred = make_prediction(ex, ex.answer_start, ex.answer_end, score=3.5, null_score_diff=-3.5)
    assert pred["short_answers"] == [{k: gold_short[k] for k in ("start_byte", "end_byte", "start_token", "end_token")}]
    # The enclosing long answer is the top-level paragraph, not the smaller nested candidate (5, 12).
    cand = dev["long_answer_candidates"][0]
    assert pred["long_answer"] == {k: cand[k] for k in ("start_byte", "end_byte", "start_token", "end_token")}
    assert pred["example_id"] == 101 and pred["short_answers_score"] == 3.5 and pred["yes_no_answer"] == "NONE"
    # A sub-word span ("30 metres ta") widens to the whole NQ tokens it touches; a leading blank is skipped.
    start = CONTEXT.index("330") + 1
    assert char_span_to_token_span(ex, start, start + 12) == HEIGHT
    assert char_span_to_token_span(ex, start - 2, start + 12) == HEIGHT


def test_every_single_token_round_trips(tmp_path: Path) -> None:
    ex = next(read_nq(write_jsonl(tmp_path / "dev.jsonl", [DEV[1]])))
    for t in ex.tokens:
        pred = make_prediction(ex, t.char_start, t.char_end, 1.0, -1.0)
        (short,) = pred["short_answers"]
        assert (short["start_token"], short["end_token"]) == (t.index, t.index + 1)
        assert (short["start_byte"], short["end_byte"]) == (t.start_byte, t.end_byte)
        if t.index < 4:  # the title lies outside every candidate: no long answer
            assert pred["long_answer"]["start_token"] == -1
        else:
            assert pred["long_answer"]["start_token"] <= t.index < pred["long_answer"]["end_token"]


def test_simplified_prediction_has_no_bytes_and_no_answer_is_null(tmp_path: Path) -> None:
    ex = next(read_nq(write_jsonl(tmp_path / "train.jsonl", TRAIN[:1])))
    pred = make_prediction(ex, ex.answer_start, ex.answer_end, 1.0, -1.0)
    assert pred["short_answers"] == [{"start_byte": -1, "end_byte": -1, "start_token": 8, "end_token": 11}]
    assert pred["long_answer"] == {"start_byte": -1, "end_byte": -1, "start_token": 4, "end_token": 13}
    null = make_prediction(ex, -1, -1, -2.0, 2.0)
    assert null["short_answers"] == [] and null["long_answer"]["start_token"] == -1
    assert null["long_answer"]["start_byte"] == -1 and null["null_score_diff"] == 2.0
    with pytest.raises(ValueError, match="pass -1, -1 for no answer"):
        make_prediction(ex, 5, 5, 0.0, 0.0)


# ------------------------------------------------------------------------------------------------ official eval


def _predict(examples: list, answer: bool) -> list[dict]:
    """Gold-span predictions (answer=True) or all-null predictions."""
    return [
        make_prediction(ex, ex.answer_start, ex.answer_end, 1.0, -1.0)
        if answer and not ex.is_impossible
        else make_prediction(ex, -1, -1, 0.0, 1.0)
        for ex in examples
    ]


@pytest.fixture
def dev_gold(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "nq-dev-00.jsonl.gz", DEV, gz=True)


def test_official_eval_perfect_vs_null(tmp_path: Path, dev_gold: Path) -> None:
    examples = list(read_nq(dev_gold))
    # Example 303 has a single annotator's short answer: below the official 2-of-5 vote, so predict null there.
    examples[2].answer_start = examples[2].answer_end = -1
    perfect, null = tmp_path / "perfect.json", tmp_path / "null.json"
    write_predictions(_predict(examples, answer=True), perfect)
    write_predictions(_predict(examples, answer=False), null)

    good = evaluate_nq(dev_gold, perfect)
    assert good["short-answer-f1"] == pytest.approx(1.0) and good["long-answer-f1"] == pytest.approx(1.0)
    assert good["short-best-threshold-f1"] == pytest.approx(1.0) and good["short-answer-n"] == 3

    bad = evaluate_nq(dev_gold, null)
    assert bad["short-answer-f1"] < 0.5 and bad["long-answer-f1"] < 0.5
    assert bad["short-answer-recall"] == 0.0


def test_official_eval_wrong_span_and_plain_jsonl_gold(tmp_path: Path) -> None:
    gold = write_jsonl(tmp_path / "dev.jsonl", DEV[:2])  # not gzipped: the module gzips it for the official reader
    examples = list(read_nq(gold))
    preds = _predict(examples, answer=True)
    year = CONTEXT.index("1889")
    preds[1] = make_prediction(examples[1], year - 3, year + 4, 1.0, -1.0)  # "in 1889": one token too many
    write_predictions(preds, tmp_path / "pred.json")
    metrics = evaluate_nq(gold, tmp_path / "pred.json")
    assert metrics["short-answer-precision"] == pytest.approx(0.5) and metrics["long-answer-f1"] == pytest.approx(1.0)


def test_eval_rejects_simplified_gold_and_id_mismatch(tmp_path: Path, dev_gold: Path) -> None:
    simplified = write_jsonl(tmp_path / "train.jsonl", TRAIN)
    write_predictions([], tmp_path / "empty.json")
    with pytest.raises(ValueError, match="original-format"):
        evaluate_nq(simplified, tmp_path / "empty.json")
    with pytest.raises(ValueError, match="3 missing"):
        evaluate_nq(dev_gold, tmp_path / "empty.json")


def test_cli_prints_metrics(tmp_path: Path, dev_gold: Path) -> None:
    examples = list(read_nq(dev_gold))
    write_predictions(_predict(examples, answer=False), tmp_path / "null.json")
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "engine.data.nq", str(dev_gold), str(tmp_path / "null.json")]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["short-answer-recall"] == 0.0
    helptext = subprocess.run([*cmd[:3], "--help"], cwd=root, capture_output=True, text=True, check=True).stdout
    assert "official Natural Questions eval" in helptext


# ------------------------------------------------------------------------------------------------------ errors


def _broken(line: dict, *keys: str | int) -> dict:
    """A deep copy of line with the field at the path keys removed."""
    line = copy.deepcopy(line)
    target = line
    for k in keys[:-1]:
        target = target[k]
    del target[keys[-1]]
    return line


@pytest.mark.parametrize(
    ("base", "keys", "message"),
    [
        (TRAIN[0], ("question_text",), r"line 2: missing field 'question_text'"),
        (TRAIN[0], ("example_id",), r"line 2: missing field 'example_id'"),
        (TRAIN[0], ("document_text",), r"line 2: missing field 'document_text' \(simplified NQ\) or 'document_tokens'"),
        (TRAIN[0], ("long_answer_candidates",), r"line 2: missing field 'long_answer_candidates'"),
        (DEV[0], ("document_tokens", 3, "start_byte"), r"line 2 document_tokens\[3\]: missing field 'start_byte'"),
        (DEV[0], ("annotations", 4, "short_answers"), r"line 2 annotations\[4\]: missing field 'short_answers'"),
        (TRAIN[0], ("annotations", 0, "short_answers", 0, "end_token"), r"answers\[0\]: missing field 'end_token'"),
    ],
)
def test_malformed_lines_name_field_and_line(tmp_path: Path, base: dict, keys: tuple, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [TRAIN[1], _broken(base, *keys)])
    with pytest.raises(ValueError, match=message):
        list(read_nq(path))


def test_bad_json_and_out_of_range_span(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(TRAIN[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        list(read_nq(path))
    line = copy.deepcopy(TRAIN[0])
    line["annotations"][0]["short_answers"][0]["end_token"] = 99
    with pytest.raises(ValueError, match=r"line 1 annotations\[0\]\.short_answers\[0\]: token span \[8, 99\)"):
        list(read_nq(write_jsonl(tmp_path / "range.jsonl", [line])))
