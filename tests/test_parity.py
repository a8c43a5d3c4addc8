"""Dense parity with stock transformers, and ragged parity with the masked-HF reference (docs/DESIGN.md)."""

from __future__ import annotations

import pytest
import torch

from engine.build_model import build
from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.features import WindowSettings
from engine.qa import QAEngine
from engine.reference import hf_model, masked_hf_model
from engine.spec import parse_spec

ATOL = 1e-4
SMALL = WindowSettings(96, 16, 24)  # tiny models have 128 positions


def _batch(vocab: int, type_vocab: int, lengths: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.randint(5, vocab, (len(lengths), seq), generator=g)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    types = torch.zeros_like(ids)
    if type_vocab > 1:
        types[:, seq // 3 :] = 1
    return ids, mask, types


def _compare(engine: QAEngine, ref: torch.nn.Module, lengths: list[int], seed: int = 0) -> float:
    ids, mask, types = _batch(engine.cfg.vocab_size, engine.cfg.type_vocab_size, lengths, seed)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types)
        s, e = engine.forward(ids, mask, types)
    keep = mask.bool()
    assert torch.isinf(s[~keep]).all(), "padding positions must be -inf"
    return max((s - want.start_logits)[keep].abs().max().item(), (e - want.end_logits)[keep].abs().max().item())


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_dense_parity_tiny(arch, tiny_bert, tiny_roberta, tmp_path):
    src = tiny_bert if arch == "bert" else tiny_roberta
    eng = QAEngine.load(build(src, tmp_path / "a", settings=SMALL), backend="torch")
    assert _compare(eng, hf_model(src), [17, 5, 1, 30], seed=1) < ATOL


def test_dense_parity_real_minilm(minilm, tmp_path):
    eng = QAEngine.load(build(minilm, tmp_path / "a"), backend="torch")
    assert eng.artifact.source["qa_head_initialised"] is True
    assert _compare(eng, hf_model(minilm, "sdpa"), [64, 40], seed=2) < ATOL


def _ragged_spec(cfg, rng: torch.Generator) -> dict:
    """Six layers: dense; 0 heads; 0 FFN; both empty; 1 random head + odd random units (unsorted); 1 head, 0 FFN."""
    h, f = cfg.heads[0], cfg.ffn[0]
    one = [int(torch.randint(h, (1,), generator=rng))]
    odd = torch.randperm(f, generator=rng)[: f // 2 + 1].tolist()
    return {
        "layers": [
            {},
            {"heads": []},
            {"ffn": []},
            {"heads": [], "ffn": []},
            {"heads": one, "ffn": odd},
            {"heads": one, "ffn": []},
        ]
    }


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_ragged_parity_masked_hf(arch, tmp_path):
    from tests.conftest import make_checkpoint

    src = make_checkpoint(tmp_path / "src", arch, layers=6, heads=3, head_dim=8, ffn=29, seed=3)
    cfg = load_checkpoint(src).cfg
    spec = _ragged_spec(cfg, torch.Generator().manual_seed(4))
    # Must include 0 heads, 0 FFN, both at once, and a single head.
    pairs = [(len(lk.heads), len(lk.ffn)) for lk in parse_spec(spec, cfg).layers]
    assert any(h == 0 and f == 0 for h, f in pairs) and any(h == 1 for h, _ in pairs)
    assert any(h == 0 and f > 0 for h, f in pairs) and any(f == 0 and h > 0 for h, f in pairs)
    eng = QAEngine.load(build(src, tmp_path / "a", spec=_write(tmp_path, spec), settings=SMALL), backend="torch")
    assert eng.cfg.heads == tuple(p[0] for p in pairs)
    ref = masked_hf_model(src, parse_spec(spec, cfg))
    assert _compare(eng, ref, [23, 9, 1], seed=5) < ATOL


def test_ragged_parity_real_minilm_half(minilm, tmp_path):
    from tests.conftest import ROOT

    spec = ROOT / "specs" / "minilm-half.json"
    eng = QAEngine.load(build(minilm, tmp_path / "a", spec=spec), backend="torch")
    assert eng.cfg.heads == (12, 8, 4, 6, 2, 0)
    assert eng.cfg.ffn == (1150, 957, 771, 580, 575, 575)
    ref = masked_hf_model(minilm, parse_spec(spec, load_checkpoint(minilm).cfg))
    assert _compare(eng, ref, [48, 20], seed=6) < ATOL


def _write(tmp_path, spec: dict):
    import json

    p = tmp_path / "spec.json"
    p.write_text(json.dumps(spec))
    return p


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_checkpoint_round_trips(arch, tmp_path):
    """Dense: ours -> HF dir loads in stock transformers identically. Ragged: ours -> ragged dir -> same engine."""
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from tests.conftest import make_checkpoint

    src = make_checkpoint(tmp_path / "src", arch, layers=3, heads=2, head_dim=8, ffn=21, seed=7)
    ck = load_checkpoint(src)
    dense_dir = save_checkpoint(
        tmp_path / "dense", ck.cfg, ck.state, ck.hf_config, AutoTokenizer.from_pretrained(src), null_threshold=-1.5
    )
    assert "sparseqa_ragged" not in (dense_dir / "config.json").read_text()
    hf = AutoModelForQuestionAnswering.from_pretrained(str(dense_dir)).eval()
    eng = QAEngine.load(build(dense_dir, tmp_path / "a_dense", settings=SMALL), backend="torch")
    assert eng.artifact.null_threshold == -1.5
    assert _compare(eng, hf, [19, 4], seed=8) < ATOL

    spec = {"layers": [{"heads": [1]}, {"heads": [], "ffn": [20, 3]}, {"ffn": []}]}
    from engine.spec import apply_spec

    rcfg, rstate = apply_spec(ck.state, ck.cfg, parse_spec(spec, ck.cfg))
    ragged_dir = save_checkpoint(tmp_path / "ragged", rcfg, rstate, ck.hf_config, AutoTokenizer.from_pretrained(src))
    back = load_checkpoint(ragged_dir)
    assert back.is_ragged and back.cfg == rcfg
    assert all(torch.equal(back.state[k], rstate[k]) for k in rstate)
    eng_r = QAEngine.load(build(ragged_dir, tmp_path / "a_ragged", settings=SMALL), backend="torch")
    ref = masked_hf_model(src, parse_spec(spec, ck.cfg))
    assert _compare(eng_r, ref, [25, 11], seed=9) < ATOL
