"""bench.report: the tables and ratios it derives from saved benchmark and evaluation JSON (synthetic inputs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import accuracy_rows, accuracy_tables, report


def _bench_file(path: Path, rows: list[dict]) -> None:
    """A pytest-benchmark JSON with the given (extra_info, median seconds) rows."""
    benchmarks = [{"extra_info": info, "stats": {"median": median}} for info, median in rows]
    path.write_text(json.dumps({"machine_info": {"cpu": {"brand_raw": "Test CPU"}}, "benchmarks": benchmarks}))


def _info(model: str, provider: str, batch: int, seq: int, flops: float, dense_flops: float, median: float) -> tuple:
    return (
        {
            "provider": provider,
            "model": model,
            "batch": batch,
            "seq": seq,
            "dtype": "float32",
            "threads": 2,
            "flops": flops,
            "dense_flops": dense_flops,
            "gflops_per_s": flops / median / 1e9,
            "gemm_peak_gflops": 500.0,
            "pct_of_peak": 100 * flops / median / 1e9 / 500.0,
        },
        median,
    )


def _eval_file(
    path: Path, f1: float, best_f1: float, has: float, f1_stored: float, has_stored: float, artifact: str = "unused"
) -> Path:
    """An engine.evaluate JSON with the given metrics at threshold 0 and at the stored threshold (-3.0)."""

    def at(f: float, h: float) -> dict:
        return {"exact": f - 5, "f1": f, "best_f1": best_f1, "HasAns_f1": h, "NoAns_f1": 2 * f - h}

    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"artifact": artifact, "at_zero": at(f1, has), "stored_threshold": -3.0}
    path.write_text(json.dumps({**body, "at_stored_threshold": at(f1_stored, has_stored)}))
    return path


def _row(res: Path, name: str, flops: float, speedup: float | None = None, sub: str = ".") -> dict:
    """An accuracy.json row of eval-NAME.json in `res/sub` at `flops` of the dense 8 GFLOP."""
    row = {"name": name, "eval": str(res / sub / f"eval-{name}.json"), "artifact_flops": flops * 8e9}
    row |= {"dense_flops": 8e9, "command": f"cmd {name}"}
    if speedup:
        row |= {"speedup": speedup, "latency": {"8x384": {"ms": 100 / speedup, "speedup_vs_teacher": speedup}}}
    return row


# name -> (F1 thr 0, best F1, HasAns F1 thr 0, F1 stored thr, HasAns F1 stored thr, FLOPs fraction, speedup)
CURRENT = {
    "teacher-v3": (60.0, 63.0, 76.0, 53.0, 70.0, 1.0, 1.0),
    "l0-v3-0.52": (59.5, 62.6, 75.1, 52.2, 69.0, 0.48, 2.1),  # loses 0.50 / 0.80 / 0.90: meets the 2x target
    "l0-v3-0.4": (59.9, 62.9, 75.9, 52.9, 69.9, 0.60, 1.6),  # better, but not 2x fewer FLOPs
    "l0-v3-0.5": (59.8, 62.8, 75.8, 52.8, 69.8, 0.502, 2.0),  # 1.99x fewer FLOPs: not >= 2x
    "nodistill-v3-0.52": (60.0, 63.0, 76.0, 53.0, 70.0, 0.45, 2.2),  # no loss, but a baseline, not a student
    "l0-v3-0.75": (57.0, 61.0, 70.0, 50.0, 64.0, 0.25, 3.8),  # loses 3.00 at >= 3.5x: misses the 2.5 target
}
# a weaker superseded teacher whose students would meet every target against it: the targets never look here
V2 = {
    "teacher-v2": (50.0, 58.0, 70.0, 48.0, 66.0, 1.0, 1.0),
    "l0-v2-0.52": (49.0, 57.0, 69.0, 47.0, 65.0, 0.48, 2.2),
    "random-v2-0.52": (45.0, 55.0, 60.0, 44.0, 58.0, 0.48, 2.2),
    "fast-v2-0.3": (50.0, 58.0, 70.0, 48.0, 66.0, 0.2, 4.5),
}
PREVIOUS = {
    "teacher-minilm": (40.0, 55.0, 66.0, 43.0, 62.0, 1.0, 1.0),
    "l0-0.5": (38.5, 54.0, 63.0, 42.0, 60.0, 0.5, 1.9),
}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    res = tmp_path / "results"
    res.mkdir()
    d, h = 8e9, 4e9  # dense and pruned FLOPs: a 2.0x FLOP reduction
    _bench_file(
        res / "cpu.json",
        [
            _info("minilm-dense", "engine-cpp", 8, 384, d, d, 0.200),
            _info("minilm-half", "engine-cpp", 8, 384, h, d, 0.125),  # realized 1.6x -> 0.80 of the FLOP reduction
            _info("minilm-half", "ort-fused", 8, 384, h, d, 0.150),
            _info("minilm-dense", "hf-eager", 8, 384, d, d, 0.800),
        ],
    )
    acc = {"quoted": [{"name": "always no answer (floor)", "note": "quoted", "quoted": {"f1": 50.07}}]}
    for group, sub, runs in (("current", ".", CURRENT), ("v2", "v2", V2), ("previous", "previous", PREVIOUS)):
        for name, (f1, best, has, f1s, hass, _, _) in runs.items():
            _eval_file(res / sub / f"eval-{name}.json", f1, best, has, f1s, hass)
        rows = [_row(res, n, v[5], v[6], sub) for n, v in runs.items()]
        acc[group] = {"folder": str(res / sub), "teacher": next(iter(runs)), "rows": rows}
    (res / "accuracy.json").write_text(json.dumps(acc))
    return res


def _line(lines: list[str], start: str) -> str:
    """The one line that starts with `start`."""
    found = [line for line in lines if line.startswith(start)]
    assert len(found) == 1, (start, found)
    return found[0]


def test_report_tables_and_ratios(results: Path, tmp_path: Path):
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    lines = text.splitlines()
    # realized 0.200/0.125 = 1.6x over a 2.0x FLOP reduction; 0.150/0.125 = 1.20x over ORT; 0.8/0.125 = 6.40x
    row = _line(lines, "| (8,384) | engine-cpp | 0.80")
    assert "1.20x" in row and "6.40x" in row
    assert (tmp_path / "latency_vs_flops.png").stat().st_size > 0
    assert (tmp_path / "f1_vs_speedup.png").stat().st_size > 0
    assert (
        "| pruned C++ engine vs ORT-fused | stretch >= 1.2x (must >= 1.0x) | minilm-half (8,384) | 1.20x | yes | - |"
        in lines
    )
    assert _line(lines, "| realized speedup ÷ FLOP reduction (C++ engine) | >= 0.95 | minilm-half vs dense ").endswith(
        "(8,384) | 0.80 (1.60x of 2.00x) | no | - |"
    )


def test_each_group_is_judged_against_its_own_teacher(results: Path, tmp_path: Path):
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    current, rest = text.split("## Teacher v2 (every train file, 2,200 steps of 32 windows on 2 CPU cores)")
    v2, previous = rest.split("## Previous teacher (MiniLM fine-tuned on 25k windows, 1,600 steps)")
    current = current.split("## Accuracy on the complete official SQuAD 2.0 dev set")[1]  # in GROUPS order
    assert "`l0-v3-T`" in current and "Superseded" not in current
    assert "Superseded" in v2 and "`bench/results/v2/`" in v2 and "`l0-v2-T`" in v2
    assert "Superseded" in previous and "`bench/results/previous/`" in previous
    previous = previous.split("\n## ")[0]  # up to the next section
    assert "teacher-v2" not in current and "teacher-minilm" not in current + v2
    assert "teacher-v3" not in v2 + previous and "teacher-v2" not in previous
    # accuracy table: EM | F1 thr 0 | F1 stored | best | HasAns thr 0 | HasAns stored | NoAns (2 F1 - HasAns) | FLOPs
    assert "| l0-v3-0.52 | 54.50 | 59.50 | 52.20 | 62.60 | 75.10 | 69.00 | 43.90 | 0.48 | 47.6 | 2.10x |" in current
    assert "| l0-v2-0.52 | 44.00 | 49.00 | 47.00 | 57.00 | 69.00 | 65.00 | 29.00 | 0.48 | 45.5 | 2.20x |" in v2
    assert "| l0-0.5 | 33.50 | 38.50 | 42.00 | 54.00 | 63.00 | 60.00 | 14.00 | 0.50 | 52.6 | 1.90x |" in previous
    # F1 lost (thr 0 | stored thr | best | HasAns): against teacher-v3 in the current group ...
    assert "| l0-v3-0.52 | teacher-v3 | 0.48 | 2.10x | +0.50 | +0.80 | +0.40 | +0.90 |" in current
    assert "| l0-v3-0.75 | teacher-v3 | 0.25 | 3.80x | +3.00 | +3.00 | +2.00 | +6.00 |" in current
    # ... against teacher-v2 in the v2 group (against teacher-v3 it would be +10.50) ...
    assert "| l0-v2-0.52 | teacher-v2 | 0.48 | 2.20x | +1.00 | +1.00 | +1.00 | +1.00 |" in v2
    assert "| fast-v2-0.3 | teacher-v2 | 0.20 | 4.50x | +0.00 | +0.00 | +0.00 | +0.00 |" in v2
    # ... and against teacher-minilm in the previous one (against teacher-v3 it would be +21.50)
    assert "| l0-0.5 | teacher-minilm | 0.50 | 1.90x | +1.50 | +1.00 | +1.00 | +3.00 |" in previous
    assert "F1 lost against the fp32 teacher `teacher-v3` or the later teacher" in current
    assert "F1 lost against the fp32 teacher `teacher-v2` or the later teacher" in v2
    assert "F1 lost against the fp32 teacher `teacher-minilm` or the later teacher" in previous

    def ablations(section: str) -> list[str]:
        return [line for line in section.splitlines() if line.startswith(("| distillation", "| L0 gates"))]

    # ablations: each group's own pairs, only where both runs exist
    assert ablations(current) == [
        "| distillation (same L0 gates, hard labels only) | l0-v3-0.52 | nodistill-v3-0.52 | -0.50 | -0.80 | "
        "-0.40 | -0.90 |"
    ]
    assert ablations(v2) == [
        "| L0 gates vs random heads/units | l0-v2-0.52 | random-v2-0.52 | +4.00 | +3.00 | +2.00 | +9.00 |"
    ]
    assert "nodistill-0.5" not in previous  # the previous group's pairs are absent from it: no ablation table
    assert "What distillation and L0 gates buy" not in previous


def test_accuracy_targets_met_and_not_met(results: Path, tmp_path: Path):
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    # judged on the current group only: teacher-v3, not the weaker teacher-v2 nor its loss-free fast-v2-0.3
    assert _line(lines, "| teacher HasAns F1 (thr 0) | >= 75.00 | teacher-v3 | 76.00 | yes |")
    assert _line(
        lines, "| teacher F1 at its stored threshold | >= 52.07 | teacher-v3 (stored thr -3.00) | 53.00 | yes |"
    )
    assert _line(lines, "| teacher best F1 | >= 62.00 | teacher-v3 | 63.00 | yes |")
    # the best student at <= 0.5 of the FLOPs: l0-v3-0.52 (l0-v3-0.5 is at 0.502, nodistill is a baseline)
    where = "| <= 1.00 (FLOPs fraction <= 0.5) | l0-v3-0.52 (FLOPs 0.480, 2.10x at (8,384)) |"
    assert _line(lines, "| F1 lost by the best student at >= 2x fewer FLOPs (thr 0) ").endswith(
        f"{where} +0.50 | yes | - |"
    )
    assert _line(lines, "| F1 lost by the best student at >= 2x fewer FLOPs (stored thr) ").endswith(
        f"{where} +0.80 | yes | - |"
    )
    assert _line(lines, "| F1 lost by the best student at >= 2x fewer FLOPs (HasAns F1, thr 0) ").endswith(
        f"{where} +0.90 | yes | - |"
    )
    assert _line(lines, "| F1 lost by the best student at >= 3.5x fewer FLOPs (thr 0) ").endswith(
        "| l0-v3-0.75 (FLOPs 0.250, 3.80x at (8,384)) | +3.00 (stored thr +3.00, HasAns +6.00) | no | - |"
    )
    assert not any("F1 lost at about 2x" in line for line in lines)  # the previous teacher's target is gone


def test_accuracy_targets_not_yet_measured():
    pts = lambda runs: [  # noqa: E731
        {
            "name": n,
            "f1": v[0],
            "best_f1": v[1],
            "HasAns_f1": v[2],
            "f1_stored": v[3],
            "HasAns_f1_stored": v[4],
            "flops": v[5],
            "speedup": v[6],
            "threshold": -3.0,
        }
        for n, v in runs.items()
    ]
    empty = accuracy_tables.accuracy_targets([], None)
    assert len(empty) == 11 and all("| not yet measured | - | - |" in line for line in empty)
    # a teacher below its targets, and no student at 2x or 3.5x yet
    weak = {
        "teacher-v3": (50.0, 61.9, 74.9, 52.0, 70.0, 1.0, None),
        "l0-v3-0.4": (49.0, 61.0, 74.0, 51.0, 69.0, 0.6, None),
    }
    lines = accuracy_tables.accuracy_targets(pts(weak), "teacher-v3")
    assert [line.split(" | ")[-2] for line in lines[:3]] == ["no", "no", "no"]
    assert "74.90" in lines[0] and "52.00" in lines[1] and "61.90" in lines[2]
    assert all("| no student of the group yet | not yet measured |" in line for line in lines[3:7])
    assert all("| the bundled default | not yet measured |" in line for line in lines[7:])
    # a student without a teacher row is not judged
    assert all("not yet measured" in line for line in accuracy_tables.accuracy_targets(pts(weak)[1:], "teacher-v3"))


def test_students_are_judged_against_their_own_teacher():
    def pt(name, f1, best, has, stored, flops):
        return {"name": name, "f1": f1, "best_f1": best, "HasAns_f1": has, "f1_stored": stored, "flops": flops,
                "HasAns_f1_stored": has, "speedup": None, "threshold": -3.0}  # fmt: skip

    points = [
        pt("teacher-v3", 50.0, 60.0, 74.0, 58.0, 1.0),
        pt("teacher-v3c", 49.0, 61.0, 77.0, 59.0, 1.0),
        pt("teacher-v3s", 52.0, 62.5, 76.0, 60.0, 1.0),
        pt("l0-v3-0.52", 48.0, 59.0, 72.0, 57.0, 0.48),  # loses 2.0 / 1.0 / 2.0 to teacher-v3
        pt("l0-v3-0.52+400+v3s-fp16", 51.5, 62.0, 75.5, 59.5, 0.48),  # loses 0.5 each to teacher-v3s
        pt("l0-v3-0.52+400+v3s+400+v3c", 48.0, 60.0, 76.0, 58.5, 0.48),  # the last round's teacher: v3c
        pt("l0-v3-0.52+v3x", 10.0, 10.0, 10.0, 10.0, 0.48),  # no teacher-v3x row: the group's teacher
    ]
    by = {p["name"]: p for p in points}
    own = lambda name: accuracy_tables.own_teacher(points, by[name], by["teacher-v3"])["name"]  # noqa: E731
    assert own("l0-v3-0.52") == "teacher-v3" and own("l0-v3-0.52+400+v3s-fp16") == "teacher-v3s"
    assert own("l0-v3-0.52+400+v3s+400+v3c") == "teacher-v3c" and own("l0-v3-0.52+v3x") == "teacher-v3"
    # a run named after its teacher: the longest teacher row between dashes, never a teacher row itself
    named = [pt("teacher-v3-sn2", 50.0, 60.0, 74.0, 58.0, 1.0)] + [
        pt(name, 1, 1, 1, 1, 0.5)
        for name in ("fast-0.5-teacher-v3c-kd1", "fast-0.5-of-teacher-v3-sn2-kd1", "bundle-fast-0.5-teacher-v3-sn2",
                     "fast-0.5-teacher-v3cx-kd1")
    ]  # fmt: skip
    by.update({p["name"]: p for p in named})
    points_named = points + named
    own_n = lambda name: accuracy_tables.own_teacher(points_named, by[name], by["teacher-v3"])["name"]  # noqa: E731
    assert own_n("fast-0.5-teacher-v3c-kd1") == "teacher-v3c" and own_n("teacher-v3-sn2") == "teacher-v3"
    assert own_n("fast-0.5-of-teacher-v3-sn2-kd1") == own_n("bundle-fast-0.5-teacher-v3-sn2") == "teacher-v3-sn2"
    assert own_n("fast-0.5-teacher-v3cx-kd1") == "teacher-v3"  # no teacher-v3cx row: the group's teacher
    table = accuracy_tables.f1_loss_table(points, "teacher-v3")
    assert "| l0-v3-0.52+400+v3s-fp16 | teacher-v3s | 0.48 | not measured | +0.50 | +0.50 | +0.50 | +0.50 |" in table
    assert "| teacher-v3s | teacher-v3 | 1.00 |" in table  # a later teacher is compared with the group's
    lines = accuracy_tables.accuracy_targets(points[:5], "teacher-v3")
    has_ans = [line for line in lines if line.startswith("| teacher HasAns F1")]
    assert [line.split(" | ")[2:5] for line in has_ans] == [
        ["teacher-v3", "74.00", "no"],
        ["teacher-v3c", "77.00", "yes"],
        ["teacher-v3s", "76.00", "yes"],
    ]
    assert _line(lines, "| teacher best F1 | >= 62.00 | teacher-v3s | 62.50 | yes |")
    where = "l0-v3-0.52+400+v3s-fp16 (FLOPs 0.480, vs teacher-v3s)"
    two = [line for line in lines if "at >= 2x" in line]
    assert len(two) == 3 and all(f"| {where} | +0.50 | yes | - |" in line for line in two)


def test_report_without_current_rows_says_so(results: Path, tmp_path: Path):
    acc = json.loads((results / "accuracy.json").read_text())
    acc["current"] = {"folder": str(results), "teacher": None, "rows": []}
    (results / "accuracy.json").write_text(json.dumps(acc))
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert "No current-teacher rows yet: evaluate `teacher-v3`" in text
    assert "| l0-0.5 | teacher-minilm | 0.50 | 1.90x | +1.50 |" in text
    assert "| l0-v2-0.52 | teacher-v2 | 0.48 | 2.20x | +1.00 |" in text
    assert sum("| not yet measured | - | - |" in line for line in text.splitlines()) == 11  # v2 rows are not judged
    assert (tmp_path / "f1_vs_speedup.png").stat().st_size > 0  # plotted from the v2 group


def test_report_without_accuracy_has_no_loss_table(results: Path, tmp_path: Path):
    (results / "accuracy.json").unlink()
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    assert "F1 lost against" not in out.read_text()
    assert not (tmp_path / "f1_vs_speedup.png").exists()


def test_report_refuses_the_old_one_teacher_format(results: Path, tmp_path: Path):
    (results / "accuracy.json").write_text(json.dumps([{"name": "x"}]))
    with pytest.raises(SystemExit, match="bench.accuracy_rows"):
        report.main(["--results", str(results), "--out", str(tmp_path / "RESULTS.md")])


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
    _eval_file(res / "eval-teacher-v3.json", 60, 63, 76, 53, 70, artifact=str(dense))
    _eval_file(res / "eval-teacher-v3-int8.json", 60, 63, 76, 53, 70, artifact=str(dense))
    _eval_file(res / "eval-l0-v3-0.52.json", 59, 62, 75, 52, 69, artifact=str(pruned))
    # previous group: artifacts gone; FLOPs from the old flat (one-teacher) accuracy.json, latency from its own file
    _eval_file(res / "previous" / "eval-teacher-minilm.json", 40, 55, 66, 43, 62, artifact=str(tmp_path / "gone-t"))
    _eval_file(res / "previous" / "eval-l0-0.5.json", 38, 54, 63, 42, 60, artifact=str(tmp_path / "gone-s"))
    old = [
        {"name": "teacher-minilm", "artifact_flops": 900, "dense_flops": 900},
        {"name": "l0-0.5", "artifact_flops": 450, "dense_flops": 900},
        {"name": "floor", "quoted": {}},
    ]
    (res / "accuracy.json").write_text(json.dumps(old))
    _bench_file(
        res / "previous" / "students.json",
        [
            ({"provider": "engine-cpp", "model": m, "batch": 8, "seq": 384}, t)
            for m, t in (("teacher-minilm", 0.2), ("l0-0.5", 0.08), ("hf-eager-dense", 0.8))
        ],
    )
    _bench_file(
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
    _eval_file(res / "eval-l0-v3-0.75.json", 50, 60, 70, 50, 60, artifact=str(tmp_path / "gone-new"))
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
    _eval_file(res / "eval-teacher-v3.json", 60, 63, 76, 53, 70, artifact=str(dense))
    _eval_file(res / "eval-l0-v3-0.52.json", 59, 62, 75, 52, 69, artifact=str(pruned))
    full = encoder_flops(load_artifact(dense).cfg, 1, 384)

    def timed(stand_in_flops: float) -> dict:
        rows = [({"provider": "engine-cpp", "model": "l0-v3-0.52", "batch": 8, "seq": 384}, 0.08)]
        for batch, median in ((1, 0.03), (8, 0.2)):
            info = {"provider": "engine-cpp", "model": DENSE_ENGINE_MODEL, "batch": batch, "seq": 384}
            rows.append(({**info, "flops": stand_in_flops * batch}, median))
        _bench_file(res / "students.json", rows)
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
    _eval_file(res / "eval-teacher-v3.json", 60, 63, 76, 53, 70, artifact=str(dense))
    _eval_file(res / "eval-l0-v3-0.52.json", 59, 62, 75, 52, 69, artifact=str(pruned))
    _eval_file(res / "v2" / "eval-teacher-v2.json", 50, 58, 70, 48, 66, artifact=str(tmp_path / "gone-t"))
    _eval_file(res / "v2" / "eval-l0-v2-0.52.json", 49, 57, 69, 47, 65, artifact=str(tmp_path / "gone-s"))
    _eval_file(res / "previous" / "eval-teacher-minilm.json", 40, 55, 66, 43, 62, artifact=str(tmp_path / "gone-m"))
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


def test_plots_come_from_the_newest_group_with_speedups(results: Path, tmp_path: Path, monkeypatch):
    seen = []
    monkeypatch.setattr(report, "plots", lambda rows, points, outdir, teacher=None: seen.append(teacher) or [])
    acc = json.loads((results / "accuracy.json").read_text())
    for drop in ("current", "v2"):
        assert report.main(["--results", str(results), "--out", str(tmp_path / "RESULTS.md")]) == 0
        acc[drop]["rows"] = []
        (results / "accuracy.json").write_text(json.dumps(acc))
    assert report.main(["--results", str(results), "--out", str(tmp_path / "RESULTS.md")]) == 0
    assert seen == ["teacher-v3", "teacher-v2", "teacher-minilm"]


def test_accuracy_rows_empty_current_group_and_missing_teacher(tmp_path: Path, capsys):
    res = tmp_path / "results"
    _eval_file(res / "previous" / "eval-teacher-minilm.json", 40, 55, 66, 43, 62, artifact=str(tmp_path / "gone"))
    (res / "accuracy.json").write_text(
        json.dumps({"previous": {"rows": [{"name": "teacher-minilm", "artifact_flops": 9, "dense_flops": 9}]}})
    )
    assert accuracy_rows.main(["--results", str(res)]) == 0
    acc = json.loads((res / "accuracy.json").read_text())
    assert acc["current"]["rows"] == [] and acc["current"]["teacher"] is None
    assert [r["name"] for r in acc["previous"]["rows"]] == ["teacher-minilm"]
    _eval_file(res / "eval-l0-v2-0.5.json", 50, 60, 70, 50, 60, artifact=str(tmp_path / "gone"))
    assert accuracy_rows.main(["--results", str(res)]) == 2
    assert "no eval-teacher*.json" in capsys.readouterr().err


def test_workload_table_compares_with_the_hf_pipeline(tmp_path: Path):
    def info(provider, model, batch, questions, qps):
        return {
            "extra_info": {
                "provider": provider,
                "backend": "cpp" if provider == "engine" else "transformers-sdpa",
                "model": model,
                "batch": batch,
                "questions": questions,
                "questions_per_s": qps,
                "p50_ms": 10.0,
                "p99_ms": 30.0,
                "latency_unit": "per question",
            }
        }

    path = tmp_path / "workload-full.json"
    path.write_text(
        json.dumps(
            {
                "benchmarks": [
                    info("hf-pipeline", "m", 1, 11873, 20.0),
                    info("engine", "m", 1, 11873, 90.0),
                    info("engine", "m", 32, 11873, 100.0),
                    info("engine", "m", 1, 400, 70.0),
                ]
            }
        )
    )
    lines = report.workload_table([path]).splitlines()
    assert lines[2].startswith("| 11873 | m | 1 | engine | cpp | 90.0 | 4.50x |")  # full run first, HF ratio
    assert "| 11873 | m | 32 | engine | cpp | 100.0 | - |" in lines[4]  # no HF row at batch 32: no ratio
    assert lines[-1].startswith("| 400 | m | 1 | engine | cpp | 70.0 | - |")  # other question counts are not compared


def test_gpu_section_names_the_card_or_says_why_not(tmp_path: Path):
    assert "No GPU figures" in report.gpu_section(tmp_path / "gpu.json")
    (tmp_path / "gpu.json").write_text(
        json.dumps(
            {
                "status": "measured on NVIDIA H100",
                "machine": {"device": "NVIDIA H100 80GB HBM3", "bf16_gemm_peak_tflops": 700},
                "errors": [],
                "rows": [
                    {
                        "model": "ragged",
                        "dtype": "bfloat16",
                        "shape": "1x128",
                        "provider": "triton",
                        "ms": 0.5,
                        "tflops": 12.3,
                        "pct_peak": 1.8,
                        "speedup_vs_hf_sdpa": 3.0,
                        "speedup_vs_dense": 1.9,
                    }
                ],
            }
        )
    )
    text = report.gpu_section(tmp_path / "gpu.json")
    assert (
        "NVIDIA H100 80GB HBM3" in text
        and "| ragged | bfloat16 | 1x128 | triton | 0.500 | 12.3 | 2% | 3.00x | 1.90x |" in text
    )


def test_ablation_table_subtracts_the_baseline_at_the_same_budget():
    pts = [
        {"name": "l0-0.5", "f1": 36.0, "f1_stored": 44.0, "best_f1": 54.0, "HasAns_f1": 62.0},
        {"name": "nodistill-0.5", "f1": 35.0, "f1_stored": 41.5, "best_f1": 52.5, "HasAns_f1": 57.0},
        {"name": "importance-0.5-ft1000", "f1": 30.0, "f1_stored": 40.0, "best_f1": 50.0, "HasAns_f1": 40.0},
    ]  # its L0 pair is absent
    pairs = accuracy_tables.GROUP["previous"].ablations
    lines = accuracy_tables.ablation_table(pts, pairs).splitlines()
    assert len(lines) == 3 and "| l0-0.5 | nodistill-0.5 | +1.00 | +2.50 | +1.50 | +5.00 |" in lines[2]
    assert accuracy_tables.ablation_table(pts[1:], pairs) == ""
    assert accuracy_tables.ablation_table(pts, accuracy_tables.GROUP["current"].ablations) == ""


def test_distill_curve_from_the_metrics_beside_the_eval(tmp_path: Path):
    """A prune_fast run's held-out step curve (metrics-NAME.json beside eval-NAME.json) becomes its own table, with
    the best-F1 change from point to point; a row without one gets none."""
    ev = tmp_path / "eval-fast-cpu-0.75-x.json"
    ev.write_text("{}")
    assert accuracy_tables.distill_curve(ev) == []
    row = {"f1": 50.0, "best_f1": 55.5, "HasAns_f1_at_zero": 60.25, "auc": 0.7}
    curve = [{"step": 256, **row}, {"step": 512, **row, "best_f1": 56.0, "auc": None}]
    metrics = {"stages": {"distill": {"steps": 512, "curve": curve}}}
    (tmp_path / "metrics-fast-cpu-0.75-x.json").write_text(json.dumps(metrics))
    assert accuracy_tables.distill_curve(ev) == curve
    pts = [{"name": "fast-cpu-0.75-x", "curve": curve}, {"name": "other", "curve": []}]
    lines = accuracy_tables.curve_tables(pts).strip().splitlines()
    assert "`fast-cpu-0.75-x`" in lines[0] and "other" not in "".join(lines)
    assert lines[-2:] == [
        "| 256 | 50.00 | 55.50 | 60.25 | 0.700 |  |",
        "| 512 | 50.00 | 56.00 | 60.25 | not measured | +0.50 |",
    ]
    assert accuracy_tables.curve_tables(pts[1:]) == ""


def test_repeated_cpu_runs_are_listed_beside_the_recorded_one(results: Path, tmp_path: Path):
    d, h = 8e9, 4e9
    _bench_file(
        results / "cpu-repeat-1.json",
        [
            _info("minilm-dense", "engine-cpp", 8, 384, d, d, 0.190),
            _info("minilm-half", "engine-cpp", 8, 384, h, d, 0.100),  # 1.9x of 2.0x -> 0.95; ORT 0.150/0.100
            _info("minilm-half", "ort-fused", 8, 384, h, d, 0.150),
        ],
    )
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert any(line.endswith("| 0.80 (1.60x of 2.00x) | no | 0.95 |") for line in lines)  # recorded run decides
    assert any(line.endswith("| 1.20x | yes | 1.50x |") for line in lines)
    # the repeat's rows are not mixed into the latency tables
    assert sum(line.startswith("| (8,384) | engine-cpp | 0.80") for line in lines) == 1


def test_suite_sections_come_from_the_committed_results(tmp_path: Path):
    """Each suite with a committed JSON file gets its section, and the table cells are that file's numbers."""
    committed = report.RESULTS
    for name in ("train.json", "serve.json", "batch_qa.json", "coexist.json", "tokenizer.json"):
        if not (committed / name).is_file():
            pytest.skip(f"bench/results/{name} is not committed")
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(committed), "--out", str(out)]) == 0
    text = out.read_text()
    for title in ("Training throughput", "HTTP serving", "Offline batch QA", "beside PyTorch", "byte-level BPE"):
        assert f"## {title}" in text or title in text, title
    for b in json.loads((committed / "train.json").read_text())["benchmarks"]:
        i = b["extra_info"]
        precision = i.get("precision", "bf16" if i["provider"] == "ours-bf16" else "fp32")
        assert f"| {i['provider']} | {precision} | {i['windows_per_s']:.2f} | {i['vs_hf_padded']:.2f}x |" in text
    serve = json.loads((committed / "serve.json").read_text())
    for r in serve["rows"]:
        assert f"| {r['server']} | {r['clients']} | {r['qps']:.1f} | {r['p50_ms']:.0f} |" in text
    tok = json.loads((committed / "tokenizer.json").read_text())["benchmarks"][0]["extra_info"]
    assert f"{tok['speed_vs_hf']:.2f}x" in text


def _pt(name: str, f1: float, best: float, has: float, stored: float, flops: float, size: int | None = None) -> dict:
    return {"name": name, "f1": f1, "best_f1": best, "HasAns_f1": has, "f1_stored": stored, "flops": flops,
            "HasAns_f1_stored": has - 20, "speedup": None, "threshold": -3.0, "bytes": size}  # fmt: skip


def test_teacher_rows_with_hyphens_and_not_their_builds():
    row = accuracy_tables._TEACHER_ROW.fullmatch
    assert row("teacher-v3c") and row("teacher-cpu-e1-sn2") and row("teacher-minilm")
    assert not any(map(row, ("teacher-v3-fp16", "teacher-minilm-int8", "teacher-cpu-e1-bfloat16", "l0-v3-0.52")))
    points = [
        _pt("teacher-cpu-e1-sn2", 52.0, 62.5, 75.5, 60.0, 1.0),
        _pt("teacher-cpu-e1", 47.0, 59.0, 76.5, 57.0, 1.0),
        _pt("teacher-cpu-e1-sn2-int8", 51.0, 62.0, 75.0, 59.0, 1.0),
    ]
    lines = accuracy_tables.accuracy_targets(points, "teacher-cpu-e1-sn2")
    has_ans = [line.split(" | ")[2] for line in lines if line.startswith("| teacher HasAns F1")]
    assert has_ans == ["teacher-cpu-e1-sn2", "teacher-cpu-e1"]  # a later fp32 teacher row, not the int8 build


def test_bundle_targets_judge_the_best_candidate():
    mb = 1_000_000
    points = [
        _pt("teacher-cpu-e1-sn2", 52.0, 62.5, 76.0, 60.0, 1.0),
        _pt("fast-cpu-0.5-x", 51.8, 62.3, 75.4, 59.8, 0.5),  # a student, not a bundle candidate
        _pt("bundle-fast-cpu-0.4-x", 52.0, 62.4, 75.9, 59.9, 0.6, 20 * mb),  # best F1s, but 1.7x: judged, fails
        _pt("bundle-fast-cpu-0.5-x", 51.7, 62.2, 75.2, 59.7, 0.5, 26 * mb),  # the margin is smaller: not judged
    ]
    lines = accuracy_tables.accuracy_targets(points, "teacher-cpu-e1-sn2")[-4:]
    assert [line.split(" | ")[2:5] for line in lines] == [
        ["bundle-fast-cpu-0.4-x (stored thr -3.00)", "75.90", "yes"],
        ["bundle-fast-cpu-0.4-x (stored thr -3.00)", "59.90", "yes"],
        ["bundle-fast-cpu-0.4-x (stored thr -3.00)", "20.0 MB", "yes"],
        ["bundle-fast-cpu-0.4-x (stored thr -3.00)", "0.600", "no"],
    ]
    points[2] = _pt("bundle-fast-cpu-0.4-x", 52.0, 62.4, 74.9, 59.9, 0.6, 20 * mb)  # now below 75: the other one
    lines = accuracy_tables.accuracy_targets(points, "teacher-cpu-e1-sn2")[-4:]
    assert [line.split(" | ")[3:5] for line in lines] == [
        ["75.20", "yes"],
        ["59.70", "yes"],
        ["26.0 MB", "no"],
        ["0.500", "yes"],
    ]
    # the shipped default counts as a candidate; a size never measured is "not yet measured"
    lines = accuracy_tables.bundle_targets([_pt(accuracy_tables.BUNDLED, 45.5, 58.0, 72.1, 57.5, 0.47)])
    assert "72.10 | no |" in lines[0] and "57.50 | yes |" in lines[1] and "not yet measured" in lines[2]


def test_the_shipped_default_is_judged_whichever_group_the_targets_move_to():
    """When a newer teacher's group takes the targets, the bundle rows still judge the shipped default (it lives in
    the group of the teacher it came from), even where a bundle-* row of the new group would do better: the targets
    are the bundled default's own; it is never a student."""
    shipped = _pt(accuracy_tables.BUNDLED, 45.5, 58.0, 72.1, 57.5, 0.48, 23 * 1_000_000)
    groups = {"current": [_pt("teacher-v3s", 50.0, 59.9, 75.6, 58.5, 1.0), shipped], "cpu-e1": []}
    assert accuracy_tables.shipped_rows(groups) == [shipped]
    new = [_pt("teacher-cpu-e1-sn2", 52.1, 62.1, 75.2, 58.1, 1.0)]
    lines = accuracy_tables.accuracy_targets(new, "teacher-cpu-e1-sn2", accuracy_tables.shipped_rows(groups))
    assert all("| no student of the group yet | not yet measured |" in line for line in lines[3:7])
    assert [line.split(" | ")[2:5] for line in lines[-4:]] == [
        [f"{accuracy_tables.BUNDLED} (stored thr -3.00)", "72.10", "no"],
        [f"{accuracy_tables.BUNDLED} (stored thr -3.00)", "57.50", "yes"],
        [f"{accuracy_tables.BUNDLED} (stored thr -3.00)", "23.0 MB", "yes"],
        [f"{accuracy_tables.BUNDLED} (stored thr -3.00)", "0.480", "yes"],
    ]
    new.append(_pt("bundle-fast-cpu-0.5-x", 51.9, 61.8, 75.1, 57.9, 0.5, 20 * 1_000_000))
    lines = accuracy_tables.accuracy_targets(new, "teacher-cpu-e1-sn2", accuracy_tables.shipped_rows(groups))
    assert all(accuracy_tables.BUNDLED in line for line in lines[-4:]) and "72.10 | no |" in lines[-4]
    lines = accuracy_tables.accuracy_targets(new, "teacher-cpu-e1-sn2")  # nothing shipped: the best candidate
    assert all("bundle-fast-cpu-0.5-x" in line and "| yes | - |" in line for line in lines[-4:])


def test_named_group_teacher_and_artifact_bytes(two_artifacts, tmp_path: Path, capsys):
    """The cpu-e1 group names its teacher (teacher-cpu-e2-sn2, not the shorter teacher-cpu-e1); artifact sizes are
    measured where the artifact is and kept from accuracy.json where it is gone; targets are judged on the newest
    group with a teacher."""
    dense, pruned = two_artifacts
    res = tmp_path / "results"
    _eval_file(res / "eval-teacher-v3.json", 60, 63, 76, 53, 70, artifact=str(dense))
    _eval_file(res / "cpu-e1" / "eval-teacher-cpu-e1.json", 47, 59, 76.5, 57, 70, artifact=str(dense))
    _eval_file(res / "cpu-e1" / "eval-bundle-fast-cpu-0.5-x.json", 51, 61, 75.5, 58, 55, artifact=str(pruned))
    assert accuracy_rows.main(["--results", str(res)]) == 2
    assert "eval-teacher-cpu-e2-sn2.json" in capsys.readouterr().err
    _eval_file(res / "cpu-e1" / "eval-teacher-cpu-e2-sn2.json", 52, 62.5, 75.8, 60, 55, artifact=str(dense))
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
