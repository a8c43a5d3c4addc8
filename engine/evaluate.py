"""`python -m engine.evaluate ARTIFACT --data DEV.json[.gz]`: the official SQuAD 2.0 metric for any engine artifact.

Every question goes through `QAEngine.answer_batch` (tokenization, windows, decoding included). Reported: the
official dict at null threshold 0.0 and at the artifact's stored threshold, with `na_probs = null_score_diff`
(so best_exact/best_f1 and their thresholds are included), plus the AUC of null_score_diff. `--threshold-spread N`
adds how far the best-F1 threshold moves over N bootstrap samples of the questions (its 10th, 50th and 90th
percentiles, and the F1 each scores on the whole set): on a held-out file, whether the tuned threshold is a finding
or noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from engine.data.predict import predictions_at
from engine.data.squad import auc, evaluate, load_squad, read_squad_json
from engine.data.squad_metric import bootstrap_best_thresholds, gold_answers


def evaluate_artifact(
    artifact: str | Path,
    data: str | Path,
    backend: str = "auto",
    threads: int | None = None,
    batch_size: int = 64,
    limit: int | None = None,
    progress: bool = True,
    device: str = "cpu",
    predictions: Path | None = None,
    threshold_spread: int = 0,
) -> dict[str, Any]:
    """Run an artifact over a SQuAD file; returns metrics at threshold 0 and at the stored threshold.

    `predictions`, when given, is a folder that receives the official evaluation script's two inputs:
    `predictions.json` ({qid: best non-null span}, no threshold applied) and `na_probs.json` ({qid:
    null_score_diff}), so per-question comparisons between models need no rerun. `threshold_spread` > 0 adds
    "best_f1_thresh_spread" (`bootstrap_best_thresholds` over that many resamples, seed 0).
    """
    from engine.qa import QAEngine

    eng = QAEngine.load(artifact, device=device, backend=backend, threads=threads)
    dataset = read_squad_json(data)
    examples = load_squad(dataset)[:limit]
    if limit is not None:
        keep = {e.qid for e in examples}
        dataset = {
            "data": [
                {**a, "paragraphs": [{**p, "qas": [q for q in p["qas"] if q["id"] in keep]} for p in a["paragraphs"]]}
                for a in dataset["data"]
            ]
        }
    text, diff = {}, {}
    t0 = time.perf_counter()
    chunk = 256
    for i in tqdm(range(0, len(examples), chunk), desc="evaluate", unit="chunk", disable=not progress):
        part = examples[i : i + chunk]
        answers = eng.answer_batch(
            [(e.question, e.context) for e in part], batch_size=batch_size, null_threshold=float("inf")
        )
        for e, a in zip(part, answers):
            text[e.qid], diff[e.qid] = a.text, a.null_score_diff
    seconds = time.perf_counter() - t0
    threshold = eng.artifact.null_threshold
    if predictions is not None:
        predictions.mkdir(parents=True, exist_ok=True)
        (predictions / "predictions.json").write_text(json.dumps(text, ensure_ascii=False) + "\n")
        (predictions / "na_probs.json").write_text(json.dumps(diff) + "\n")

    def at(t: float) -> dict[str, Any]:
        return evaluate(dataset, predictions_at(text, diff, t), na_probs=diff, na_prob_thresh=t)

    out = {
        "artifact": str(artifact),
        "data": str(data),
        "backend": eng.backend_name,
        "device": device,
        "questions": len(examples),
        "seconds": seconds,
        "questions_per_s": len(examples) / seconds,
        "at_zero": at(0.0),
        "stored_threshold": threshold,
        "at_stored_threshold": at(threshold),
        "auc": auc(diff, dataset)
        if any(e.is_impossible for e in examples) and not all(e.is_impossible for e in examples)
        else None,
    }
    if threshold_spread > 0:
        ts = bootstrap_best_thresholds(gold_answers(dataset), text, diff, threshold_spread)
        pct = dict(zip(("p10", "p50", "p90"), (float(x) for x in np.percentile(ts, [10, 50, 90]))))
        out["best_f1_thresh_spread"] = {
            "resamples": threshold_spread,
            **pct,
            "f1_at": {k: at(v)["f1"] for k, v in pct.items()},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m engine.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--data", required=True, type=Path, help="SQuAD 2.0 (or 1.1) JSON, .json or .json.gz")
    ap.add_argument("--backend", default="auto", help="auto: triton on CUDA, else cpp if built, else torch")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--batch-size", type=int, default=64, help="windows per forward")
    ap.add_argument("--limit", type=int, help="only the first N questions (quick checks)")
    ap.add_argument("--out", type=Path, help="also write the metrics JSON here")
    ap.add_argument(
        "--predictions",
        type=Path,
        metavar="DIR",
        help="also write DIR/predictions.json (best span per question) and DIR/na_probs.json (null_score_diff)",
    )
    ap.add_argument(
        "--threshold-spread",
        type=int,
        default=0,
        metavar="N",
        help="also report the 10th/50th/90th percentiles of the best-F1 threshold over N bootstrap samples of the "
        "questions, and the F1 at each (0: off)",
    )
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.threshold_spread < 0:
        ap.error(f"--threshold-spread must be >= 0, got {a.threshold_spread}")
    try:
        m = evaluate_artifact(
            a.artifact,
            a.data,
            a.backend,
            a.threads,
            a.batch_size,
            a.limit,
            not a.no_progress,
            a.device,
            a.predictions,
            a.threshold_spread,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(m, indent=2)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
