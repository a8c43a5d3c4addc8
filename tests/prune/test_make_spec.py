"""engine.make_spec: the random and importance baselines (selection rule, Michel et al. scores, CLI)."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from engine.checkpoint import load_checkpoint
from engine.config import EncoderConfig
from engine.flops import flop_sparsity, unit_flops
from engine.make_spec import importance_scores, main, select
from engine.spec import apply_spec, parse_spec
from tests.conftest import make_checkpoint
from tests.test_finetune import _squad


def _cfg(heads=(12, 12, 12), ffn=(96, 96, 96)) -> EncoderConfig:
    return EncoderConfig(
        architecture="bert",
        vocab_size=50,
        hidden=64,
        head_dim=8,
        heads=heads,
        ffn=ffn,
        max_position_embeddings=128,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        activation="gelu",
        pad_token_id=0,
    )


@pytest.mark.parametrize("target", [0.25, 0.5, 0.75])
def test_select_cuts_each_kind_by_the_target_and_lowest_scores_first(target):
    cfg = _cfg()
    g = torch.Generator().manual_seed(0)
    hs = [torch.rand(h, generator=g) for h in cfg.heads]
    fs = [torch.rand(f, generator=g) * 1e-3 for f in cfg.ffn]  # units on a far smaller scale than heads
    spec = select(cfg, target, hs, fs, seq_len=128)
    kept_h = [k.heads for k in spec.layers]
    kept_f = [k.ffn for k in spec.layers]
    head_cost, unit_cost = unit_flops(cfg.hidden, cfg.head_dim, 128)
    # each kind loses at least the target share of its FLOPs, and less than one more structure beyond it
    for kept, counts, _cost in ((kept_h, cfg.heads, head_cost), (kept_f, cfg.ffn, unit_cost)):
        removed = sum(c - len(k) for c, k in zip(counts, kept))
        assert target * sum(counts) <= removed < target * sum(counts) + 1
    shape = cfg.with_shape(tuple(map(len, kept_h)), tuple(map(len, kept_f)))
    assert target <= flop_sparsity(shape, cfg, 128) <= target + 0.02
    # what was removed scores no higher than anything kept, across layers
    for scores, kept in ((hs, kept_h), (fs, kept_f)):
        gone = [float(scores[l][j]) for l in range(3) for j in range(len(scores[l])) if j not in kept[l]]
        stay = [float(scores[l][j]) for l in range(3) for j in kept[l]]
        assert max(gone) <= min(stay)


def test_select_keeps_heads_when_unit_scores_are_larger_per_flop():
    """The old joint ranking by score per FLOP removed every head first: per-kind budgets must not."""
    cfg = _cfg()
    hs = [torch.full((h,), 0.29) for h in cfg.heads]  # unit-norm over 12 heads
    fs = [torch.full((f,), 0.1) for f in cfg.ffn]  # unit-norm over 96 units
    spec = select(cfg, 0.5, hs, fs, seq_len=128)
    assert sum(len(k.heads) for k in spec.layers) == 18


def test_importance_scores_shapes_and_normalisation(tmp_path):
    model = make_checkpoint(tmp_path / "m", "bert", layers=3, heads=4, head_dim=8, ffn=29, seed=3)
    with gzip.open(tmp_path / "train.json.gz", "wt") as f:
        json.dump(_squad(0, 3), f)
    hs, fs = importance_scores(model, [tmp_path / "train.json.gz"], max_windows=8, batch=4, max_seq_length=64)
    assert [len(h) for h in hs] == [4, 4, 4] and [len(f) for f in fs] == [29, 29, 29]
    for t in hs + fs:
        assert torch.all(t >= 0) and torch.isfinite(t).all()
        assert abs(float(t.norm()) - 1.0) < 1e-5  # per-layer L2 normalisation (Michel et al.)
    assert len({round(float(x), 6) for x in fs[0]}) > 1  # a real signal, not a constant


@pytest.mark.parametrize("by", ["random", "importance"])
def test_cli_writes_a_spec_that_applies(by, tmp_path, capsys):
    model = make_checkpoint(tmp_path / "m", "bert", layers=3, heads=4, head_dim=8, ffn=29, seed=4)
    with gzip.open(tmp_path / "train.json.gz", "wt") as f:
        json.dump(_squad(0, 3), f)
    out = tmp_path / "spec.json"
    argv = ["--model", str(model), "--target-sparsity", "0.5", "--by", by, "--out", str(out), "--seq-len", "64"]
    if by == "importance":
        argv += ["--data", str(tmp_path / "train.json.gz"), "--max-windows", "8"]
    assert main(argv) == 0
    ck = load_checkpoint(model)
    cfg, state = apply_spec(ck.state, ck.cfg, parse_spec(out, ck.cfg))
    assert 0.5 <= flop_sparsity(cfg, ck.cfg, 64) <= 0.56
    assert sum(cfg.heads) > 0 and sum(cfg.ffn) > 0
    assert "FLOP sparsity" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    model = make_checkpoint(tmp_path / "m", "bert", layers=2, heads=2, head_dim=8, ffn=9, seed=5)
    with pytest.raises(SystemExit):
        main(["--model", str(model), "--target-sparsity", "0.5", "--by", "importance", "--out", str(tmp_path / "s")])
    assert "--data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(model), "--target-sparsity", "1.5", "--by", "random", "--out", str(tmp_path / "s")])
    assert "(0, 1)" in capsys.readouterr().err
    assert (
        main(
            [
                "--model",
                str(tmp_path / "nope"),
                "--target-sparsity",
                "0.5",
                "--by",
                "random",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 2
    )
