"""The per-layer latency model that `engine.latency` measures, and the structured pruners budget with.

For every layer position l a table holds two piecewise-linear functions, in milliseconds for one forward of
`batch` sequences of `seq` tokens: `attn_l(h)` (layer l keeping h heads) and `ffn_l(f)` (keeping f FFN units).
A model's predicted latency is

    base + scale * sum_l (attn_l(h_l) + ffn_l(f_l))

where `base` is the measured latency of the model with every head and unit removed (embeddings, the bias + LayerNorm
that empty sublayers still apply, the QA head) and `scale` calibrates the sum of isolated layer costs to measured
full models. The fit follows Kwon et al. (2022): `f(0) = 0`, and for n >= 1 a continuous two-segment line
`b + a1*n + a2*max(0, n - knot)` (a flat first segment is their "constant below a threshold" regime); between 0 and
1 it interpolates linearly, so `expected_latency` is differentiable in expected counts.

A table is keyed by machine (CPU model + core count), backend, dtype, shape, threads and a hash of the model dims
(`LatencyKey`); one whose key does not match the current run is refused, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.config import EncoderConfig

TABLE_VERSION = 1


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
