"""SQuAD 1.1 / 2.0: reading the official JSON, training and eval windows, and the official 2.0 metric.

The metric itself lives in `engine.data.squad_metric`; `evaluate` and `auc` here accept a dataset path or
parsed dict. Run `python -m engine.data.squad DATA.json[.gz] PRED.json [--na-prob-file F]` for the official
script's command line (it prints the same JSON keys).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.data.squad_metric import auc as _auc
from engine.data.squad_metric import evaluate_gold, gold_answers, normalize_answer
from engine.features import Window, WindowMaker, span_labels

__all__ = [
    "Example",
    "TrainFeature",
    "EvalFeature",
    "load_squad",
    "read_squad_json",
    "find_train_files",
    "split_by_title",
    "examples_to_squad",
    "train_features",
    "eval_features",
    "gold_of",
    "evaluate",
    "auc",
    "normalize_answer",
    "main",
]


@dataclass(frozen=True)
class Example:
    """One question over one context; answers are (text, char_start) pairs, empty when unanswerable."""

    qid: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...]
    is_impossible: bool
    title: str = ""


@dataclass(frozen=True)
class TrainFeature:
    """One labelled training window: ids/types `[S]`, answer token positions (0, 0) = CLS = no answer here."""

    input_ids: list[int]
    token_type_ids: list[int]
    start: int
    end: int


@dataclass(frozen=True)
class EvalFeature:
    """One eval window and the index of its example in the eval example list."""

    window: Window
    example_index: int


def read_squad_json(path: str | Path) -> dict[str, Any]:
    """Parse a SQuAD JSON file (.json or .json.gz) into a dict holding "data"."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"SQuAD file {p} does not exist")
    with open(p, "rb") as f:
        opener = gzip.open if f.read(2) == b"\x1f\x8b" else open
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ValueError(f"{p} is not a readable SQuAD JSON file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{p} is not in SQuAD format: expected an object with a 'data' list")
    return data


def _as_dataset(dataset: Mapping[str, Any] | str | Path) -> Mapping[str, Any]:
    return read_squad_json(dataset) if isinstance(dataset, (str, Path)) else dataset


def load_squad(path: str | Path | Mapping[str, Any]) -> list[Example]:
    """Examples of a SQuAD 1.1 or 2.0 file (or parsed dict); 1.1 questions (no is_impossible) are answerable."""
    data = _as_dataset(path)
    out = []
    for article in data["data"]:
        title = article.get("title", "")
        for para in article["paragraphs"]:
            context = para["context"]
            for qa in para["qas"]:
                impossible = bool(qa.get("is_impossible", False)) or not qa["answers"]
                answers = () if impossible else tuple((a["text"], int(a["answer_start"])) for a in qa["answers"])
                out.append(Example(qa["id"], qa["question"], context, answers, impossible, title))
    return out


def find_train_files(data_root: str | Path) -> list[Path]:
    """Every *.json / *.json.gz file under `data_root` whose name contains "train", sorted by path."""
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist")
    files = [p for p in root.rglob("*") if p.is_file() and "train" in p.name and p.name.endswith((".json", ".json.gz"))]
    return sorted(files)


def split_by_title(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(kept, held_out): hold out ceil(fraction * #titles) whole articles, chosen by a seeded shuffle."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"eval fraction must lie in (0, 1), got {fraction}")
    titles = sorted({e.title for e in examples})
    if len(titles) < 2:
        raise ValueError(f"holding out whole articles needs at least 2 titles, the training files have {len(titles)}")
    random.Random(seed).shuffle(titles)
    held = set(titles[: min(len(titles) - 1, math.ceil(fraction * len(titles)))])
    return [e for e in examples if e.title not in held], [e for e in examples if e.title in held]


def examples_to_squad(examples: Iterable[Example], version: str = "v2.0") -> dict[str, Any]:
    """Official-format dict of `examples` (one paragraph per distinct (title, context), in first-seen order)."""
    articles: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for e in examples:
        paras = articles.setdefault(e.title, {})
        paras.setdefault(e.context, []).append(
            {
                "id": e.qid,
                "question": e.question,
                "is_impossible": e.is_impossible,
                "answers": [{"text": t, "answer_start": s} for t, s in e.answers],
            }
        )
    return {
        "version": version,
        "data": [
            {"title": t, "paragraphs": [{"context": c, "qas": qas} for c, qas in paras.items()]}
            for t, paras in articles.items()
        ],
    }


class _Tokenized:
    """Caches context tokenizations: many questions share one paragraph."""

    def __init__(self, maker: WindowMaker):
        self.maker = maker
        self.contexts: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}

    def windows(self, e: Example) -> list[Window]:
        q = self.maker.question_ids(e.question)
        if not q:
            raise ValueError(f"question {e.qid!r} has no tokens after tokenization")
        if e.context not in self.contexts:
            self.contexts[e.context] = self.maker.encode(e.context)
        c_ids, c_offsets = self.contexts[e.context]
        if not c_ids:
            raise ValueError(f"question {e.qid!r}: its context has no tokens after tokenization")
        return self.maker.windows_from_ids(q, c_ids, c_offsets)


def train_features(examples: Iterable[Example], maker: WindowMaker) -> list[TrainFeature]:
    """Every window of every example, labelled with the first gold answer's tokens (CLS if unanswerable/outside)."""
    tok = _Tokenized(maker)
    out = []
    for e in examples:
        for w in tok.windows(e):
            if e.is_impossible:
                s, t = 0, 0
            else:
                text, start = e.answers[0]
                s, t = span_labels(w, start, start + len(text))
            out.append(TrainFeature(w.input_ids, w.token_type_ids, s, t))
    return out


def eval_features(examples: Sequence[Example], maker: WindowMaker) -> list[EvalFeature]:
    """Every window of every example, tagged with its example's index."""
    tok = _Tokenized(maker)
    return [EvalFeature(w, i) for i, e in enumerate(examples) for w in tok.windows(e)]


def gold_of(examples: Iterable[Example]) -> dict[str, list[str]]:
    """qid -> gold answer texts ([] = unanswerable), the metric's view of a list of examples."""
    return {e.qid: [t for t, _ in e.answers] for e in examples}


def evaluate(
    dataset: Mapping[str, Any] | str | Path,
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> dict[str, float]:
    """Official SQuAD 2.0 scores (0-100) of {qid: text} ("" = no answer) against a dataset dict or file path.

    Keys: exact, f1, total, HasAns_exact/f1/total and NoAns_* when those sets are non-empty, and with na_probs
    also best_exact, best_exact_thresh, best_f1, best_f1_thresh. A question predicted "no answer" when its
    na_prob exceeds na_prob_thresh. Unlike the official script, missing predictions score 0 with a warning
    instead of crashing (see `engine.data.squad_metric`).
    """
    return evaluate_gold(gold_answers(_as_dataset(dataset)), predictions, na_probs, na_prob_thresh)


def auc(null_score_diff: Mapping[str, float], dataset: Mapping[str, Any] | str | Path) -> float:
    """ROC AUC (0-1) of null_score_diff separating unanswerable from answerable questions of the dataset."""
    return _auc(null_score_diff, gold_answers(_as_dataset(dataset)))


def main(argv: list[str] | None = None) -> int:
    """CLI: score a predictions file against a SQuAD file and print the official JSON."""
    ap = argparse.ArgumentParser(
        prog="python -m engine.data.squad",
        description="Official SQuAD 2.0 evaluation (missing predictions count as wrong).",
    )
    ap.add_argument("data_file", type=Path, help="SQuAD JSON dataset (.json or .json.gz)")
    ap.add_argument("pred_file", type=Path, help='JSON {qid: answer text}, "" for no answer')
    ap.add_argument(
        "--na-prob-file",
        type=Path,
        default=None,
        help="JSON {qid: no-answer score}, e.g. null_score_diff; enables the best-threshold search",
    )
    ap.add_argument(
        "--na-prob-thresh",
        type=float,
        default=1.0,
        help="predict no answer where the no-answer score exceeds this (default 1.0)",
    )
    ap.add_argument("--auc", action="store_true", help="also report the ROC AUC of the no-answer scores")
    args = ap.parse_args(argv)
    dataset = read_squad_json(args.data_file)
    preds = json.loads(args.pred_file.read_text(encoding="utf-8"))
    na_probs = json.loads(args.na_prob_file.read_text(encoding="utf-8")) if args.na_prob_file else None
    out = evaluate(dataset, preds, na_probs, args.na_prob_thresh)
    if args.auc:
        if na_probs is None:
            ap.error("--auc needs --na-prob-file")
        out["auc"] = auc(na_probs, dataset)
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
