"""engine.latency: piecewise-linear fit, table building and prediction, the cache key, expected_latency for L0."""

from __future__ import annotations

import json
import random

import pytest
import torch

from engine import latency as lat
from engine.checkpoint import load_checkpoint
from engine.config import EncoderConfig
from engine.latency import build_table, load_or_measure
from engine.latency_table import (
    LatencyKey,
    LatencyTable,
    LatencyTableError,
    PiecewiseLinear,
    dense_latency,
    dims_hash,
    expected_latency,
    fit_piecewise,
    latency_budget,
)

CFG = EncoderConfig(
    architecture="bert",
    vocab_size=50,
    hidden=32,
    head_dim=8,
    heads=(4, 4, 4),
    ffn=(40, 40, 40),
    max_position_embeddings=64,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    activation="gelu",
    pad_token_id=0,
)
KEY = LatencyKey("test-cpu x2", "cpp", "float32", 8, 32, 2, dims_hash(CFG))


def _synthetic(heads: tuple[int, ...], ffn: tuple[int, ...]) -> float:
    """A Kwon-like engine: per layer, attention flat below 2 heads then linear, FFN linear in 8-unit tiles plus a
    launch cost; layer 2 is 20% slower (position matters); 1 ms fixed; 2% multiplicative interaction."""
    ms = 1.0
    for l, (h, f) in enumerate(zip(heads, ffn)):
        slow = 1.2 if l == 2 else 1.0
        ms += slow * ((0.8 + 0.5 * max(0, h - 2)) if h else 0.0)
        ms += slow * ((0.3 + 0.05 * f) if f else 0.0)
    return ms * 1.02


def _fake_measure(shapes):
    return [_synthetic(*s) for s in shapes]


def test_fit_piecewise_recovers_a_hinge():
    f = PiecewiseLinear(b=2.0, a1=0.1, a2=0.9, knot=4.0)
    ns = [0, 1, 2, 3, 4, 6, 8, 10, 12]
    fit = fit_piecewise(ns, [f(n) for n in ns])
    for n in range(13):
        assert fit(n) == pytest.approx(f(n), abs=1e-9)
    assert fit(0) == 0 and fit(0.5) == pytest.approx(0.5 * f(1))


@pytest.mark.parametrize("seed", range(6))
def test_fit_piecewise_never_costs_negative_time(seed):
    """Sublayers cheaper than the timer's jitter are measured around 0, often below the empty model: whatever the
    noise, the fit is non-decreasing from f(0) = 0 (a layer never makes the model faster)."""
    rng = random.Random(seed)
    ns = [1, 2, 3, 4, 6, 8, 12, 16]
    ms = [rng.uniform(-0.3, 0.1) + 0.001 * n for n in ns]  # mostly below the empty model
    fit = fit_piecewise(ns, ms)
    values = [fit(n / 4) for n in range(0, 4 * 16 + 1)]
    assert values[0] == 0 and min(values) >= -1e-12
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:])), values
    # a clearly negative intercept (a line through the points would cross 0 between 1 and 16) is refitted too
    steep = fit_piecewise(ns, [-2.0 + 0.5 * n for n in ns])
    assert steep(1) >= -1e-12 and steep(16) == pytest.approx(6.0, rel=0.25)


def test_table_of_noise_never_predicts_below_the_empty_model():
    """A model too small to time (every sublayer measured at or below the empty model) still predicts a dense
    latency at or above the empty model's, and `latency_budget` refuses a speedup it cannot reach."""
    rng = random.Random(3)

    def noisy(shapes):
        return [0.2 + rng.uniform(-0.05, 0.01) for _ in shapes]

    table = build_table(CFG, KEY, noisy, n_validation=2)
    assert table.dense_ms() >= table.base_ms > 0
    for v in table.validation:
        assert v["predicted_ms"] >= table.base_ms
    with pytest.raises(ValueError):
        latency_budget(table, speedup=4.0)


def test_table_predicts_held_out_configurations():
    table = build_table(CFG, KEY, _fake_measure, n_validation=4)
    assert table.base_ms == pytest.approx(1.02)
    rng = random.Random(7)
    for _ in range(50):
        heads = tuple(rng.randint(0, 4) for _ in range(3))
        ffn = tuple(rng.randint(0, 40) for _ in range(3))
        assert table.predict(heads, ffn) == pytest.approx(_synthetic(heads, ffn), rel=0.02), (heads, ffn)
    assert dense_latency(table) == pytest.approx(_synthetic(CFG.heads, CFG.ffn), rel=0.01)
    for v in table.validation:
        assert v["predicted_ms"] == pytest.approx(v["measured_ms"], rel=0.02)


def test_expected_latency_is_differentiable_and_matches_predict():
    table = build_table(CFG, KEY, _fake_measure, n_validation=0)
    heads = [torch.tensor(float(h), requires_grad=True) for h in (4, 0, 4)]
    ffn = [torch.tensor(float(f), requires_grad=True) for f in (40, 13, 0)]
    ms = expected_latency(table, heads, ffn)
    assert float(ms.detach()) == pytest.approx(table.predict([4, 0, 4], [40, 13, 0]))
    ms.backward()
    grads = [float(t.grad) for t in heads + ffn]
    assert all(g > 0 for g in grads), grads  # including from 0 (linear ramp to 1 unit)
    with pytest.raises(ValueError, match="3 layers"):
        expected_latency(table, heads[:2], ffn)


def test_latency_budget_rejects_unachievable_targets():
    table = build_table(CFG, KEY, _fake_measure, n_validation=0)
    assert latency_budget(table, speedup=1.5) == pytest.approx(table.dense_ms() / 1.5)
    with pytest.raises(ValueError, match="not achievable"):
        latency_budget(table, target_ms=table.base_ms * 0.9)
    with pytest.raises(ValueError, match="not achievable"):
        latency_budget(table, speedup=1000)
    with pytest.raises(ValueError, match="> 1"):
        latency_budget(table, speedup=0.8)
    with pytest.raises(ValueError, match="not below"):
        latency_budget(table, target_ms=table.dense_ms() * 1.1)


def test_table_roundtrip_and_key_check(tmp_path):
    table = build_table(CFG, KEY, _fake_measure, n_validation=1)
    path = table.save(tmp_path / "t.json")
    again = LatencyTable.load(path)
    assert again.predict((1, 2, 3), (4, 5, 6)) == pytest.approx(table.predict((1, 2, 3), (4, 5, 6)))
    again.check_key(KEY, "t.json")
    other = LatencyKey(**{**KEY.__dict__, "backend": "torch"})
    with pytest.raises(LatencyTableError, match="backend"):
        again.check_key(other, "t.json")
    bad = json.loads(path.read_text())
    bad["version"] = 99
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(LatencyTableError, match="version"):
        LatencyTable.load(tmp_path / "bad.json")


@pytest.mark.slow
def test_measured_on_the_engine_and_cached(tiny_bert, tmp_path, monkeypatch):
    """A real (tiny) table on the engine; the cache is reused only under an equal key: another machine's
    table is re-measured from the cache and refused when given explicitly."""
    from engine.runtime import available_backends

    backend = "cpp" if "cpp" in available_backends("cpu") else "torch"
    kw = {
        "batch": 2,
        "seq": 16,
        "backend": backend,
        "threads": 1,
        "cache_dir": tmp_path / "cache",
        "reps": 1,
        "progress": False,
        "min_time_s": 0.0,
    }
    table = load_or_measure(tiny_bert, **kw)
    dense = load_checkpoint(tiny_bert).cfg
    assert table.key.backend == backend and table.key.seq == 16 and table.dense_heads == dense.heads
    assert len(table.attn) == dense.num_layers and table.base_ms > 0
    assert table.dense_ms() > 0  # no timing comparison here: measured values are noisy on a shared machine
    cached = list((tmp_path / "cache").glob("*.json"))
    assert len(cached) == 1

    calls = []
    real_build = lat.build_table
    monkeypatch.setattr(lat, "build_table", lambda *a, **k: calls.append(1) or real_build(*a, **k))
    load_or_measure(tiny_bert, **kw)
    assert calls == []  # same key: the cached table is used

    # The same file, claimed by another machine: found under this machine's name, it is re-measured, not used.
    doc = json.loads(cached[0].read_text())
    doc["key"]["machine"] = "some other CPU x64"
    cached[0].write_text(json.dumps(doc))
    load_or_measure(tiny_bert, **kw)
    assert calls == [1]
    # Given explicitly, another machine's table is refused.
    cached[0].write_text(json.dumps(doc))
    with pytest.raises(LatencyTableError, match="machine"):
        load_or_measure(tiny_bert, **{**kw, "cache_dir": None}, table_path=cached[0])


@pytest.mark.slow
def test_check_benchmark_runs_real_weights(tiny_bert, capsys):
    """`python -m engine.latency --check`: both checkpoints built with engine.build_model and timed (no timing
    assertion: only that it runs and reports consistent fields)."""
    from engine.runtime import available_backends

    backend = "cpp" if "cpp" in available_backends("cpu") else "torch"
    assert (
        lat.main(
            [
                "--model",
                str(tiny_bert),
                "--check",
                str(tiny_bert),
                "--shape",
                "2,16",
                "--backend",
                backend,
                "--threads",
                "1",
                "--rounds",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert r["ms"] > 0 and r["dense_ms"] > 0 and r["speedup"] > 0 and r["shape"] == [2, 16]
    assert lat.main(["--model", str(tiny_bert), "--shape", "8x384"]) == 2
    assert "BATCH,SEQ" in capsys.readouterr().err
