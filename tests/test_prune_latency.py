"""L0 pruning (engine.prune) to a latency target: the latency-based expected sparsity, calibration to the budget,
the CLI end to end with --target-speedup / --target-latency-ms, and refusals of unreachable or foreign targets.

The latency table is synthetic (a Kwon-like cost of each shape, put in the cache under this machine's key), so the
tests are fast and exact; only the final `measure_speedup` of the speedup run times the real engine.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine import latency as lat
from engine import latency_table as lt
from engine import latency_timer as timer
from engine.checkpoint import load_checkpoint
from engine.config import EncoderConfig
from engine.model import RaggedQAModel
from engine.prune.export import calibrate, deterministic_shape
from engine.prune.gated import GatedQAModel
from engine.prune.train import build_parser, main, prune
from engine.runtime import available_backends
from tests.conftest import slow_pruned_timer
from tests.prune.test_prune_train import _argv, data  # noqa: F401  (`data` is a fixture: tiny teacher + SQuAD files)

BACKEND = "cpp" if "cpp" in available_backends("cpu") else "torch"
SHAPE, THREADS = (2, 16), 1  # the latency setting of the CLI runs (`_argv` passes --threads 1)


def _synthetic_ms(heads: tuple[int, ...], ffn: tuple[int, ...]) -> float:
    """1 ms fixed; per layer attention flat below 2 heads then linear, FFN linear plus a launch cost."""
    return 1.0 + sum(
        (0.8 + 0.5 * max(0, h - 2) if h else 0.0) + (0.3 + 0.05 * f if f else 0.0) for h, f in zip(heads, ffn)
    )


def _table(dense: EncoderConfig, **key_fields: str) -> lt.LatencyTable:
    key = lt.LatencyKey.current(dense, BACKEND, "float32", *SHAPE, THREADS)
    return lat.build_table(
        dense, replace(key, **key_fields), lambda shapes: [_synthetic_ms(*s) for s in shapes], n_validation=0
    )


@pytest.fixture
def cached_table(data, tmp_path, monkeypatch):  # noqa: F811
    """The teacher's synthetic table, cached under this machine's key (as `load_or_measure` would have left it)."""
    monkeypatch.setenv("SPARSEQA_CACHE", str(tmp_path / "cache"))
    table = _table(load_checkpoint(data[1]).cfg)
    table.save(lat.default_cache_dir() / table.key.filename())
    return table


def _gated(teacher: Path, sublayer: bool) -> tuple[GatedQAModel, EncoderConfig]:
    ck = load_checkpoint(teacher)
    return GatedQAModel(RaggedQAModel(ck.cfg), sublayer_gates=sublayer), ck.cfg


@pytest.mark.parametrize("sublayer", [False, True])
def test_latency_sparsity_gradient_and_corners(data, sublayer):  # noqa: F811
    gated, dense = _gated(data[1], sublayer)
    table = _table(dense)
    s_hat = gated.expected_sparsity(dense, 64, "latency", table)
    s_hat.backward()
    for p in gated.gate_parameters():
        # Opening a gate never makes the model faster: every gradient is finite, <= 0, and each gate tensor moves.
        assert torch.isfinite(p.grad).all() and (p.grad <= 0).all() and p.grad.abs().sum() > 0, p.grad

    def s_at(heads: list[list[float]], ffn: list[list[float]]) -> float:
        with torch.no_grad():
            for g, v in [*zip(gated.head_gates, heads), *zip(gated.ffn_gates, ffn)]:
                g.log_alpha.copy_(torch.tensor(v))
            for g in (gated.mha_gate, gated.ffn_layer_gate):
                if g is not None:
                    g.log_alpha.fill_(40.0)
            return float(gated.expected_sparsity(dense, 64, "latency", table))

    dense_ms = lt.dense_latency(table)
    up, down = 40.0, -40.0  # P(gate != 0) is 1 and 0 to float32 precision
    cases = [
        (dense.heads, dense.ffn),  # all open
        ((0,) * dense.num_layers, (0,) * dense.num_layers),  # all closed
        ((4, 0, 2), (37, 11, 0)),  # mixed: an empty attention, an empty FFN
    ]
    for heads, ffn in cases:
        got = s_at(
            [[up] * k + [down] * (n - k) for k, n in zip(heads, dense.heads)],
            [[up] * k + [down] * (n - k) for k, n in zip(ffn, dense.ffn)],
        )
        assert got == pytest.approx(1 - table.predict(heads, ffn) / dense_ms, abs=1e-6), (heads, ffn)
    assert s_at([[up] * h for h in dense.heads], [[up] * f for f in dense.ffn]) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="latency table"):
        gated.expected_sparsity(dense, 64, "latency")


def test_calibrate_meets_the_latency_budget(data):  # noqa: F811
    gated, dense = _gated(data[1], sublayer=False)
    table = _table(dense)
    g = torch.Generator().manual_seed(3)
    for speedup in (1.3, 1.8, 2.5):
        with torch.no_grad():
            for p in gated.gate_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 2)
        budget = lt.latency_budget(table, speedup=speedup)
        target = 1 - budget / table.dense_ms()
        info = calibrate(gated, dense, target, by="latency", table=table, tol=0.01)
        shape = deterministic_shape(gated)
        ms = table.predict(shape.heads, shape.ffn)
        assert ms <= budget * (1 + 1e-9), (speedup, ms, budget, info)
        assert info["after"] == pytest.approx(1 - ms / table.dense_ms())
        # The greedy fill tries every unit: what is left is less than a first FFN unit (0.35 ms), or all fit.
        assert budget - ms < 0.35 or shape.ffn == dense.ffn, (speedup, ms, budget)
        assert calibrate(gated, dense, target, by="latency", table=table, tol=0.5)["changed"] == 0  # already met


def test_cli_target_speedup_end_to_end(data, cached_table, tmp_path):  # noqa: F811
    out = tmp_path / "x1.5"
    argv = _argv(data, out, "--target-speedup", "1.5", "--latency-shape", "2,16", "--backend", BACKEND)
    argv += ["--latency-iterations", "0"]  # the table alone (the engine-measured correction: test below)
    m = prune(build_parser().parse_args([*argv, "--max-steps", "6", "--finetune-max-steps", "1"]))
    assert m["target"] == {
        "by": "speedup",
        "value": 1.5,
        "shape": "2,16",
        "backend": BACKEND,
        "threads": THREADS,
        "dtype": "float32",
    }
    cfg = load_checkpoint(out).cfg
    lm = m["latency"]
    budget = cached_table.dense_ms() / 1.5
    assert lm["budget_ms"] == pytest.approx(budget)
    assert lm["predicted_ms"] == pytest.approx(cached_table.predict(cfg.heads, cfg.ffn))
    assert lm["predicted_ms"] <= budget * (1 + 1e-9) and lm["predicted_speedup"] >= 1.5 * (1 - 1e-9)
    assert lm["ms"] > 0 and lm["dense_ms"] > 0 and lm["speedup"] > 0 and lm["rounds"] > 0  # measured, not asserted
    assert lm["table_key"]["machine"] == lt.machine_id()
    gates = json.loads((out / "gates.json").read_text())
    assert gates["sparsity_by"] == "latency" and 0 <= gates["expected_sparsity"] < 1
    assert json.loads((out / "metrics.json").read_text())["latency"]["budget_ms"] == pytest.approx(budget)


def test_cli_target_latency_ms(data, cached_table, tmp_path, monkeypatch):  # noqa: F811
    fake = {"ms": 1.0, "dense_ms": 2.0, "speedup": 2.0, "speedup_min": 2.0, "rounds": 7}
    monkeypatch.setattr(timer, "measure_speedup", lambda *a, **k: fake)  # the engine timing is tested above
    target = 0.6 * cached_table.dense_ms()
    argv = _argv(data, tmp_path / "o", "--target-latency-ms", str(target), "--latency-shape", "2,16")
    argv += ["--latency-iterations", "0"]
    m = prune(build_parser().parse_args([*argv, "--backend", BACKEND, "--max-steps", "4", "--finetune-epochs", "0"]))
    assert m["target"]["by"] == "latency_ms" and m["target"]["value"] == target
    assert m["latency"]["predicted_ms"] <= target * (1 + 1e-9) and m["latency"]["speedup"] == 2.0


def test_cli_corrects_the_budget_by_measuring_on_the_engine(data, cached_table, tmp_path, monkeypatch):  # noqa: F811
    """The engine runs pruned shapes 15% slower than the table predicts: the exported shape must still reach the
    requested speedup as measured, after the measure-and-correct rounds (engine.prune_fast's loop)."""
    dense = load_checkpoint(data[1]).cfg

    engine_ms, FakeTimer = slow_pruned_timer(cached_table, dense)

    monkeypatch.setattr(timer, "EngineTimer", FakeTimer)
    monkeypatch.setattr(timer, "measure_speedup", lambda *a, **k: {"ms": 1.0, "dense_ms": 1.5, "speedup": 1.5})
    out = tmp_path / "o"
    argv = _argv(data, out, "--target-speedup", "1.5", "--latency-shape", "2,16", "--backend", BACKEND)
    m = prune(build_parser().parse_args([*argv, "--max-steps", "4", "--finetune-epochs", "0"]))
    rounds = m["gates"]["calibration"]["verification"]
    assert rounds[0]["rel_error"] < -0.1  # the table alone misses by ~15%
    cfg = load_checkpoint(out).cfg
    assert engine_ms(dense.heads, dense.ffn) / engine_ms(cfg.heads, cfg.ffn) == pytest.approx(1.5, rel=0.03), rounds
    assert m["gates"]["calibration"]["budget_ms"] < m["latency"]["budget_ms"]  # corrected down from the table's


def test_unreachable_or_foreign_targets_are_refused_before_training(
    data,  # noqa: F811
    cached_table,
    tmp_path,
    monkeypatch,
    capsys,
):
    import engine.prune.train as train_mod

    def no_training(*a, **k):
        raise AssertionError("the run went past the target check")

    monkeypatch.setattr(train_mod, "prepare_data", no_training)
    common = ("--latency-shape", "2,16", "--backend", BACKEND, "--max-steps", "2")
    floor = cached_table.base_ms
    assert main(_argv(data, tmp_path / "a", "--target-latency-ms", str(floor * 0.8), *common)) == 2
    err = capsys.readouterr().err
    assert "not achievable" in err and f"{floor:.1f} ms" in err and "ask for at least" in err
    assert main(_argv(data, tmp_path / "b", "--target-speedup", "1000", *common)) == 2
    assert "not achievable" in capsys.readouterr().err
    assert main(_argv(data, tmp_path / "c", "--target-latency-ms", str(cached_table.dense_ms() * 2), *common)) == 2
    assert "nothing needs pruning" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_argv(data, tmp_path / "d", "--target-speedup", "0.9", *common))
    assert "--target-speedup must be > 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_argv(data, tmp_path / "e", "--target-speedup", "1.5", "--latency-shape", "8x384"))
    assert "BATCH,SEQ" in capsys.readouterr().err
    # A table measured on another machine, given explicitly, is refused with the differing field named.
    foreign = _table(load_checkpoint(data[1]).cfg, machine="some other CPU x64").save(tmp_path / "foreign.json")
    argv = _argv(data, tmp_path / "f", "--target-speedup", "1.5", *common, "--latency-table", str(foreign))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "machine" in err and "some other CPU x64" in err and "re-measure" in err
