"""`python -m engine.latency`: a per-layer latency lookup table measured on the engine the user will run.

    python -m engine.latency --model DIR --shape 8,384 [--backend cpp] [--threads 2] [--dtype float32] [--out T.json]
    python -m engine.latency --model DENSE --check PRUNED --shape 8,384     # measured speedup of a pruned model

The table (`engine.latency_table`: per-layer piecewise-linear costs of heads and FFN units, a base and a scale) is
fitted here to points measured on the real engine by `engine.latency_timer` (an artifact written with random weights
of that ragged shape, run through `engine.runtime`'s backend): layer l at (h, 0) or (0, f), every other layer empty,
minus `base`, the model with every head and unit removed. `scale` calibrates the sum of isolated layer costs to
measured full models (dense, and every layer at 3/4, 1/2 and 1/4: the mean ratio).

Tables are cached as JSON under `$SPARSEQA_CACHE/latency` (default `~/.cache/sparseqa/latency`), keyed by
machine (CPU model + core count), backend, dtype, shape, threads and a hash of the model dims. A table whose key
does not match the current run is refused (explicit path) or re-measured (cache), never silently used.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from engine.config import EncoderConfig
from engine.latency_table import LatencyKey, LatencyTable, LatencyTableError, PiecewiseLinear, fit_piecewise
from engine.latency_timer import MIN_TIME_S, EngineTimer, Shape, measure_speedup

# measure([(heads, ffn), ...]) -> milliseconds of one forward of a model of each ragged shape
MeasureFn = Callable[[Sequence[Shape]], list[float]]


def default_cache_dir() -> Path:
    """`$SPARSEQA_CACHE/latency`, or `~/.cache/sparseqa/latency`."""
    root = os.environ.get("SPARSEQA_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "sparseqa") / "latency"


# ------------------------------------------------------------------------------------------- building


def default_grid(n: int, points: int = 9) -> list[int]:
    """Unit counts to measure for a sublayer of `n` units: every count when n <= 16, else ~`points` spread out."""
    if n <= 16:
        return list(range(n + 1))
    return sorted({0, 1} | {round(n * k / (points - 1)) for k in range(1, points)})


def _single_layer(n_layers: int, layer: int, heads: int, ffn: int) -> Shape:
    """A shape whose only non-empty layer is `layer`, keeping `heads` heads and `ffn` units."""
    return (
        tuple(heads if i == layer else 0 for i in range(n_layers)),
        tuple(ffn if i == layer else 0 for i in range(n_layers)),
    )


def build_table(
    dense: EncoderConfig,
    key: LatencyKey,
    measure: MeasureFn,
    head_grid: Sequence[int] | None = None,
    ffn_grid: Sequence[int] | None = None,
    n_validation: int = 3,
    seed: int = 0,
) -> LatencyTable:
    """Measure every layer position over the grids (one `measure` call for all shapes), fit, calibrate on the
    dense model, and compare `n_validation` random full shapes (held out of the fit) with their prediction."""
    t0 = time.monotonic()
    n_layers = dense.num_layers
    empty: Shape = ((0,) * n_layers, (0,) * n_layers)
    hg = [[h for h in (head_grid or default_grid(dense.heads[l])) if 0 < h <= dense.heads[l]] for l in range(n_layers)]
    fg = [[f for f in (ffn_grid or default_grid(dense.ffn[l])) if 0 < f <= dense.ffn[l]] for l in range(n_layers)]
    rng = random.Random(seed)
    held_out = [
        (tuple(rng.randint(0, h) for h in dense.heads), tuple(rng.randint(0, f) for f in dense.ffn))
        for _ in range(n_validation)
    ]
    # Full models on which the sum of isolated layer costs is calibrated: dense, and every layer at 3/4, 1/2, 1/4.
    calib = [
        (tuple(round(h * k / 4) for h in dense.heads), tuple(round(f * k / 4) for f in dense.ffn)) for k in (4, 3, 2, 1)
    ]
    shapes = [empty, *calib, *held_out]
    for l in range(n_layers):
        shapes += [_single_layer(n_layers, l, h, 0) for h in hg[l]] + [_single_layer(n_layers, l, 0, f) for f in fg[l]]
    ms = dict(zip(shapes, measure(shapes)))
    base = ms[empty]
    points: dict[str, Any] = {
        "attn": [[[h, ms[_single_layer(n_layers, l, h, 0)] - base] for h in hg[l]] for l in range(n_layers)],
        "ffn": [[[f, ms[_single_layer(n_layers, l, 0, f)] - base] for f in fg[l]] for l in range(n_layers)],
        "base_ms": base,
        "calibration": [[list(h), list(f), ms[(h, f)]] for h, f in calib],
    }

    def fit(pts: list[list[float]]) -> PiecewiseLinear:
        return fit_piecewise([p[0] for p in pts], [p[1] for p in pts]) if pts else PiecewiseLinear(0, 0, 0, 1)

    attn, ffn = tuple(fit(p) for p in points["attn"]), tuple(fit(p) for p in points["ffn"])
    raw = LatencyTable(key, dense.heads, dense.ffn, base, 1.0, attn, ffn)
    parts = [raw.predict(h, f) - base for h, f in calib]
    measured = [ms[c] - base for c in calib]
    # Least-squares scale through the base, weighting shapes by their relative (not absolute) error. A shape timed
    # faster than the empty model is noise (layers cost no negative time): it counts as 0, so the scale is >= 0.
    num = sum(max(m, 0.0) / p for m, p in zip(measured, parts) if p > 0)
    scale = num / sum(1 for p in parts if p > 0) if any(p > 0 for p in parts) else 1.0
    table = LatencyTable(key, dense.heads, dense.ffn, base, scale, attn, ffn, points)
    validation = tuple(
        {"heads": list(h), "ffn": list(f), "measured_ms": ms[(h, f)], "predicted_ms": table.predict(h, f)}
        for h, f in held_out
    )
    return LatencyTable(key, dense.heads, dense.ffn, base, scale, attn, ffn, points, validation, time.monotonic() - t0)


def load_or_measure(
    model_dir: str | Path,
    batch: int,
    seq: int,
    backend: str = "cpp",
    threads: int = 2,
    dtype: str = "float32",
    table_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    remeasure: bool = False,
    reps: int = 3,
    progress: bool = True,
    min_time_s: float = MIN_TIME_S,
) -> LatencyTable:
    """The latency table for `model_dir`'s dense shape on this machine: from `table_path` (refused unless its key
    matches), from the cache (re-measured if its key does not match), or measured now and cached."""
    from engine.checkpoint import load_checkpoint

    dense = load_checkpoint(model_dir).cfg
    key = LatencyKey.current(dense, backend, dtype, batch, seq, threads)
    if table_path is not None and not remeasure:
        table = LatencyTable.load(table_path)
        table.check_key(key, str(table_path))
        return table
    path = Path(table_path) if table_path is not None else Path(cache_dir or default_cache_dir()) / key.filename()
    if path.is_file() and not remeasure:
        try:
            table = LatencyTable.load(path)
            table.check_key(key, str(path))
            return table
        except LatencyTableError as e:
            print(f"re-measuring the latency table: {e}", file=sys.stderr)
    torch.set_num_threads(threads)
    timer = EngineTimer(
        dense, Path(model_dir), backend, dtype, batch, seq, threads, reps, progress=progress, min_time_s=min_time_s
    )
    try:
        table = build_table(dense, key, timer)
    finally:
        timer.close()
    table.save(path)
    return table


def parse_shape(text: str) -> tuple[int, int]:
    """'8,384' -> (8, 384), with a clear error otherwise."""
    try:
        b, s = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"latency shape must be BATCH,SEQ (e.g. 8,384), got {text!r}") from None
    return b, s


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m engine.latency", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="the dense checkpoint (its dims and tokenizer)")
    ap.add_argument("--shape", required=True, help="BATCH,SEQ of the forward to time, e.g. 8,384")
    ap.add_argument("--backend", default="cpp", help="engine backend to measure on (cpp, torch)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=3, help="round-robin timing rounds (the fastest run counts)")
    ap.add_argument("--out", type=Path, help="write the table here (default: the cache)")
    ap.add_argument("--remeasure", action="store_true", help="measure even if a cached table exists")
    ap.add_argument(
        "--check",
        type=Path,
        help="instead: build this pruned checkpoint and --model with real weights "
        "and print their measured latencies and speedup (interleaved, fastest of --rounds rounds)",
    )
    ap.add_argument("--rounds", type=int, default=7, help="timing rounds of --check")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        batch, seq = parse_shape(a.shape)
        if a.check is not None:
            r = measure_speedup(
                a.check, a.model, batch, seq, a.backend, a.threads, a.dtype, a.rounds, progress=not a.no_progress
            )
            print(
                json.dumps(
                    {
                        "model": str(a.check),
                        "dense": str(a.model),
                        "shape": [batch, seq],
                        "backend": a.backend,
                        "threads": a.threads,
                        **r,
                    },
                    indent=2,
                )
            )
            return 0
        table = load_or_measure(
            a.model,
            batch,
            seq,
            a.backend,
            a.threads,
            a.dtype,
            table_path=a.out,
            remeasure=a.remeasure or a.out is not None,
            reps=a.reps,
            progress=not a.no_progress,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    errs = [abs(v["predicted_ms"] / v["measured_ms"] - 1) for v in table.validation]
    print(
        json.dumps(
            {
                "key": asdict(table.key),
                "base_ms": round(table.base_ms, 3),
                "dense_ms": round(table.dense_ms(), 3),
                "scale": round(table.scale, 4),
                "measure_time_s": round(table.measure_time_s, 1),
                "validation_max_rel_err": round(max(errs), 4) if errs else None,
                "validation_mean_rel_err": round(sum(errs) / len(errs), 4) if errs else None,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
