"""bench.accuracy_rows: accuracy.json rows from engine.evaluate JSON and the artifacts beside them (FLOPs, bytes,
latency), grouped by teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import accuracy_rows, accuracy_tables
from tests.results_files import bench_file, eval_file


@pytest.fixture(scope="module")
def two_artifacts(tiny_bert, tmp_path_factory) -> tuple[Path, Path]:
    """A dense tiny artifact and one with heads and FFN units removed."""
    from engine.build_model import build
    from engine.features import WindowSettings

    d = tmp_path_factory.mktemp("arts")
    spec = d / "spec.json"
    spec.write_text(json.dumps({"layers": [{"heads": [3, 1]}, {"heads": [], "ffn": []}, {"ffn": [0]}]}))
    settings = WindowSettings(96, 16, 24)
    return build(tiny_bert, d / "dense", settings=settings), build(
        tiny_bert, d / "pruned", spec=spec, settings=settings
    )


def test_accuracy_rows_groups_teachers_flops_and_latency(two_artifacts, tmp_path: Path, capsys):
    from engine.artifact import load_artifact
    from engine.flops import encoder_flops

    dense, pruned = two_artifacts
    res = tmp_path / "results"
    # current group: FLOPs from the artifacts' manifests; the teacher is the shortest eval-teacher* name
    eval_file(res / "eval-teacher-v3.json", 60, 63, 76, 53, 70, artifact=str(dense))
    eval_file(res / "eval-teacher-v3-int8.json", 60, 63, 76, 53, 70, artifact=str(dense))
    eval_file(res / "eval-l0-v3-0.52.json", 59, 62, 75, 52, 69, artifact=str(pruned))
    # previous group: artifacts gone; FLOPs from the old flat (one-teacher) accuracy.json, latency from its own file
    eval_file(res / "previous" / "eval-teacher-minilm.json", 40, 55, 66, 43, 62, artifact=str(tmp_path / "gone-t"))
    eval_file(res / "previous" / "eval-l0-0.5.json", 38, 54, 63, 42, 60, artifact=str(tmp_path / "gone-s"))
    old = [
        {"name": "teacher-minilm", "artifact_flops": 900, "dense_flops": 900},
        {"name": "l0-0.5", "artifact_flops": 450, "dense_flops": 900},
        {"name": "floor", "quoted": {}},
    ]
    (res / "accuracy.json").write_text(json.dumps(old))
    bench_file(
        res / "previous" / "students.json",
        [
            ({"provider": "engine-cpp", "model": m, "batch": 8, "seq": 384}, t)
            for m, t in (("teacher-minilm", 0.2), ("l0-0.5", 0.08), ("hf-eager-dense", 0.8))
        ],
    )
    bench_file(
        res / "students.json",
        [
            ({"provider": "engine-cpp", "model": m, "batch": 1, "seq": 384}, t)
            for m, t in (("teacher-v3", 0.03), ("l0-v3-0.52", 0.01))
        ],
    )
    assert accuracy_rows.main(["--results", str(res)]) == 0
    acc = json.loads((res / "accuracy.json").read_text())
    cur, prev = acc["current"], acc["previous"]
    small = cur["rows"][0]["latency"]["1x384"]  # against teacher-v3 of its own folder; no HF row there
    assert small["ms"] == pytest.approx(10.0) and small["speedup_vs_teacher"] == pytest.approx(3.0)
    assert "speedup_vs_hf_eager" not in small and "speedup" not in cur["rows"][0]  # no (8,384) median
    assert (cur["teacher"], prev["teacher"]) == ("teacher-v3", "teacher-minilm")
    assert [r["name"] for r in cur["rows"]] == ["l0-v3-0.52", "teacher-v3-int8", "teacher-v3"]
    full, cut = encoder_flops(load_artifact(dense).cfg, 1, 384), encoder_flops(load_artifact(pruned).cfg, 1, 384)
    assert cut < full
    assert [(r["artifact_flops"], r["dense_flops"]) for r in cur["rows"]] == [(cut, full), (full, full), (full, full)]
    assert cur["rows"][0]["eval"] == str((res / "eval-l0-v3-0.52.json").resolve())
    assert [(r["name"], r["artifact_flops"], r["dense_flops"]) for r in prev["rows"]] == [
        ("l0-0.5", 450, 900),
        ("teacher-minilm", 900, 900),
    ]
    lat = prev["rows"][0]["latency"]["8x384"]
    assert lat["speedup_vs_teacher"] == pytest.approx(2.5) and lat["speedup_vs_hf_eager"] == pytest.approx(10.0)
    assert prev["rows"][0]["speedup"] == pytest.approx(2.5) and "latency" not in cur["rows"][1]
    assert [q["name"] for q in acc["quoted"]] == [q["name"] for q in accuracy_rows.QUOTED]
    # rerun from its own output where the artifacts are ignored: the same rows
    assert accuracy_rows.main(["--results", str(res), "--stored-flops"]) == 0
    assert json.loads((res / "accuracy.json").read_text()) == acc
    # an eval whose artifact is gone and has no stored row: a clear error naming the file
    eval_file(res / "eval-l0-v3-0.75.json", 50, 60, 70, 50, 60, artifact=str(tmp_path / "gone-new"))
    assert accuracy_rows.main(["--results", str(res)]) == 2
    assert "eval-l0-v3-0.75.json" in capsys.readouterr().err


def test_a_teacher_timed_elsewhere_is_timed_through_the_dense_stand_in(two_artifacts, tmp_path: Path):
    """teacher v3's artifact was built on the GPU machine: its speedup denominator is the dense MiniLM timed on the
    same engine in the same file, but only when that stand-in has exactly the teacher's encoder FLOPs."""
    from bench.common import DENSE_ENGINE_MODEL
    from engine.artifact import load_artifact
    from engine.flops import encoder_flops

    dense, pruned = two_artifacts
    res = tmp_path / "results"
    eval_file(res / "eval-teacher-v3.json", 60, 63, 76, 53, 70, artifact=str(dense))
    eval_file(res / "eval-l0-v3-0.52.json", 59, 62, 75, 52, 69, artifact=str(pruned))
    full = encoder_flops(load_artifact(dense).cfg, 1, 384)

    def timed(stand_in_flops: float) -> dict:
        rows = [({"provider": "engine-cpp", "model": "l0-v3-0.52", "batch": 8, "seq": 384}, 0.08)]
        for batch, median in ((1, 0.03), (8, 0.2)):
            info = {"provider": "engine-cpp", "model": DENSE_ENGINE_MODEL, "batch": batch, "seq": 384}
            rows.append(({**info, "flops": stand_in_flops * batch}, median))
        bench_file(res / "students.json", rows)
        assert accuracy_rows.main(["--results", str(res)]) == 0
        return {r["name"]: r for r in json.loads((res / "accuracy.json").read_text())["current"]["rows"]}

    rows = timed(full)
    assert rows["l0-v3-0.52"]["speedup"] == pytest.approx(2.5)
    t = rows["teacher-v3"]["latency"]
    assert t["8x384"]["stand_in"] == DENSE_ENGINE_MODEL and t["8x384"]["ms"] == pytest.approx(200.0)
    assert t["8x384"]["speedup_vs_teacher"] == pytest.approx(1.0) and t["1x384"]["ms"] == pytest.approx(30.0)
    rows = timed(full + 1)  # another architecture is no stand-in: no speedup rather than a wrong one
    assert rows["l0-v3-0.52"].get("speedup") is None and "latency" not in rows["teacher-v3"]


def test_accuracy_rows_three_groups_from_a_two_group_file(two_artifacts, tmp_path: Path):
    """teacher-v2's eval files moved from the results folder to v2/ (artifacts gone) keep the FLOPs the old
    two-group accuracy.json stored for them under "current"; the new current teacher gets its own group."""
    dense, pruned = two_artifacts
    res = tmp_path / "results"
    eval_file(res / "eval-teacher-v3.json", 60, 63, 76, 53, 70, artifact=str(dense))
    eval_file(res / "eval-l0-v3-0.52.json", 59, 62, 75, 52, 69, artifact=str(pruned))
    eval_file(res / "v2" / "eval-teacher-v2.json", 50, 58, 70, 48, 66, artifact=str(tmp_path / "gone-t"))
    eval_file(res / "v2" / "eval-l0-v2-0.52.json", 49, 57, 69, 47, 65, artifact=str(tmp_path / "gone-s"))
    eval_file(res / "previous" / "eval-teacher-minilm.json", 40, 55, 66, 43, 62, artifact=str(tmp_path / "gone-m"))
    rows = lambda *r: {"rows": [{"name": n, "artifact_flops": f, "dense_flops": d} for n, f, d in r]}  # noqa: E731
    old = {
        "current": rows(("teacher-v2", 800, 800), ("l0-v2-0.52", 380, 800)),
        "previous": rows(("teacher-minilm", 900, 900)),
        "quoted": [],
    }
    (res / "accuracy.json").write_text(json.dumps(old))
    assert set(accuracy_rows.stored_rows(res / "accuracy.json")) == {
        ("current", "teacher-v2"),
        ("current", "l0-v2-0.52"),
        ("previous", "teacher-minilm"),
    }
    assert accuracy_rows.main(["--results", str(res)]) == 0
    acc = json.loads((res / "accuracy.json").read_text())
    assert list(acc) == ["cpu-e1", "current", "cpu", "v2", "previous", "quoted"]
    assert acc["cpu"] == {"folder": str((res / "cpu").resolve()), "teacher": None, "rows": []}
    assert [(acc[g]["teacher"], acc[g]["folder"]) for g in ("current", "v2", "previous")] == [
        ("teacher-v3", str(res.resolve())),
        ("teacher-v2", str((res / "v2").resolve())),
        ("teacher-minilm", str((res / "previous").resolve())),
    ]
    assert [r["name"] for r in acc["current"]["rows"]] == ["l0-v3-0.52", "teacher-v3"]
    assert [(r["name"], r["artifact_flops"], r["dense_flops"]) for r in acc["v2"]["rows"]] == [
        ("l0-v2-0.52", 380, 800),
        ("teacher-v2", 800, 800),
    ]
    # a name stored in two groups is ambiguous: no fallback, the artifact must be there
    assert accuracy_rows.stored_row({("a", "x"): {"n": 1}, ("b", "x"): {"n": 2}}, "c", "x") is None
    assert accuracy_rows.stored_row({("a", "x"): {"n": 1}, ("b", "x"): {"n": 2}}, "b", "x") == {"n": 2}


def test_accuracy_rows_empty_current_group_and_missing_teacher(tmp_path: Path, capsys):
    res = tmp_path / "results"
    eval_file(res / "previous" / "eval-teacher-minilm.json", 40, 55, 66, 43, 62, artifact=str(tmp_path / "gone"))
    (res / "accuracy.json").write_text(
        json.dumps({"previous": {"rows": [{"name": "teacher-minilm", "artifact_flops": 9, "dense_flops": 9}]}})
    )
    assert accuracy_rows.main(["--results", str(res)]) == 0
    acc = json.loads((res / "accuracy.json").read_text())
    assert acc["current"]["rows"] == [] and acc["current"]["teacher"] is None
    assert [r["name"] for r in acc["previous"]["rows"]] == ["teacher-minilm"]
    eval_file(res / "eval-l0-v2-0.5.json", 50, 60, 70, 50, 60, artifact=str(tmp_path / "gone"))
    assert accuracy_rows.main(["--results", str(res)]) == 2
    assert "no eval-teacher*.json" in capsys.readouterr().err


def test_named_group_teacher_and_artifact_bytes(two_artifacts, tmp_path: Path, capsys):
    """The cpu-e1 group names its teacher (teacher-cpu-e2-sn2, not the shorter teacher-cpu-e1); artifact sizes are
    measured where the artifact is and kept from accuracy.json where it is gone; targets are judged on the newest
    group with a teacher."""
    dense, pruned = two_artifacts
    res = tmp_path / "results"
    eval_file(res / "eval-teacher-v3.json", 60, 63, 76, 53, 70, artifact=str(dense))
    eval_file(res / "cpu-e1" / "eval-teacher-cpu-e1.json", 47, 59, 76.5, 57, 70, artifact=str(dense))
    eval_file(res / "cpu-e1" / "eval-bundle-fast-cpu-0.5-x.json", 51, 61, 75.5, 58, 55, artifact=str(pruned))
    assert accuracy_rows.main(["--results", str(res)]) == 2
    assert "eval-teacher-cpu-e2-sn2.json" in capsys.readouterr().err
    eval_file(res / "cpu-e1" / "eval-teacher-cpu-e2-sn2.json", 52, 62.5, 75.8, 60, 55, artifact=str(dense))
    assert accuracy_rows.main(["--results", str(res)]) == 0
    acc = json.loads((res / "accuracy.json").read_text())
    assert acc["cpu-e1"]["teacher"] == "teacher-cpu-e2-sn2" and acc["current"]["teacher"] == "teacher-v3"
    rows = {r["name"]: r for r in acc["cpu-e1"]["rows"]}
    size = sum(f.stat().st_size for f in pruned.iterdir() if f.is_file())
    assert rows["bundle-fast-cpu-0.5-x"]["artifact_bytes"] == size > 0
    assert accuracy_tables.targets_group(acc) == "cpu-e1"
    assert accuracy_tables.targets_group({**acc, "cpu-e1": {"teacher": None, "rows": []}}) == "current"
    # where the artifacts are gone, the stored sizes stay
    assert accuracy_rows.main(["--results", str(res), "--stored-flops"]) == 0
    assert json.loads((res / "accuracy.json").read_text()) == acc
    assert accuracy_tables.main(["--accuracy", str(res / "accuracy.json")]) == 0
    out = capsys.readouterr().out
    assert "Teacher: `teacher-cpu-e2-sn2`." in out
    assert "| teacher best F1 | >= 62.00 | teacher-cpu-e2-sn2 | 62.50 | yes | - |" in out
    where = "bundle-fast-cpu-0.5-x (stored thr -3.00)"
    assert f"| bundle size on disk | <= 25 MB | {where} | {size / 1e6:.1f} MB | yes |" in out
    with pytest.raises(SystemExit):
        accuracy_tables.main(["--accuracy", str(tmp_path / "none.json")])
