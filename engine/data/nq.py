"""Natural Questions: readers for both formats, SQuAD-shaped export, NQ predictions and the official eval.

An NQ document is a list of tokens, some of them HTML markup. We keep the text tokens, join them with single
spaces into one context string, and remember for every kept token its character span in that string, its NQ
token index and (original format only) its byte span in ``document_html``. Gold short answers become character
spans of that context; a predicted character span maps back to NQ token and byte spans through the same table.
"""

import argparse
import bisect
import glob
import gzip
import io
import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

# Simplified NQ keeps HTML tags as tokens ("<P>", "</Table>", '<Td_colspan="2">'); the original format flags them.
_HTML_TOKEN = re.compile(r"</?[A-Za-z][^<>]*>")
_GZIP_MAGIC = b"\x1f\x8b"


class NQToken(NamedTuple):
    """One kept text token: context chars [char_start, char_end), NQ token index, html bytes (-1 if unknown)."""

    text: str
    char_start: int
    char_end: int
    index: int
    start_byte: int = -1
    end_byte: int = -1


class NQCandidate(NamedTuple):
    """A long-answer candidate: NQ tokens [start_token, end_token), html bytes (-1 if unknown)."""

    start_token: int
    end_token: int
    top_level: bool
    start_byte: int = -1
    end_byte: int = -1


@dataclass
class NQExample:
    """One NQ question over one document, flattened to a text context with gold char span [answer_start, answer_end)."""

    example_id: int | str
    question: str
    context: str
    tokens: list[NQToken]
    candidates: list[NQCandidate] = field(default_factory=list)
    title: str = ""
    answer_start: int = -1  # chars into context; -1 = no short answer (the no-answer / CLS target)
    answer_end: int = -1
    long_answer: tuple[int, int] = (-1, -1)  # gold NQ token span of the first non-null long answer
    yes_no_answer: str = "NONE"  # "YES"/"NO" only when no annotation gives a short span
    num_annotations: int = 0

    @property
    def is_impossible(self) -> bool:
        """True when the example has no extractive short answer (train target = CLS)."""
        return self.answer_start < 0

    @property
    def answer_text(self) -> str:
        """The gold short answer as context text ('' when there is none)."""
        return "" if self.is_impossible else self.context[self.answer_start : self.answer_end]

    @property
    def has_bytes(self) -> bool:
        """True for the original format, whose tokens carry byte offsets into document_html."""
        return bool(self.tokens) and self.tokens[0].start_byte >= 0


# --------------------------------------------------------------------------------------------------- reading


def _open_text(path: str | Path) -> io.TextIOBase:
    """Open a jsonl file as UTF-8 text, transparently gunzipping when it starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == _GZIP_MAGIC:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _get(obj: Any, key: str, where: str) -> Any:
    """obj[key], or a ValueError naming the missing field and where it was expected."""
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{where}: missing field '{key}'; every NQ line needs it (see docs/NQ.md)")
    return obj[key]


def _int(obj: Any, key: str, where: str) -> int:
    """obj[key] as int, or a ValueError naming the field."""
    value = _get(obj, key, where)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{where}: field '{key}' must be an integer, got {value!r}")
    return value


def _token_list(raw: dict, where: str) -> tuple[list[tuple[str, bool, int, int]], bool]:
    """NQ tokens as (text, is_html, start_byte, end_byte) and whether the line is in the original format."""
    if "document_tokens" in raw:
        out = []
        for i, tok in enumerate(_get(raw, "document_tokens", where)):
            at = f"{where} document_tokens[{i}]"
            text, is_html = _get(tok, "token", at), bool(_get(tok, "html_token", at))
            out.append((text, is_html, _int(tok, "start_byte", at), _int(tok, "end_byte", at)))
        return out, True
    if "document_text" in raw:
        if not isinstance(raw["document_text"], str):
            raise ValueError(f"{where}: field 'document_text' must be a string of blank-separated tokens")
        # Split on single blanks only: NQ tokens may contain other unicode whitespace.
        words = raw["document_text"].split(" ")
        return [(w, bool(_HTML_TOKEN.fullmatch(w)), -1, -1) for w in words], False
    raise ValueError(
        f"{where}: missing field 'document_text' (simplified NQ) or 'document_tokens' (original NQ); "
        "the line is in neither format"
    )


def _build_context(nq_tokens: list[tuple[str, bool, int, int]]) -> tuple[str, list[NQToken]]:
    """Join non-HTML tokens by single spaces; return the context and the kept tokens with char spans."""
    kept: list[NQToken] = []
    pos = 0
    for index, (text, is_html, start_byte, end_byte) in enumerate(nq_tokens):
        text = text.strip()
        if is_html or not text:
            continue
        if kept:
            pos += 1  # the joining space
        kept.append(NQToken(text, pos, pos + len(text), index, start_byte, end_byte))
        pos += len(text)
    return " ".join(t.text for t in kept), kept


def _char_span(tokens: list[NQToken], token_index: list[int], start: int, end: int) -> tuple[int, int]:
    """Char span covering the kept tokens inside NQ token span [start, end); (-1, -1) if none are text."""
    lo = bisect.bisect_left(token_index, start)
    hi = bisect.bisect_left(token_index, end)
    if lo >= hi:
        return -1, -1
    return tokens[lo].char_start, tokens[hi - 1].char_end


def parse_nq_line(raw: dict, line_no: int = 0) -> NQExample:
    """Turn one decoded NQ json line (either format) into an NQExample; line_no is 1-based, for messages."""
    where = f"line {line_no}"
    example_id = _get(raw, "example_id", where)
    question = _get(raw, "question_text", where)
    nq_tokens, original = _token_list(raw, where)
    context, tokens = _build_context(nq_tokens)
    n = len(nq_tokens)

    candidates = []
    for i, cand in enumerate(_get(raw, "long_answer_candidates", where)):
        at = f"{where} long_answer_candidates[{i}]"
        s, e = _int(cand, "start_token", at), _int(cand, "end_token", at)
        if not 0 <= s < e <= n:
            raise ValueError(f"{at}: token span [{s}, {e}) is outside the document's {n} tokens")
        sb, eb = (_int(cand, "start_byte", at), _int(cand, "end_byte", at)) if original else (-1, -1)
        candidates.append(NQCandidate(s, e, bool(cand.get("top_level", True)), sb, eb))

    ex = NQExample(example_id, question, context, tokens, candidates, title=str(raw.get("document_title", "")))
    annotations = raw.get("annotations", [])  # absent on unlabeled (test) data
    ex.num_annotations = len(annotations)
    token_index = [t.index for t in tokens]
    for a, ann in enumerate(annotations):
        at = f"{where} annotations[{a}]"
        long = _get(ann, "long_answer", at)
        ls, le = _int(long, "start_token", f"{at}.long_answer"), _int(long, "end_token", f"{at}.long_answer")
        if ls >= 0 and ex.long_answer == (-1, -1):
            ex.long_answer = (ls, le)
        for k, short in enumerate(_get(ann, "short_answers", at)):
            sat = f"{at}.short_answers[{k}]"
            s, e = _int(short, "start_token", sat), _int(short, "end_token", sat)
            if not 0 <= s < e <= n:
                raise ValueError(f"{sat}: token span [{s}, {e}) is outside the document's {n} tokens")
            if ex.is_impossible:
                ex.answer_start, ex.answer_end = _char_span(tokens, token_index, s, e)
                if not ex.is_impossible:
                    ex.yes_no_answer = "NONE"
        yes_no = str(ann.get("yes_no_answer", "NONE")).upper()
        if ex.is_impossible and yes_no != "NONE" and ex.yes_no_answer == "NONE":
            ex.yes_no_answer = yes_no  # kept for reference; extractive training still sees no span
    return ex


def read_nq(path: str | Path) -> Iterator[NQExample]:
    """Yield NQExamples from an NQ jsonl file (plain or .gz), detecting simplified vs original format per line."""
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                msg = f"{path} line {line_no}: not valid JSON ({err}); NQ files hold one JSON object per line"
                raise ValueError(msg) from err
            try:
                yield parse_nq_line(raw, line_no)
            except ValueError as err:
                raise ValueError(f"{path} {err}") from None


def examples_to_squad(examples: Iterable[NQExample]) -> dict:
    """SQuAD 2.0-shaped dict (one article per NQ example) for the project's SQuAD feature pipeline."""
    data = []
    for ex in examples:
        answers = [] if ex.is_impossible else [{"text": ex.answer_text, "answer_start": ex.answer_start}]
        qa = {"id": str(ex.example_id), "question": ex.question, "answers": answers, "is_impossible": ex.is_impossible}
        data.append({"title": ex.title or str(ex.example_id), "paragraphs": [{"context": ex.context, "qas": [qa]}]})
    return {"version": "v2.0", "data": data}


# ----------------------------------------------------------------------------------------------- predictions

_NULL_SPAN = {"start_byte": -1, "end_byte": -1, "start_token": -1, "end_token": -1}


def char_span_to_token_span(example: NQExample, char_start: int, char_end: int) -> tuple[int, int]:
    """NQ token span [start, end) of the kept tokens overlapping context chars [char_start, char_end)."""
    if not 0 <= char_start < char_end <= len(example.context):
        raise ValueError(
            f"example {example.example_id}: char span [{char_start}, {char_end}) is not a non-empty span of the "
            f"{len(example.context)}-char context; pass -1, -1 for no answer"
        )
    ends = [t.char_end for t in example.tokens]
    lo = bisect.bisect_right(ends, char_start)  # first token ending after char_start
    starts = [t.char_start for t in example.tokens]
    hi = bisect.bisect_left(starts, char_end)  # tokens [lo, hi) start before char_end
    if lo >= hi:
        raise ValueError(f"example {example.example_id}: char span [{char_start}, {char_end}) covers only blanks")
    return example.tokens[lo].index, example.tokens[hi - 1].index + 1


def _enclosing_candidate(example: NQExample, start_token: int, end_token: int) -> NQCandidate | None:
    """Smallest candidate containing [start_token, end_token), preferring top-level ones; None if no candidate does."""
    containing = [c for c in example.candidates if c.start_token <= start_token and end_token <= c.end_token]
    if not containing:
        return None
    return min(containing, key=lambda c: (not c.top_level, c.end_token - c.start_token))


def make_prediction(example: NQExample, char_start: int, char_end: int, score: float, null_score_diff: float) -> dict:
    """One NQ prediction for a context char span [char_start, char_end) (-1, -1 = no answer).

    score ranks predictions for the official eval's threshold sweep (pass e.g. -null_score_diff, logits);
    null_score_diff (null minus best span score, logits) is kept as an extra field the official eval ignores.
    """
    pred: dict[str, Any] = {
        "example_id": example.example_id,
        "long_answer": dict(_NULL_SPAN),
        "long_answer_score": float(score),
        "short_answers": [],
        "short_answers_score": float(score),
        "yes_no_answer": "NONE",
        "null_score_diff": float(null_score_diff),
    }
    if char_start < 0:
        return pred
    start_token, end_token = char_span_to_token_span(example, char_start, char_end)
    by_index = {t.index: t for t in example.tokens}
    short = {
        "start_byte": by_index[start_token].start_byte,
        "end_byte": by_index[end_token - 1].end_byte,
        "start_token": start_token,
        "end_token": end_token,
    }
    pred["short_answers"] = [short]
    cand = _enclosing_candidate(example, start_token, end_token)
    if cand is not None:
        pred["long_answer"] = {
            "start_byte": cand.start_byte,
            "end_byte": cand.end_byte,
            "start_token": cand.start_token,
            "end_token": cand.end_token,
        }
    return pred


def write_predictions(preds: Iterable[dict], path: str | Path) -> None:
    """Write predictions as NQ's prediction JSON: {"predictions": [...]}."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"predictions": list(preds)}, f)


# ---------------------------------------------------------------------------------------------------- scoring


def _official_eval() -> tuple[Any, Any]:
    """Import natural_questions' nq_eval and eval_utils with their absl flags usable outside absl.app."""
    try:
        from absl import flags
        from natural_questions import eval_utils, nq_eval
    except ImportError as err:
        raise ImportError(f"{err}; install the official eval with `pip install natural-questions absl-py six`") from err
    if not flags.FLAGS.is_parsed():
        # Library use: keep the official defaults (>= 2 of 5 annotators must give an answer) without parsing argv.
        flags.FLAGS.mark_as_parsed()
    return nq_eval, eval_utils


def _gold_file(path: str) -> io.BufferedIOBase:
    """A gzip byte stream of one gold file, as the official reader expects; checks it is original-format NQ."""
    with _open_text(path) as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        raise ValueError(f"gold file {path} is empty")
    raw = json.loads(first)
    where = f"gold file {path} line 1"
    for ann in _get(raw, "annotations", where):
        if "start_byte" not in _get(ann, "long_answer", where):
            raise ValueError(
                f"{where}: annotations lack byte offsets (simplified NQ?); the official eval needs the "
                "original-format five-way annotated dev set (nq-dev-*.jsonl.gz)"
            )
    with open(path, "rb") as f:
        if f.read(2) == _GZIP_MAGIC:
            return open(path, "rb")
        f.seek(0)
        stream = io.BytesIO(gzip.compress(f.read()))
    stream.name = path  # the official reader logs it
    return stream


def evaluate_nq(gold_path: str | Path, predictions_path: str | Path) -> dict:
    """Official NQ metrics (fractions in [0, 1]): long/short answer F1, precision, recall, plus best-threshold ones."""
    nq_eval, eval_utils = _official_eval()
    paths = sorted(glob.glob(str(gold_path)))
    if not paths:
        raise FileNotFoundError(f"no gold file matches {gold_path}; pass an nq-dev jsonl(.gz) path or glob")
    gold: dict = {}
    for path in paths:
        with _gold_file(path) as stream:  # read in-process: the official read_annotation forks a 10-process pool
            gold.update(eval_utils.read_annotation_from_one_split(stream))
    preds = eval_utils.read_prediction_json(str(predictions_path))
    missing, extra = set(gold) - set(preds), set(preds) - set(gold)
    if missing or extra:
        raise ValueError(
            f"predictions must cover exactly the gold example ids: {len(missing)} missing (e.g. "
            f"{sorted(missing, key=str)[:3]}), {len(extra)} unknown (e.g. {sorted(extra, key=str)[:3]}); "
            "write one prediction per gold example (null spans for no answer)"
        )
    long_stats, short_stats = nq_eval.score_answers(gold, preds)
    metrics = dict(nq_eval.compute_final_f1(long_stats, short_stats))
    metrics.update(nq_eval.get_metrics_with_answer_stats(long_stats, short_stats))
    return metrics


def main(argv: list[str] | None = None) -> int:
    """CLI: print the official NQ metrics of a prediction file as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m engine.data.nq",
        description="Score NQ predictions with the official Natural Questions eval (original-format gold).",
    )
    parser.add_argument("gold", help="original-format NQ gold: jsonl or jsonl.gz, or a glob like 'nq-dev-0?.jsonl.gz'")
    parser.add_argument("predictions", help='prediction JSON: {"predictions": [...]} as written by write_predictions')
    args = parser.parse_args(argv)
    print(json.dumps(evaluate_nq(args.gold, args.predictions), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
