"""bench.accuracy_tables: the targets table of #13 and which teacher each student is judged against (synthetic rows)."""

from __future__ import annotations

from bench import accuracy_tables
from tests.results_files import one_line


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
    assert one_line(lines, "| teacher best F1 | >= 62.00 | teacher-v3s | 62.50 | yes |")
    where = "l0-v3-0.52+400+v3s-fp16 (FLOPs 0.480, vs teacher-v3s)"
    two = [line for line in lines if "at >= 2x" in line]
    assert len(two) == 3 and all(f"| {where} | +0.50 | yes | - |" in line for line in two)


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
