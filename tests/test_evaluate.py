"""engine.evaluate: artifact -> official SQuAD 2.0 metrics, consistent with QAEngine.answer and the metric."""

from __future__ import annotations

import json

import pytest

from engine.build_model import build
from engine.data.squad import evaluate
from engine.evaluate import evaluate_artifact, main
from engine.features import WindowSettings
from engine.qa import QAEngine
from tests.test_finetune import _squad


def test_evaluate_artifact_matches_engine_answers(tiny_bert, tmp_path, capsys):
    art = build(tiny_bert, tmp_path / "a", settings=WindowSettings(96, 16, 24), null_threshold=0.25)
    data = _squad(3, 2)
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(data))
    m = evaluate_artifact(art, path, backend="torch", progress=False)
    eng = QAEngine.load(art, backend="torch")
    qas = [(q["id"], q["question"], p["context"]) for a in data["data"] for p in a["paragraphs"] for q in p["qas"]]
    answers = {qid: eng.answer(q, c, null_threshold=0.25) for qid, q, c in qas}
    want = evaluate(
        data,
        {k: a.text for k, a in answers.items()},
        na_probs={k: a.null_score_diff for k, a in answers.items()},
        na_prob_thresh=0.25,
    )
    assert m["questions"] == len(qas) and m["stored_threshold"] == 0.25
    assert m["at_stored_threshold"] == want
    assert {"HasAns_f1", "NoAns_f1", "best_f1", "best_f1_thresh"} <= set(m["at_zero"])
    out = ["--predictions", str(tmp_path / "pred")]
    assert main([str(art), "--data", str(path), "--limit", "3", "--no-progress", "--backend", "torch", *out]) == 0
    assert json.loads(capsys.readouterr().out)["questions"] == 3
    pred = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    na = json.loads((tmp_path / "pred" / "na_probs.json").read_text())
    first = qas[:3]
    assert pred == {qid: eng.answer(q, c, null_threshold=float("inf")).text for qid, q, c in first}
    assert na == {qid: answers[qid].null_score_diff for qid, _, _ in first}


def test_threshold_spread_reports_the_bootstrap_percentiles(tiny_bert, tmp_path, capsys):
    art = build(tiny_bert, tmp_path / "a", settings=WindowSettings(96, 16, 24), null_threshold=0.25)
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(_squad(4, 3)))
    m = evaluate_artifact(art, path, backend="torch", progress=False, threshold_spread=50)
    sp = m["best_f1_thresh_spread"]
    assert sp["resamples"] == 50 and sp["p10"] <= sp["p50"] <= sp["p90"]
    assert all(0.0 <= sp["f1_at"][k] <= 100.0 for k in ("p10", "p50", "p90"))
    assert "best_f1_thresh_spread" not in evaluate_artifact(art, path, backend="torch", progress=False)
    args = [str(art), "--data", str(path), "--no-progress", "--backend", "torch"]
    assert main([*args, "--threshold-spread", "20"]) == 0
    assert json.loads(capsys.readouterr().out)["best_f1_thresh_spread"]["resamples"] == 20
    with pytest.raises(SystemExit):
        main([*args, "--threshold-spread", "-1"])
    assert "must be >= 0" in capsys.readouterr().err
