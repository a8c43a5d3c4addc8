"""`python -m bench.accuracy_rows`: write bench/results/accuracy.json for the report from evaluated runs.

For every `bench/results/eval-NAME.json` (from `python -m engine.evaluate`), the row names the artifact's encoder
FLOPs against the dense teacher at 384 tokens, and the command that produced it. Two quoted reference rows are
added and labelled as quoted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.artifact import read_manifest
from engine.config import EncoderConfig
from engine.flops import encoder_flops

ROOT = Path(__file__).resolve().parent.parent
QUOTED = [
    {
        "name": "always no answer (floor)",
        "note": "5,945 of the 11,873 dev questions are unanswerable (official metric)",
        "quoted": {"exact": 50.07, "f1": 50.07, "HasAns_f1": 0.0, "NoAns_f1": 100.0, "flops": "-"},
    },
    {
        "name": "McCarley et al. 2019 (paper claim)",
        "note": "about 2x faster at under 1.5 F1 lost, BERT-large on NQ/SQuAD",
        "quoted": {"f1": "teacher - <1.5", "flops": "~0.5"},
    },
]


def _join_latency(rows: list[dict], teacher: str) -> None:
    """Add CPU medians from bench/results/students.json (bench/test_students.py): ms per shape, the speedup over the
    dense teacher on the same engine and over dense fp32 HF eager."""
    path = ROOT / "bench" / "results" / "students.json"
    if not path.is_file():
        return
    from bench.report import load_benchmarks

    ms = {(r["model"], f"{r['batch']}x{r['seq']}"): (r["median_ms"], r["provider"]) for r in load_benchmarks([path])}
    for row in rows:
        for shape in ("1x384", "8x384"):
            if (row["name"], shape) not in ms:
                continue
            t, provider = ms[(row["name"], shape)]
            row.setdefault("latency", {})[shape] = {"ms": t, "provider": provider}
            if (teacher, shape) in ms:
                row["latency"][shape]["speedup_vs_teacher"] = ms[(teacher, shape)][0] / t
            if ("hf-eager-dense", shape) in ms:
                row["latency"][shape]["speedup_vs_hf_eager"] = ms[("hf-eager-dense", shape)][0] / t
        if "8x384" in row.get("latency", {}):
            row["speedup"] = row["latency"]["8x384"].get("speedup_vs_teacher")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    rows = []
    evals = sorted((ROOT / "bench" / "results").glob("eval-*.json"))
    cfg_of = {p: EncoderConfig.from_dict(read_manifest(json.loads(p.read_text())["artifact"])["config"]) for p in evals}
    teachers = [p for p in evals if p.stem.startswith("eval-teacher")]
    if not teachers:
        print("error: no bench/results/eval-teacher*.json: evaluate the dense teacher first", file=sys.stderr)
        return 2
    teacher = min(teachers, key=lambda p: len(p.stem))  # the fp32 teacher, not its -int8 or -bfloat16 builds
    dense_flops = encoder_flops(cfg_of[teacher], 1, 384)
    for p in evals:
        name = p.stem.removeprefix("eval-")
        rows.append(
            {
                "name": name,
                "eval": str(p.relative_to(ROOT)),
                "artifact_flops": encoder_flops(cfg_of[p], 1, 384),
                "dense_flops": dense_flops,
                "command": f"scripts/reproduce_squad.sh (run {name}); python -m engine.evaluate ... --data dev",
            }
        )
    _join_latency(rows, teacher.stem.removeprefix("eval-"))
    (ROOT / "bench" / "results" / "accuracy.json").write_text(json.dumps(rows + QUOTED, indent=1) + "\n")
    print(f"{len(rows)} measured rows + {len(QUOTED)} quoted")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
