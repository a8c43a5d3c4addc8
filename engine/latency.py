"""`python -m engine.latency`: a per-layer latency lookup table measured on the engine the user will run.

    python -m engine.latency --model DIR --shape 8,384 [--backend cpp] [--threads 2] [--dtype float32] [--out T.json]
    python -m engine.latency --model DENSE --check PRUNED --shape 8,384     # measured speedup of a pruned model

For every layer position l the table holds two piecewise-linear functions, in milliseconds for one forward of
`batch` sequences of `seq` tokens: `attn_l(h)` (layer l keeping h heads) and `ffn_l(f)` (keeping f FFN units).
A model's predicted latency is

    base + scale * sum_l (attn_l(h_l) + ffn_l(f_l))

where `base` is the measured latency of the model with every head and unit removed (embeddings, the bias + LayerNorm
that empty sublayers still apply, the QA head) and `scale` calibrates the sum of isolated layer costs to measured
full models (dense, and every layer at 3/4, 1/2 and 1/4: the mean ratio). Each point is measured on the real engine
by `engine.latency_timer` (an artifact written with random weights of that ragged shape, run through
`engine.runtime`'s backend): layer l at (h, 0) or (0, f), every other layer empty, minus `base`. The fit follows
Kwon et al. (2022): `f(0) = 0`, and for n >= 1 a continuous two-segment line `b + a1*n + a2*max(0, n - knot)` (a
flat first segment is their "constant below a threshold" regime); between 0 and 1 it interpolates linearly, so
`expected_latency` is differentiable in expected counts.

Tables are cached as JSON under `$SPARSEQA_CACHE/latency` (default `~/.cache/sparseqa/latency`), keyed by
machine (CPU model + core count), backend, dtype, shape, threads and a hash of the model dims. A table whose key
does not match the current run is refused (explicit path) or re-measured (cache), never silently used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.config import EncoderConfig
from engine.latency_timer import MIN_TIME_S, EngineTimer, Shape, measure_speedup

TABLE_VERSION = 1
# measure([(heads, ffn), ...]) -> milliseconds of one forward of a model of each ragged shape
MeasureFn = Callable[[Sequence[Shape]], list[float]]


class LatencyTableError(ValueError):
    """A latency table that cannot be used for this run (other machine, backend, shape, model...)."""


# ------------------------------------------------------------------------------------------------- cache key


def machine_id() -> str:
    """CPU model string and logical core count, e.g. 'AMD EPYC 9R14 96-Core Processor x2'."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} x{cores}"


def dims_hash(cfg: EncoderConfig) -> str:
    """Short hash of the dense model dimensions the table was measured for."""
    dims = [cfg.architecture.value, cfg.hidden, cfg.head_dim, list(cfg.heads), list(cfg.ffn), cfg.activation.value]
    return hashlib.sha256(json.dumps(dims).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class LatencyKey:
    """Everything a measured table depends on; a table is only valid under an equal key."""

    machine: str
    backend: str
    dtype: str
    batch: int
    seq: int
    threads: int
    dims: str

    @classmethod
    def current(cls, cfg: EncoderConfig, backend: str, dtype: str, batch: int, seq: int, threads: int) -> LatencyKey:
        """The key of a table measured now, on this machine."""
        return cls(machine_id(), backend, dtype, int(batch), int(seq), int(threads), dims_hash(cfg))

    def filename(self) -> str:
        """Cache file name: readable fields plus a digest of the whole key."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.backend}-{self.dtype}-b{self.batch}s{self.seq}-t{self.threads}-{self.dims}-{digest}.json"


def default_cache_dir() -> Path:
    """`$SPARSEQA_CACHE/latency`, or `~/.cache/sparseqa/latency`."""
    root = os.environ.get("SPARSEQA_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "sparseqa") / "latency"


# ------------------------------------------------------------------------------------------ piecewise fit


@dataclass(frozen=True)
class PiecewiseLinear:
    """`f(0) = 0`; `f(n) = b + a1*n + a2*max(0, n - knot)` for n >= 1; linear from 0 to f(1) in between (ms)."""

    b: float
    a1: float
    a2: float
    knot: float

    def _above(self, n: float) -> float:
        return self.b + self.a1 * n + self.a2 * max(0.0, n - self.knot)

    def __call__(self, n: float) -> float:
        """Latency in ms at `n` units (n may be fractional)."""
        return n * self._above(1.0) if n < 1 else self._above(n)

    def torch(self, n: torch.Tensor) -> torch.Tensor:
        """Differentiable version of `__call__` for a tensor of unit counts."""
        above = self.b + self.a1 * n + self.a2 * torch.relu(n - self.knot)
        return torch.where(n < 1, n * self._above(1.0), above)


def fit_piecewise(ns: Sequence[float], ms: Sequence[float]) -> PiecewiseLinear:
    """Least-squares fit of the two-segment model to points with n >= 1 (f(0) = 0 is fixed).

    The knot is searched over the measured n, and a straight line is always a candidate. Adding units never costs
    negative time, so every fit is non-decreasing with f(1) >= 0: a point timed below the empty model (noise, on a
    sublayer cheaper than the timer's jitter) counts as 0; hinge fits with a negative slope or a negative f(1) are
    dropped; the line is clamped to a slope >= 0 and, where its f(1) would fall below 0, refitted through (1, 0).
    """
    pts = [(float(n), max(float(m), 0.0)) for n, m in zip(ns, ms) if n >= 1]
    if not pts:
        raise ValueError("fit_piecewise needs at least one point with n >= 1")
    if len(pts) == 1:
        return PiecewiseLinear(pts[0][1], 0.0, 0.0, 1.0)
    x = torch.tensor([p[0] for p in pts], dtype=torch.float64)
    y = torch.tensor([p[1] for p in pts], dtype=torch.float64)
    best: tuple[float, PiecewiseLinear] | None = None
    knots = [None] + sorted({p[0] for p in pts})[1:-1]
    for k in knots:
        cols = [torch.ones_like(x), x] + ([] if k is None else [torch.relu(x - k)])
        a = torch.stack(cols, 1)
        coef = torch.linalg.lstsq(a, y[:, None]).solution[:, 0].tolist()
        b, a1, a2 = coef[0], coef[1], coef[2] if k is not None else 0.0
        if a1 < -1e-12 or a1 + a2 < -1e-12 or b + a1 < -1e-12:
            if k is not None:
                continue
            a1 = max(a1, 0.0)
            b = float((y - a1 * x).mean())
            if b + a1 < 0:  # anchored at f(1) = 0: least squares of a1 * (x - 1) (y >= 0, so a1 >= 0)
                a1 = float(((x - 1) * y).sum() / ((x - 1) ** 2).sum().clamp_min(1e-30))
                b = -a1
        f = PiecewiseLinear(b, a1, a2, float(k) if k is not None else float(x.max()))
        sse = float(sum((f(xi) - yi) ** 2 for xi, yi in zip(x.tolist(), y.tolist())))
        if best is None or sse < best[0] - 1e-12:
            best = (sse, f)
    return best[1]


# ------------------------------------------------------------------------------------------------- table


@dataclass(frozen=True)
class LatencyTable:
    """Fitted per-layer latency model of one (machine, backend, dtype, shape, threads, model dims)."""

    key: LatencyKey
    dense_heads: tuple[int, ...]
    dense_ffn: tuple[int, ...]
    base_ms: float
    scale: float
    attn: tuple[PiecewiseLinear, ...]
    ffn: tuple[PiecewiseLinear, ...]
    points: dict[str, Any] = field(default_factory=dict)  # raw measurements, for inspection
    validation: tuple[dict[str, Any], ...] = ()  # held-out full configurations: measured vs predicted ms
    measure_time_s: float = 0.0

    def predict(self, heads: Sequence[float], ffn: Sequence[float]) -> float:
        """Predicted latency (ms) of a model keeping `heads[l]` heads and `ffn[l]` units in layer l."""
        self._check_layers(len(heads), len(ffn))
        parts = sum(a(h) + f(u) for a, f, h, u in zip(self.attn, self.ffn, heads, ffn))
        return self.base_ms + self.scale * parts

    def dense_ms(self) -> float:
        """Predicted latency of the dense model, in ms."""
        return self.predict(self.dense_heads, self.dense_ffn)

    def _check_layers(self, nh: int, nf: int) -> None:
        n = len(self.dense_heads)
        if nh != n or nf != n:
            raise ValueError(f"latency table has {n} layers, got {nh} head counts and {nf} FFN widths")

    def check_key(self, key: LatencyKey, source: str) -> None:
        """Raise LatencyTableError naming every field in which this table's key differs from `key`."""
        if self.key == key:
            return
        diffs = [
            f"{k}: table {v!r}, this run {getattr(key, k)!r}"
            for k, v in asdict(self.key).items()
            if getattr(key, k) != v
        ]
        raise LatencyTableError(
            f"latency table {source} was measured for another setting ({'; '.join(diffs)}); "
            f"re-measure it here (python -m engine.latency, or drop the explicit table path)"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "version": TABLE_VERSION,
            "key": asdict(self.key),
            "dense_heads": list(self.dense_heads),
            "dense_ffn": list(self.dense_ffn),
            "base_ms": self.base_ms,
            "scale": self.scale,
            "attn": [asdict(f) for f in self.attn],
            "ffn": [asdict(f) for f in self.ffn],
            "points": self.points,
            "validation": list(self.validation),
            "measure_time_s": self.measure_time_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyTable:
        """Inverse of `to_dict`; raises LatencyTableError on a malformed or other-version table."""
        if d.get("version") != TABLE_VERSION:
            raise LatencyTableError(f"latency table version {d.get('version')!r} is not {TABLE_VERSION}; re-measure")
        try:
            return cls(
                LatencyKey(**d["key"]),
                tuple(d["dense_heads"]),
                tuple(d["dense_ffn"]),
                float(d["base_ms"]),
                float(d["scale"]),
                tuple(PiecewiseLinear(**f) for f in d["attn"]),
                tuple(PiecewiseLinear(**f) for f in d["ffn"]),
                d.get("points", {}),
                tuple(d.get("validation", ())),
                float(d.get("measure_time_s", 0.0)),
            )
        except (KeyError, TypeError) as e:
            raise LatencyTableError(f"malformed latency table ({e}); re-measure it") from None

    def save(self, path: str | Path) -> Path:
        """Write the table as JSON (atomically); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        """Read a table written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"latency table {path} does not exist")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise LatencyTableError(f"latency table {path} is not valid JSON ({e})") from None


def expected_latency(table: LatencyTable, heads: Sequence[torch.Tensor], ffn: Sequence[torch.Tensor]) -> torch.Tensor:
    """Differentiable predicted latency (ms) from per-layer expected head counts and FFN widths (0-d tensors).

    For L0: pass `sum(P(gate != 0))` per layer (times the sublayer gate's probability when whole sublayers are
    gated); `1 - expected_latency / dense_latency` takes the place of the expected FLOP sparsity.
    """
    table._check_layers(len(heads), len(ffn))
    parts = sum(a.torch(h) + f.torch(u) for a, f, h, u in zip(table.attn, table.ffn, heads, ffn))
    return table.base_ms + table.scale * parts


def dense_latency(table: LatencyTable) -> float:
    """Predicted latency (ms) of the dense model the table was measured for."""
    return table.dense_ms()


def latency_budget(table: LatencyTable, target_ms: float | None = None, speedup: float | None = None) -> float:
    """The latency (ms) a pruned model may take: `target_ms`, or the dense latency / `speedup`. Checks it is
    reachable: above the latency of the empty model (every head and unit removed), below the dense one."""
    if (target_ms is None) == (speedup is None):
        raise ValueError("give exactly one of a latency target (ms) and a speedup")
    if speedup is not None and speedup <= 1:
        raise ValueError(f"--target-speedup must be > 1 (relative to the dense model), got {speedup}")
    budget = float(target_ms) if target_ms is not None else table.dense_ms() / float(speedup)
    floor = table.base_ms
    if budget <= floor * 1.02:
        want = f"{target_ms} ms" if target_ms is not None else f"speedup {speedup} ({budget:.1f} ms)"
        raise ValueError(
            f"latency target {want} is not achievable: the model with every head and FFN unit removed "
            f"still takes {floor:.1f} ms at batch {table.key.batch}, seq {table.key.seq} on "
            f"{table.key.backend} (dense {table.dense_ms():.1f} ms); ask for at least "
            f"{floor * 1.05:.1f} ms or at most {table.dense_ms() / (floor * 1.05):.2f}x"
        )
    if budget >= table.dense_ms():
        raise ValueError(
            f"latency target {budget:.1f} ms is not below the dense model's {table.dense_ms():.1f} ms "
            f"on {table.key.backend}; nothing needs pruning"
        )
    return budget


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
