"""`python -m bench.accuracy_rows`: write bench/results/accuracy.json for the report from evaluated runs.

Five groups (bench.accuracy_groups.GROUPS), each with its own dense teacher (the one the group names, else its
`eval-teacher*.json` with the shortest name, i.e. the fp32 build):
  cpu-e1    bench/results/cpu-e1/eval-NAME.json     teacher-cpu-e2-sn2 and its students (scripts/cpu_session.sh)
  current   bench/results/eval-NAME.json            the current teacher (teacher-v3) and its students
  cpu       bench/results/cpu/eval-NAME.json        teacher-cpu (one CPU session) and post-training runs from it
  v2        bench/results/v2/eval-NAME.json         the superseded teacher-v2 and its students
  previous  bench/results/previous/eval-NAME.json   the superseded MiniLM teacher (teacher-minilm) and its students
Every `eval-NAME.json` (from `python -m engine.evaluate`) becomes a row naming the artifact's encoder FLOPs at 384
tokens, its group teacher's, and the command that produced it; CPU medians come from the `students.json` in the same
folder (`make bench-students` writes bench/results/students.json for the current group; bench/test_students.py
with SPARSEQA_STUDENTS_DIR set, another group's). FLOPs are read from the
artifact's manifest when the artifact is on this machine, else kept from the existing accuracy.json (the row of the
same group and name, else the only row of that name in any group: eval files moved to another group's folder keep
their FLOPs), so the file can be regenerated where the artifacts are gone. Two quoted reference rows are added and
labelled as quoted.

Output (`--out`, default RESULTS/accuracy.json):
  {"cpu-e1":   {"folder": "bench/results/cpu-e1", "teacher": "teacher-cpu-e2-sn2" | null, "rows": [ROW, ...]},
   "current":  {"folder": "bench/results", "teacher": "teacher-v3" | null, "rows": [ROW, ...]},
   "cpu":      {"folder": "bench/results/cpu", "teacher": "teacher-cpu" | null, "rows": [ROW, ...]},
   "v2":       {"folder": "bench/results/v2", "teacher": "teacher-v2" | null, "rows": [ROW, ...]},
   "previous": {"folder": "bench/results/previous", "teacher": "teacher-minilm" | null, "rows": [ROW, ...]},
   "quoted":   [{"name", "note", "quoted": {"exact", "f1", "f1_stored", "HasAns_f1", "NoAns_f1", "flops", ...}}]}
  Older files (a flat list = one teacher, read as "previous"; or only "current" and "previous") are still read.
  ROW = {"name", "eval": path (relative to the repository root when inside it), "artifact_flops", "dense_flops",
         "artifact_bytes" (the artifact's size on disk, when it was ever measured here),
         "command", "latency": {"1x384"|"8x384": {"ms", "provider", "speedup_vs_teacher", "speedup_vs_hf_eager",
         "stand_in" (the teacher row, timed as DENSE_ENGINE_MODEL)}} (optional),
         "speedup": the (8,384) speedup over the group teacher (optional)}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.accuracy_groups import GROUP, GROUPS
from engine.config import EncoderConfig
from engine.flops import encoder_flops
from engine.manifest import read_manifest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
QUOTED = [
    {
        "name": "always no answer (floor)",
        "note": "5,945 of the 11,873 dev questions are unanswerable (official metric)",
        "quoted": {
            "exact": 50.07,
            "f1": 50.07,
            "f1_stored": 50.07,
            "HasAns_f1": 0.0,
            "HasAns_f1_stored": 0.0,
            "NoAns_f1": 100.0,
            "flops": "-",
        },
    },
    {
        "name": "McCarley et al. 2019 (paper claim)",
        "note": "about 2x faster at under 1.5 F1 lost, BERT-large on NQ/SQuAD",
        "quoted": {"f1": "teacher - <1.5", "flops": "~0.5"},
    },
]


class RowsError(ValueError):
    """An eval file that cannot become a row; the message names the fix."""


def _rel(p: Path) -> str:
    """`p` relative to the repository root when inside it, else absolute."""
    p = p.resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def stored_rows(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """{(group, name): row} of an existing accuracy.json (any of its groups); the old flat list (one teacher) counts as
    'previous'."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if isinstance(data, list):
        return {("previous", r["name"]): r for r in data if "quoted" not in r}
    return {(g, r["name"]): r for g, v in data.items() if isinstance(v, dict) for r in v["rows"]}


def stored_row(stored: dict[tuple[str, str], dict[str, Any]], group: str, name: str) -> dict[str, Any] | None:
    """The stored row of `name` in `group`, else the only stored row of that name in any group (its eval file moved
    to another group's folder), else None."""
    if (group, name) in stored:
        return stored[(group, name)]
    same = [r for (_, n), r in stored.items() if n == name]
    return same[0] if len(same) == 1 else None


def _artifact(eval_path: Path) -> Path:
    """The artifact directory an eval file scored (a relative path is the repository's)."""
    art = Path(json.loads(eval_path.read_text())["artifact"])
    return art if art.is_absolute() else ROOT / art


def artifact_flops(eval_path: Path, stored: dict[str, Any] | None, use_artifacts: bool = True) -> int:
    """Encoder FLOPs of one (1,384) forward of the artifact an eval file scored: from its manifest when present,
    else from the stored row."""
    art = _artifact(eval_path)
    if use_artifacts and (art / "engine.json").is_file():
        return encoder_flops(EncoderConfig.from_dict(read_manifest(art)["config"]), 1, 384)
    if stored is None:
        raise RowsError(
            f"{eval_path}: its artifact {art} is not on this machine and accuracy.json has no row for it; "
            "rebuild the artifact (scripts/reproduce_squad.sh eval NAME) or run where it exists"
        )
    return int(stored["artifact_flops"])


def artifact_bytes(eval_path: Path, stored: dict[str, Any] | None, use_artifacts: bool = True) -> int | None:
    """Bytes on disk of the artifact an eval file scored (every file of its folder): measured when it is on this
    machine, else the stored row's, else None."""
    art = _artifact(eval_path)
    if use_artifacts and (art / "engine.json").is_file():
        return sum(f.stat().st_size for f in art.iterdir() if f.is_file())
    return stored.get("artifact_bytes") if stored else None


def _join_latency(rows: list[dict[str, Any]], path: Path, teacher: str) -> None:
    """Add CPU medians from a bench/test_students.py file: ms per shape, the speedup over the group's dense teacher on
    the same engine and over dense fp32 HF eager. A teacher whose artifact was not timed (it was built on another
    machine) is timed through its stand-in, the dense MiniLM on the same engine in the same file
    (`DENSE_ENGINE_MODEL`), when that has exactly the teacher's encoder FLOPs; its latency entry then says so."""
    if not path.is_file():
        return
    from bench.common import DENSE_ENGINE_MODEL
    from bench.report import load_benchmarks

    bench = load_benchmarks([path])
    ms = {(r["model"], f"{r['batch']}x{r['seq']}"): (r["median_ms"], r["provider"]) for r in bench}
    t_row = next((r for r in rows if r["name"] == teacher), None)
    stand_in_flops = {
        r["flops"] for r in bench if r["model"] == DENSE_ENGINE_MODEL and (r["batch"], r["seq"]) == (1, 384)
    }
    stand_in = t_row is not None and stand_in_flops == {t_row["artifact_flops"]}
    for shape in ("1x384", "8x384"):
        if (teacher, shape) not in ms and stand_in and (DENSE_ENGINE_MODEL, shape) in ms:
            ms[(teacher, shape)] = ms[(DENSE_ENGINE_MODEL, shape)]
            t_row.setdefault("latency", {})[shape] = {"stand_in": DENSE_ENGINE_MODEL}
    for row in rows:
        for shape in ("1x384", "8x384"):
            if (row["name"], shape) not in ms:
                continue
            t, provider = ms[(row["name"], shape)]
            row.setdefault("latency", {}).setdefault(shape, {}).update(ms=t, provider=provider)
            if (teacher, shape) in ms:
                row["latency"][shape]["speedup_vs_teacher"] = ms[(teacher, shape)][0] / t
            if ("hf-eager-dense", shape) in ms:
                row["latency"][shape]["speedup_vs_hf_eager"] = ms[("hf-eager-dense", shape)][0] / t
        if "8x384" in row.get("latency", {}):
            row["speedup"] = row["latency"]["8x384"].get("speedup_vs_teacher")


def group_rows(
    group: str, folder: Path, stored: dict[tuple[str, str], dict[str, Any]], use_artifacts: bool = True
) -> dict[str, Any]:
    """{"folder", "teacher", "rows"} of one folder of eval-*.json files; an empty folder gives no teacher, no rows."""
    evals = sorted(folder.glob("eval-*.json"))
    out: dict[str, Any] = {"folder": _rel(folder), "teacher": None, "rows": []}
    if not evals:
        return out
    teachers = [p for p in evals if p.stem.startswith("eval-teacher")]
    named = GROUP[group].teacher if group in GROUP else None
    if named:
        teachers = [p for p in teachers if p.stem == f"eval-{named}"]
        if not teachers:
            raise RowsError(f"{folder} has eval files but not the group teacher's eval-{named}.json: evaluate it first")
    if not teachers:
        raise RowsError(f"{folder} has eval files but no eval-teacher*.json: evaluate the group's dense teacher first")
    teacher = min(teachers, key=lambda p: len(p.stem))  # the fp32 teacher, not its -int8 or -bfloat16 builds
    name_of = {p: p.stem.removeprefix("eval-") for p in evals}
    stored_of = {p: stored_row(stored, group, name_of[p]) for p in evals}
    flops = {p: artifact_flops(p, stored_of[p], use_artifacts) for p in evals}
    for p in evals:
        row = {
            "name": name_of[p],
            "eval": _rel(p),
            "artifact_flops": flops[p],
            "dense_flops": flops[teacher],
            "command": f"scripts/reproduce_squad.sh (run {name_of[p]}); python -m engine.evaluate ... --data dev",
        }
        size = artifact_bytes(p, stored_of[p], use_artifacts)
        out["rows"].append(row if size is None else {**row, "artifact_bytes": size})
    out["teacher"] = name_of[teacher]
    _join_latency(out["rows"], folder / "students.json", name_of[teacher])
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m bench.accuracy_rows", description=__doc__.split("\n\n")[0])
    folders = ", ".join(f"{g.folder}/eval-*.json" for g in GROUPS)
    ap.add_argument("--results", type=Path, default=RESULTS, help=f"folder of {folders}")
    ap.add_argument("--out", type=Path, help="default: RESULTS/accuracy.json (its rows also supply missing FLOPs)")
    ap.add_argument(
        "--stored-flops", action="store_true", help="never read artifacts: FLOPs of every row from the existing --out"
    )
    a = ap.parse_args(argv)
    out = a.out or a.results / "accuracy.json"
    stored = stored_rows(out)
    try:
        groups = {
            g.name: group_rows(g.name, (a.results / g.folder).resolve(), stored, not a.stored_flops) for g in GROUPS
        }
    except RowsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not any(g["rows"] for g in groups.values()):
        where = ", ".join(str(a.results / g.folder) for g in GROUPS)
        print(f"error: no eval-*.json in any of {where}: run engine.evaluate first", file=sys.stderr)
        return 2
    out.write_text(json.dumps({**groups, "quoted": QUOTED}, indent=1) + "\n")
    counts = ", ".join(f"{g}: {len(v['rows'])} rows (teacher {v['teacher']})" for g, v in groups.items())
    print(f"wrote {out}: {counts}, {len(QUOTED)} quoted")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
