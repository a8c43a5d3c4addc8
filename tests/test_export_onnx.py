"""ONNX export: ORT's logits (unfused and BERT-fused graphs) equal the engine's; fusion finds every layer's heads."""

from __future__ import annotations

import json

import pytest
import torch

from engine.build_model import build
from engine.features import WindowSettings
from tests.conftest import make_checkpoint

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from engine import export_onnx as ex  # noqa: E402  (needs torch.onnx, which is always there; ORT checked above)

ATOL = 1e-4
SMALL = WindowSettings(96, 16, 24)  # tiny models have 128 positions
# Six layers: dense; 0 heads; 0 FFN; both empty; 1 head + some units; 1 head, 0 FFN.
RAGGED = {
    "layers": [
        {},
        {"heads": []},
        {"ffn": []},
        {"heads": [], "ffn": []},
        {"heads": [2], "ffn": [1, 5, 7, 20]},
        {"heads": [0], "ffn": []},
    ]
}
SHAPES = [(3, 48), (1, 5)]  # (batch, seq): neither is the traced (2, 16); the first has padded rows


def _artifact(tmp_path, arch: str, ragged: bool, act: str = "gelu", dtype: str = "float32"):
    if ragged:
        src = make_checkpoint(tmp_path / "src", arch, layers=6, heads=3, head_dim=8, ffn=29, seed=3, act=act)
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps(RAGGED))
    else:
        src = make_checkpoint(tmp_path / "src", arch, layers=3, heads=4, head_dim=8, ffn=37, seed=1, act=act)
        spec = None
    return build(src, tmp_path / "art", spec=spec, settings=SMALL, dtype=dtype)


def _export_and_check(art, tmp_path) -> dict[str, int]:
    from engine.artifact import load_artifact

    a = load_artifact(art)
    onnx_path = ex.export(a, tmp_path / "model.onnx")
    fused, counts = ex.optimize(onnx_path)
    assert fused == tmp_path / "model.fused.onnx"
    for i, (batch, seq) in enumerate(SHAPES):
        diffs = ex.check(a, [onnx_path, fused], seed=i, batch=batch, seq=seq)
        for path, diff in diffs.items():
            assert diff < ATOL, f"{path.name} at {batch}x{seq}: max |diff| {diff:.3g} (inf: padding not -inf)"
    return counts


def _attention_heads(path) -> list[int]:
    """`num_heads` of each fused Attention node, in graph order."""
    import onnx

    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Attention"]
    return [next(a.i for a in n.attribute if a.name == "num_heads") for n in nodes]


@pytest.mark.parametrize("ragged", [False, True], ids=["dense", "ragged"])
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_onnx_matches_engine_and_fuses(arch, ragged, tmp_path):
    art = _artifact(tmp_path, arch, ragged)
    counts = _export_and_check(art, tmp_path)
    heads = (3, 0, 3, 0, 1, 1) if ragged else (4, 4, 4)
    # Every layer with heads becomes one fused Attention node, 1-head layers included; 0-head layers have none.
    assert counts["Attention"] == sum(1 for h in heads if h)
    assert _attention_heads(tmp_path / "model.fused.onnx") == [h for h in heads if h]
    assert counts["EmbedLayerNormalization"] == 1
    ffn = (29, 29, 0, 0, 4, 0) if ragged else (37, 37, 37)
    assert counts["BiasGelu"] == sum(1 for f in ffn if f)
    # Residual + LayerNorm fuses after every real sublayer; a 0-width sublayer keeps a plain LayerNorm(x + b).
    real = sum(1 for h in heads if h) + sum(1 for f in ffn if f)
    assert counts["SkipLayerNormalization"] == real
    assert counts["LayerNormalization"] == 2 * len(heads) - real


@pytest.mark.parametrize("act, fused_op", [("gelu_new", "FastGelu"), ("relu", None)])
def test_other_activations(act, fused_op, tmp_path):
    counts = _export_and_check(_artifact(tmp_path, "bert", False, act=act), tmp_path)
    assert counts["Attention"] == 3
    if fused_op:
        assert counts[fused_op] == 3


def test_half_precision_artifact_exports_in_fp32(tmp_path):
    counts = _export_and_check(_artifact(tmp_path, "bert", True, dtype="bfloat16"), tmp_path)
    assert counts["Attention"] == 4


def test_exported_graph_has_dynamic_padded_io(tmp_path, tiny_bert):
    import onnx

    path = ex.export(build(tiny_bert, tmp_path / "art", settings=SMALL), tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == list(ex.INPUTS)
    assert [o.name for o in graph.output] == list(ex.OUTPUTS)
    for v in list(graph.input) + list(graph.output):
        dims = v.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "seq"], v.name


def test_padded_model_equals_engine_in_torch(tmp_path):
    """The export module itself (before ONNX) is the engine's function on padded input."""
    from engine.artifact import load_artifact
    from engine.qa import QAEngine

    art = load_artifact(_artifact(tmp_path, "roberta", True))
    model = ex.PaddedQAModel.from_artifact(art)
    eng = QAEngine.load(art.path, backend="torch")
    ids = torch.randint(0, art.cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(33)[None, :] < torch.tensor([33, 20, 7, 1])[:, None]).long()
    types = torch.zeros_like(ids)
    with torch.no_grad():
        got, want = model(ids, mask, types), eng.forward(ids, mask, types)
    for g, w in zip(got, want):
        assert torch.equal(torch.isinf(g), torch.isinf(w))
        assert (g - w)[mask.bool()].abs().max() < ATOL


def test_cli_export_optimize_check(tmp_path, tiny_roberta, capsys):
    art = build(tiny_roberta, tmp_path / "art", settings=SMALL)
    out = tmp_path / "cli.onnx"
    assert ex.main([str(art), str(out), "--optimize", "--check"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and (tmp_path / "cli.fused.onnx").is_file()
    assert "Attention 3" in text and text.count("ok, tolerance") == 2


def test_cli_errors(tmp_path, capsys):
    assert ex.main([str(tmp_path / "nope"), str(tmp_path / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert ex.main([str(tmp_path / "empty"), str(tmp_path / "m.onnx")]) == 2
    assert "engine.json" in capsys.readouterr().err
    assert ex.main([str(tmp_path / "empty"), str(tmp_path / "m.txt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
