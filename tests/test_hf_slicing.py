"""bench.hf_slicing (the "HF sliced" provider) against the masked-HF reference, and the GPU bench's CPU-side helpers."""

from __future__ import annotations

import pytest
import torch

from bench.hf_slicing import NoHeads, sliced_hf_model
from engine.checkpoint import load_checkpoint
from engine.reference import masked_hf_model
from engine.spec import parse_spec

# tiny_bert / tiny_roberta: 3 layers, 4 heads of 8, FFN 37.
SPEC = {
    "layers": [
        {"heads": [3, 0], "ffn": list(range(36, 7, -1))},  # 2 heads, 29 units, out of order
        {"heads": [], "ffn": [5]},  # no heads, 1 unit
        {"heads": [2], "ffn": []},
    ]
}  # 1 head, no FFN


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_sliced_equals_masked(arch, attn, tiny_bert, tiny_roberta):
    src = tiny_bert if arch == "bert" else tiny_roberta
    spec = parse_spec(SPEC, load_checkpoint(src).cfg)
    sliced, masked = sliced_hf_model(src, spec, attn), masked_hf_model(src, spec, attn)
    att = sliced.base_model.encoder.layer
    assert isinstance(att[1].attention.self, NoHeads)
    assert att[0].attention.self.query.out_features == 16 and att[0].intermediate.dense.out_features == 29
    assert att[2].attention.self.num_attention_heads == 1 and att[2].output.dense.in_features == 0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (3, 40), generator=g)
    mask = (torch.arange(40)[None, :] < torch.tensor([40, 17, 1])[:, None]).long()
    with torch.no_grad():
        a = sliced(input_ids=ids, attention_mask=mask)
        b = masked(input_ids=ids, attention_mask=mask)
    keep = mask.bool()
    for x, y in ((a.start_logits, b.start_logits), (a.end_logits, b.end_logits)):
        assert (x - y)[keep].abs().max().item() < 1e-5


def test_sliced_without_spec_is_dense(tiny_bert):
    model = sliced_hf_model(tiny_bert, None, "eager")
    assert model.base_model.encoder.layer[0].attention.self.num_attention_heads == 4


def test_gpu_bench_ragged_spec_halves_flops():
    """The bench's deterministic BERT-base spec: ~50% FLOPs, a 0-head layer, varied FFN widths, valid indices."""
    from bench.gpu_bench import bert_base_config, ragged_spec
    from engine.flops import encoder_flops

    cfg = bert_base_config()
    spec = ragged_spec(cfg)
    assert spec == ragged_spec(cfg)  # deterministic
    pruned = cfg.with_shape(tuple(len(k.heads) for k in spec.layers), tuple(len(k.ffn) for k in spec.layers))
    ratio = encoder_flops(pruned, 1, 384) / encoder_flops(cfg, 1, 384)
    assert abs(ratio - 0.5) < 0.01
    assert 0 in pruned.heads and len(set(pruned.ffn)) > 6
    parse_spec(spec.to_dict(), cfg)  # indices valid for BERT-base


def test_gpu_bench_window_lengths():
    from bench.gpu_bench import window_lengths

    lengths, source = window_lengths(32)
    assert len(lengths) == 32 and all(1 <= n <= 384 for n in lengths)
    assert lengths == window_lengths(32)[0] and source
