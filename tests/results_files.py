"""Synthetic result files for the tests of bench.report and bench.accuracy_rows: pytest-benchmark JSON,
engine.evaluate JSON and accuracy.json rows."""

from __future__ import annotations

import json
from pathlib import Path


def bench_file(path: Path, rows: list[dict]) -> None:
    """A pytest-benchmark JSON with the given (extra_info, median seconds) rows."""
    benchmarks = [{"extra_info": info, "stats": {"median": median}} for info, median in rows]
    path.write_text(json.dumps({"machine_info": {"cpu": {"brand_raw": "Test CPU"}}, "benchmarks": benchmarks}))


def bench_info(
    model: str, provider: str, batch: int, seq: int, flops: float, dense_flops: float, median: float
) -> tuple:
    """A bench_file row: extra_info of one engine benchmark at (batch, seq), and its median seconds."""
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


def eval_file(
    path: Path, f1: float, best_f1: float, has: float, f1_stored: float, has_stored: float, artifact: str = "unused"
) -> Path:
    """An engine.evaluate JSON with the given metrics at threshold 0 and at the stored threshold (-3.0)."""

    def at(f: float, h: float) -> dict:
        return {"exact": f - 5, "f1": f, "best_f1": best_f1, "HasAns_f1": h, "NoAns_f1": 2 * f - h}

    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"artifact": artifact, "at_zero": at(f1, has), "stored_threshold": -3.0}
    path.write_text(json.dumps({**body, "at_stored_threshold": at(f1_stored, has_stored)}))
    return path


def accuracy_row(res: Path, name: str, flops: float, speedup: float | None = None, sub: str = ".") -> dict:
    """An accuracy.json row of eval-NAME.json in `res/sub` at `flops` of the dense 8 GFLOP."""
    row = {"name": name, "eval": str(res / sub / f"eval-{name}.json"), "artifact_flops": flops * 8e9}
    row |= {"dense_flops": 8e9, "command": f"cmd {name}"}
    if speedup:
        row |= {"speedup": speedup, "latency": {"8x384": {"ms": 100 / speedup, "speedup_vs_teacher": speedup}}}
    return row


def one_line(lines: list[str], start: str) -> str:
    """The one line that starts with `start`."""
    found = [line for line in lines if line.startswith(start)]
    assert len(found) == 1, (start, found)
    return found[0]
