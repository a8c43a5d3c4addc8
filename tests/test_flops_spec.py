"""FLOP counting (docs/DESIGN.md formula), pruning-spec parsing rules, and packing utilities."""

from __future__ import annotations

import pytest
import torch

from engine.config import EncoderConfig
from engine.flops import encoder_flops, encoder_flops_varlen, flop_sparsity
from engine.packing import cu_seqlens_from_lengths, lengths_from_mask, pack, positions, unpack
from engine.spec import SpecError, parse_spec

CFG = EncoderConfig("bert", 100, 384, 32, (12,) * 6, (1536,) * 6, 512, 2, 1e-12, "gelu", 0)


def test_flops_by_hand():
    d, dh, S = 384, 32, 128
    per_token = lambda h, f: 2 * d * 3 * h * dh + 2 * 2 * S * h * dh + 2 * h * dh * d + 2 * 2 * d * f  # noqa: E731
    cfg = CFG.with_shape((12, 0, 3), (0, 7, 1536))
    assert encoder_flops(cfg, 2, S) == 2 * S * (per_token(12, 0) + per_token(0, 7) + per_token(3, 1536))
    assert encoder_flops_varlen(cfg, [S, S, 0]) == encoder_flops(cfg, 2, S)


def test_minilm_half_is_about_2x():
    half = CFG.with_shape((12, 8, 4, 6, 2, 0), (1150, 957, 771, 580, 575, 575))
    assert 1 / (1 - flop_sparsity(half, CFG, 384)) == pytest.approx(2.1, abs=0.02)


def test_spec_rules():
    cfg = CFG.with_shape((4, 4), (10, 10))
    s = parse_spec({"layers": [{"heads": [3, 0]}, {"ffn": []}]}, cfg)
    assert s.layers[0].heads == (0, 3) and s.layers[0].ffn == tuple(range(10))  # sorted; missing key keeps all
    assert s.layers[1].heads == (0, 1, 2, 3) and s.layers[1].ffn == ()
    for bad, msg in [
        ({"layers": [{}]}, "spec has 1 layers but the model has 2"),
        ({"layers": [{"heads": [4]}, {}]}, "keeps head 4, but the model has 4 heads (0-3)"),
        ({"layers": [{}, {"ffn": [2, 2]}]}, "lists FFN unit 2 twice"),
        ({"layers": [{}, {"heads": [True]}]}, "list of integers"),
        ({"layers": [{}, {}], "x": 1}, "exactly one key"),
        ({"layers": [{}, {"ffn_units": []}]}, "unknown key(s) ['ffn_units']"),
    ]:
        with pytest.raises(SpecError) as ei:
            parse_spec(bad, cfg)
        assert msg in str(ei.value)


def test_packing_round_trip():
    lengths = torch.tensor([3, 0, 5, 1])
    x = torch.randn(4, 6, 2)
    cu = cu_seqlens_from_lengths(lengths)
    assert cu.tolist() == [0, 3, 3, 8, 9] and cu.dtype == torch.int32
    packed = pack(x, lengths)
    back = unpack(packed, cu, 6, fill=7.0)
    mask = torch.arange(6)[None] < lengths[:, None]
    assert torch.equal(back[mask], x[mask]) and (back[~mask] == 7.0).all()
    assert positions(cu, 2).tolist() == [2, 3, 4, 2, 3, 4, 5, 6, 2]
    assert lengths_from_mask(mask.long()).tolist() == lengths.tolist()
    with pytest.raises(ValueError):
        lengths_from_mask(torch.tensor([[1, 0, 1]]))
