"""Precision modes: int8 (per-channel weights; per-token or calibrated static activations) and bf16 Linears.

Tolerances are derived from each scheme, not fitted to measurements; each test states its derivation.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from engine.artifact import load_artifact
from engine.build_model import build, main
from engine.features import WindowSettings
from engine.manifest import ArtifactError
from engine.model import RaggedQAModel
from engine.packing import cu_seqlens_from_lengths
from engine.qa import QAEngine
from engine.quant import (
    QMAX,
    BF16Linear,
    Int8LinearDynamic,
    Int8LinearStatic,
    bf16_model,
    dequantize_per_channel,
    dequantize_per_token,
    int8_kernels_available,
    int8_model,
    quantize_per_channel,
    quantize_per_token,
)
from tests.conftest import data_root, needs_exact_int8

SMALL = WindowSettings(96, 16, 24)
U_BF16 = 2.0**-9  # unit roundoff of bf16 (8 significant bits, round to nearest) = 2^-8 / 2
pytestmark = pytest.mark.skipif(
    not int8_kernels_available(torch.device("cpu")), reason="this torch build has no oneDNN int8 linear"
)

# Layer 0 keeps 2 of 4 heads, layer 1 is empty (0 heads, 0 FFN units), layer 2 keeps 1 FFN unit.
RAGGED = {"layers": [{"heads": [3, 1]}, {"heads": [], "ffn": []}, {"ffn": [0]}]}


def _synthetic_squad(n_paragraphs: int = 4) -> dict:
    """A tiny SQuAD 2.0 file in the words of the tiny tokenizers: answerable and unanswerable questions."""
    paragraphs = []
    for i in range(n_paragraphs):
        context = (
            f"the normans conquered england in {1066 + i} after the battle of hastings. "
            f"william was born in paris and died in london. the river of the city is water number {i}."
        )
        start = context.index(str(1066 + i))
        paragraphs.append(
            {
                "context": context,
                "qas": [
                    {
                        "id": f"q{i}a",
                        "question": "when was england conquered by the normans?",
                        "is_impossible": False,
                        "answers": [{"text": str(1066 + i), "answer_start": start}],
                    },
                    {"id": f"q{i}b", "question": "who was the queen of france?", "is_impossible": True, "answers": []},
                ],
            }
        )
    return {"version": "v2.0", "data": [{"title": "Normans", "paragraphs": paragraphs}]}


@pytest.fixture(scope="module")
def squad_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("squad") / "tiny-squad.json"
    path.write_text(json.dumps(_synthetic_squad()))
    return path


def precision_artifacts(tiny_bert: Path, tiny_roberta: Path, spec: Path, squad: Path, root: Path) -> dict:
    """(arch, kind) -> artifact dir of both tiny models cut to `spec`, in float32, bfloat16, int8 (dynamic scales)
    and "int8s" (static scales calibrated on `squad`)."""
    out = {}
    for arch, src in (("bert", tiny_bert), ("roberta", tiny_roberta)):
        for kind, dtype, cal in (
            ("float32", "float32", None),
            ("bfloat16", "bfloat16", None),
            ("int8", "int8", None),
            ("int8s", "int8", squad),
        ):
            out[arch, kind] = build(src, root / f"{arch}-{kind}", spec=spec, dtype=dtype, settings=SMALL, calibrate=cal)
    return out


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "spec.json"
    path.write_text(json.dumps(RAGGED))
    return path


@pytest.fixture(scope="module")
def artifacts(tiny_bert, tiny_roberta, spec_file, squad_file, tmp_path_factory):
    """(arch, dtype) -> artifact dir; every model ragged with a 0-head/0-FFN layer. "int8s" = static scales."""
    return precision_artifacts(tiny_bert, tiny_roberta, spec_file, squad_file, tmp_path_factory.mktemp("quant_arts"))


def _packed(cfg, lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (sum(lengths),), generator=g)
    types = torch.zeros_like(ids)
    return ids, types, cu_seqlens_from_lengths(lengths), max(lengths)


def _fp32_model(path) -> RaggedQAModel:
    art = load_artifact(path)
    model = RaggedQAModel(art.cfg).eval()
    model.load_state_dict({k: v.float() for k, v in art.state.items()})
    return model


# ---- quantize / dequantize -------------------------------------------------------------------------------------------

# Computing w / scale and q * scale in fp32 adds at most a few ulps of values up to 127·scale, i.e. about
# 127 · 2^-23 · scale < 2^-15 · scale on top of the scheme's half step.
_FP32_SLACK = 2.0**-15


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (37, 96), (384, 1536), (5, 0), (0, 8)])
def test_weight_round_trip_within_half_step(shape):
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[0])[:, None] if shape[0] else torch.randn(shape)
    if shape[0] > 2:
        w[1] = 0.0  # an all-zero row
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (shape[0],)
    assert q.numel() == 0 or (q.min() >= -QMAX and q.max() <= QMAX)  # symmetric: -128 is never produced
    assert torch.isfinite(scale).all() and (scale > 0).all()
    err = (w - dequantize_per_channel(q, scale)).abs()
    assert (err <= scale[:, None] * (0.5 + _FP32_SLACK)).all()
    if shape[0] > 2:
        assert (q[1] == 0).all()
    if q.numel():  # the largest |w| of each non-zero row maps to ±127 exactly
        assert (q.abs().amax(1)[w.abs().amax(1) > 0] == QMAX).all()


@pytest.mark.parametrize("shape", [(1, 384), (17, 5), (300, 37), (3, 1536)])
def test_token_round_trip_within_half_step(shape):
    x = torch.randn(shape) * torch.logspace(-4, 2, shape[0])[:, None]
    x[0] = 0.0  # an all-zero token
    q, scale = quantize_per_token(x)
    assert q.dtype == torch.int8 and scale.shape == (shape[0],)
    assert q.min() >= -QMAX and q.max() <= QMAX and (q[0] == 0).all() and torch.isfinite(scale).all()
    err = (x - dequantize_per_token(q, scale)).abs()
    assert (err <= scale[:, None] * (0.5 + _FP32_SLACK)).all()


# ---- every int8 Linear of a model against the scheme -----------------------------------------------------------------


def _capture_inputs(model: torch.nn.Module, run) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """name -> (module, its input) for every quantized / bf16 Linear the forward `run()` calls."""
    seen: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {}

    def hook(name: str, mod: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:  # None: inputs unchanged
        seen.setdefault(name, (mod, args[0].detach().clone()))

    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=n: hook(n, mod, args))
        for n, m in model.named_modules()
        if isinstance(m, (Int8LinearDynamic, Int8LinearStatic, BF16Linear))
    ]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


@needs_exact_int8
@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("kind", ["int8", "int8s"])
def test_int8_linears_match_integer_product_and_scheme_bound(artifacts, arch, kind):
    """Each int8 Linear, on the inputs it sees inside the ragged model, computes exactly the scheme's integer product,
    and its error against the fp32 Linear obeys the scheme's bound.

    Write x = s_x (q + d) and W' = s_w (Q + e) with |e| <= 1/2 (weights round to nearest). Dynamic: s_x = max|x_t|/127
    per token and W' = W. Static: s_x = c per input channel, folded into W' = W diag(c) (the kernel sees s_x = 1).
    The exact output minus ours is s_x s_w Σ_k (d Q + q e + d e), hence
        |Δy[t, j]| <= s_x s_w [ Σ_k |d[t, k]| (|Q[j, k]| + 1/2) + Σ_k |q[t, k]| / 2 ].
    Rounding gives |d| <= 1/2; a static scale that clips an input beyond the calibrated range gives a larger |d|,
    which the bound takes as measured.
    """
    art, ref, model, seen = _int8_linear_inputs(artifacts[arch, kind], artifacts[arch, "float32"])
    with torch.no_grad():
        assert len(seen) == 8  # layers 0 and 2 run all four Linears (layer 2's FFN has 1 unit); layer 1 runs none
        for name, (mod, x) in seen.items():
            y = mod(x).double()
            Q = art.state[name + ".weight"].double()  # (out, in)
            s_w = art.state[name + ".weight_scale"].double()
            bias = art.state[name + ".bias"].double()
            if kind == "int8":
                q, s_x = quantize_per_token(x)
                q, s_x = q.double(), s_x.double()[:, None]  # (T, in), (T, 1)
                d = x.double() / s_x - q
                sigma = s_x * s_w[None, :]  # (T, out)
            else:
                c = art.state[name + ".input_scale"]
                # The module multiplies by 1/c; x / c may round the other way at an exact tie, so do the same here.
                q = torch.round(x * (1.0 / c)).clamp(-QMAX, QMAX).double()
                d = x.double() / c.double() - q
                sigma = s_w[None, :].expand(x.shape[0], -1)
            integer = (q @ Q.t()) * (sigma if kind == "int8" else s_w[None, :]) + bias
            # fp32 epilogue (scale multiply, bias add): a few ulps of the largest term.
            mag = sigma * (q.abs() @ Q.abs().t()) + bias.abs()
            assert ((y - integer).abs() <= 1e-5 * mag + 1e-30).all(), name
            lin = ref.get_submodule(name)
            want = F.linear(x.double(), lin.weight.double(), lin.bias.double())
            bound = sigma * (d.abs() @ (Q.abs() + 0.5).t() + q.abs().sum(1, keepdim=True) / 2)
            assert ((y - want).abs() <= bound * (1 + 1e-5) + 1e-5 * mag).all(), name
            if kind == "int8":
                assert d.abs().max() <= 0.5 + 1e-4  # per-token scales never clip


# ---- whole models against fp32 ---------------------------------------------------------------------------------------


def _int8_linear_inputs(int8_path, fp32_path):
    """(int8 artifact, fp32 reference model, int8 model, {linear name: (module, input)}) from one forward of the int8
    model on a ragged packed batch."""
    art = load_artifact(int8_path)
    ref = _fp32_model(fp32_path)
    model = int8_model(art.cfg, art.state, art.quantization)
    ids, types, cu, ms = _packed(art.cfg, [37, 5, 60, 1, 23])
    with torch.no_grad():
        seen = _capture_inputs(model, lambda: model(ids, types, cu, ms))
    return art, ref, model, seen


def _layer_errors(ref: RaggedQAModel, model: RaggedQAModel, cfg) -> tuple[list[float], float]:
    """Teacher-forced relative error of each layer's output (same fp32 input to both), and of the logits."""
    ids, types, cu, ms = _packed(cfg, [37, 5, 60, 1, 23], seed=3)
    errs = []
    with torch.no_grad():
        h = ref.embeddings(ids, types, cu)
        for l in range(cfg.num_layers):
            want, got = ref.layers[l](h, cu, ms), model.layers[l](h, cu, ms)
            errs.append(((got - want).norm() / want.norm()).item())
            h = want
        s0, e0 = ref(ids, types, cu, ms)
        s1, e1 = model(ids, types, cu, ms)
    want, got = torch.cat([s0, e0]), torch.cat([s1, e1])
    return errs, ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_bf16_within_roundoff_of_fp32(artifacts, arch):
    """A layer's output passes through at most 14 bf16 roundings, each relative <= u = 2^-9: the input, weight
    and output of 4 GEMMs (12) and the stored LayerNorm parameters (2). With unit gains through attention, GELU
    and LayerNorm, first-order errors add: per layer <= 14u = 7·2^-8. The logits add the embeddings' and QA head's
    storage roundings to every layer's: <= (2 + 14 L) u."""
    art = load_artifact(artifacts[arch, "bfloat16"])
    ref = _fp32_model(artifacts[arch, "float32"])
    model = bf16_model(art.cfg, art.state)
    errs, logit_err = _layer_errors(ref, model, art.cfg)
    assert max(errs) <= 14 * U_BF16, errs
    assert logit_err <= (2 + 14 * art.cfg.num_layers) * U_BF16
    assert logit_err > 0
    ids, types, cu, ms = _packed(art.cfg, [30, 7])
    with torch.no_grad():
        seen = _capture_inputs(model, lambda: model(ids, types, cu, ms))
        assert len(seen) == 8
        for mod, x in seen.values():  # the GEMMs really ran in bf16: outputs are bf16 numbers
            y = mod(x)
            assert y.dtype == torch.float32 and torch.equal(y, y.bfloat16().float())


def _int8_layer_bound(cfg, layer: int) -> float:
    """Worst-case first-order relative error of one layer under per-token / per-channel int8.

    Each element of an operand row is off by at most half its step, max|row| / 254, so a row of k elements is off by
    at most sqrt(k) max|row| / 254 <= sqrt(k) ||row|| / 254 in norm. A GEMM has two operands (activation row, weight
    row): relative <= 2 sqrt(k) / 254 = sqrt(k) / 127. A layer sums its GEMMs (unit gains, as for bf16).
    """
    w, f, d = cfg.heads[layer] * cfg.head_dim, cfg.ffn[layer], cfg.hidden
    gemms = ([d, w] if w else []) + ([d, f] if f else [])  # inner dimension of qkv, o, ffn_in, ffn_out
    return sum(math.sqrt(k) / QMAX for k in gemms)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_int8_dynamic_within_step_of_fp32(artifacts, arch):
    art = load_artifact(artifacts[arch, "int8"])
    ref = _fp32_model(artifacts[arch, "float32"])
    errs, logit_err = _layer_errors(ref, int8_model(art.cfg, art.state, art.quantization), art.cfg)
    bounds = [_int8_layer_bound(art.cfg, l) for l in range(art.cfg.num_layers)]
    assert all(e <= b for e, b in zip(errs, bounds)), (errs, bounds)
    assert errs[1] <= 1e-6  # the empty layer has no GEMM: LayerNorm(x + b) in fp32 on both sides
    assert logit_err <= sum(bounds)


def test_ragged_precisions_answer_questions(artifacts):
    """bf16 and int8 engines over the 0-head / 0-FFN model run end to end through QAEngine (torch backend)."""
    q, c = "when was england conquered?", "the normans conquered england in 1066 after the battle of hastings."
    for kind in ("float32", "bfloat16", "int8", "int8s"):
        eng = QAEngine.load(artifacts["bert", kind], backend="torch")
        a = eng.answer(q, c, null_threshold=float("inf"))
        assert c[a.start : a.end] == a.text and math.isfinite(a.score)


# ---- calibration -----------------------------------------------------------------------------------------------------


def test_static_artifact_layout_and_calibration_provenance(artifacts, squad_file):
    art = load_artifact(artifacts["bert", "int8s"])
    m = json.loads((artifacts["bert", "int8s"] / "engine.json").read_text())
    assert m["format_version"] == 2 and m["dtype"] == "int8"
    assert m["quantization"]["kernels"] == ["int8_gemm_static"]
    cal = m["quantization"]["calibration"]
    assert cal["examples"] == 8 and cal["windows"] >= 8 and cal["tokens"] > 0 and cal["file"].endswith("squad.json")
    for name, shape in (("layers.0.qkv", (3 * 16, 32)), ("layers.0.ffn_out", (32, 37)), ("layers.1.o", (32, 0))):
        assert art.state[name + ".weight"].dtype == torch.int8 and tuple(art.state[name + ".weight"].shape) == shape
        assert art.state[name + ".weight_scale"].shape == (shape[0],)
        assert art.state[name + ".input_scale"].shape == (shape[1],)
    dyn = json.loads((artifacts["bert", "int8"] / "engine.json").read_text())
    assert dyn["quantization"]["kernels"] == ["int8_gemm_per_token"] and dyn["quantization"]["calibration"] is None
    assert not any(k.endswith("input_scale") for k in load_artifact(artifacts["bert", "int8"]).state)
    assert json.loads((artifacts["bert", "bfloat16"] / "engine.json").read_text())["format_version"] == 1


def test_calibration_on_real_dev_text(tiny_bert, tmp_path):
    root = data_root()
    dev = root / "squad2" / "dev-v2.0.json.gz" if root else None
    if dev is None or not dev.is_file():
        pytest.skip("real SQuAD 2.0 dev set not found")
    out = build(tiny_bert, tmp_path / "a", dtype="int8", settings=SMALL, calibrate=dev, calib_samples=6)
    cal = json.loads((out / "engine.json").read_text())["quantization"]["calibration"]
    assert cal["examples"] == 6 and cal["windows"] >= 6  # real paragraphs need several 96-token windows
    eng = QAEngine.load(out, backend="torch")
    assert eng.answer("Who ruled Normandy?", "Rollo ruled Normandy in the 10th century.").start >= 0


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "content, samples, expect",
    [
        ({"version": "v2.0", "data": []}, 4, "holds no examples"),
        ({"data": [{"title": "t", "paragraphs": []}]}, 4, "holds no examples"),
        ({"rows": [1, 2]}, 4, "not in SQuAD format"),
        ({"data": [{"title": "t", "paragraphs": [{"text": "no context key"}]}]}, 4, "does not follow the SQuAD schema"),
        ([1, 2, 3], 4, "not in SQuAD format"),
        ("{broken", 4, "not a readable SQuAD JSON file"),
        (_synthetic_squad(1), 0, "--calib-samples must be >= 1"),
    ],
)
def test_calibration_rejects_bad_files(tiny_bert, tmp_path, capsys, content, samples, expect):
    path = tmp_path / "cal.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    code, err = _cli(
        capsys,
        "--model",
        tiny_bert,
        "--out",
        tmp_path / "o",
        "--dtype",
        "int8",
        "--calibrate",
        path,
        "--calib-samples",
        samples,
        "--max-seq-length",
        96,
        "--doc-stride",
        16,
    )
    assert code == 2 and expect in err and err.count("\n") == 0, err
    assert not (tmp_path / "o").exists()


def test_calibration_flag_errors(tiny_bert, tmp_path, capsys, squad_file):
    base = ("--model", tiny_bert, "--out", tmp_path / "o", "--max-seq-length", 96, "--doc-stride", 16)
    code, err = _cli(capsys, *base, "--calibrate", squad_file)
    assert code == 2 and "--calibrate applies to --dtype int8 only" in err
    code, err = _cli(capsys, *base, "--dtype", "int8", "--calib-samples", 3)
    assert code == 2 and "--calib-samples needs --calibrate" in err
    code, err = _cli(capsys, *base, "--dtype", "int8", "--calibrate", tmp_path / "nope.json")
    assert code == 2 and "does not exist" in err


# ---- malformed int8 artifacts and kernels ----------------------------------------------------------------------------


def _edit(path, fn_manifest=None, fn_tensors=None):
    if fn_manifest:
        m = json.loads((path / "engine.json").read_text())
        fn_manifest(m)
        (path / "engine.json").write_text(json.dumps(m))
    if fn_tensors:
        t = load_file(str(path / "weights.safetensors"))
        fn_tensors(t)
        save_file(t, str(path / "weights.safetensors"))


def _set(d, key, value):
    d[key] = value


@pytest.mark.parametrize(
    "kind, manifest, tensors, expect",
    [
        ("int8", None, lambda t: t.pop("layers.0.o.weight_scale"), "tensor 'layers.0.o.weight_scale' is missing"),
        (
            "int8",
            None,
            lambda t: _set(t, "layers.2.ffn_in.weight_scale", torch.ones(2)),
            "'layers.2.ffn_in.weight_scale' has shape (2,), expected (1,)",
        ),
        ("int8", None, lambda t: _set(t, "layers.0.qkv.weight_scale", -torch.ones(48)), "must be positive and finite"),
        (
            "int8",
            None,
            lambda t: _set(t, "layers.0.qkv.input_scale", torch.ones(32)),
            "unexpected tensor 'layers.0.qkv.input_scale'",
        ),
        (
            "int8",
            None,
            lambda t: _set(t, "layers.0.o.weight", t["layers.0.o.weight"].float()),
            "'layers.0.o.weight' has dtype F32, expected I8",
        ),
        (
            "int8",
            None,
            lambda t: _set(t, "layers.0.o.bias", t["layers.0.o.bias"].to(torch.int8)),
            "'layers.0.o.bias' has dtype I8, expected F32",
        ),
        ("int8", None, lambda t: t["layers.0.qkv.weight"].view(-1).__setitem__(0, -128), "holds -128"),
        ("int8s", None, lambda t: t.pop("layers.2.ffn_out.input_scale"), "'layers.2.ffn_out.input_scale' is missing"),
        (
            "int8s",
            None,
            lambda t: _set(t, "layers.0.o.input_scale", torch.ones(32)),
            "'layers.0.o.input_scale' has shape (32,), expected (16,)",
        ),
        ("int8", lambda m: m.pop("quantization"), None, "missing field(s) ['quantization']"),
        ("int8", lambda m: _set(m, "format_version", 1), None, "dtype 'int8' needs format_version 2"),
        ("int8", lambda m: _set(m, "dtype", "float32"), None, "format_version 2 is for int8 artifacts"),
        (
            "int8",
            lambda m: _set(m["quantization"], "kernels", ["int4_gemm"]),
            None,
            "requires kernel(s) ['int4_gemm'] that this SparseQA does not know",
        ),
        (
            "int8",
            lambda m: _set(m["quantization"], "kernels", ["int8_gemm_static"]),
            None,
            "need kernels ['int8_gemm_per_token']",
        ),
        ("int8", lambda m: _set(m["quantization"], "activations", "per_tensor"), None, "activations is 'per_tensor'"),
        ("int8s", lambda m: _set(m["quantization"], "calibration", None), None, "need a 'calibration' object"),
        ("int8", lambda m: _set(m["quantization"], "weights", "int4_groupwise"), None, "weights is 'int4_groupwise'"),
        ("int8", lambda m: _set(m["quantization"], "extra", 1), None, "unknown key(s) ['extra']"),
    ],
)
def test_malformed_int8_artifacts(artifacts, tmp_path, kind, manifest, tensors, expect):
    path = tmp_path / "a"
    shutil.copytree(artifacts["bert", kind], path)
    _edit(path, manifest, tensors)
    with pytest.raises(ArtifactError) as ei:
        load_artifact(path)
    assert expect in str(ei.value)


def test_backend_without_int8_kernels_is_refused(artifacts, monkeypatch):
    import engine.runtime.cpp_backend as cb
    import engine.runtime.torch_backend as tb

    path = artifacts["bert", "int8"]
    if "triton" in __import__("engine.runtime", fromlist=["x"]).available_backends("cpu"):
        with pytest.raises(RuntimeError, match=r"needs kernel\(s\) \['int8_gemm_per_token'\]"):
            QAEngine.load(path, backend="triton")
    monkeypatch.setattr(tb, "supported_kernels", lambda device: frozenset())
    monkeypatch.setattr(cb, "supported_kernels", lambda device: frozenset())  # the cpp backend runs them too
    with pytest.raises(RuntimeError, match="provides the kernels"):
        QAEngine.load(path, backend="auto")
    with pytest.raises(RuntimeError, match="Backends that can: \\[\\]"):
        QAEngine.load(path, backend="torch")
    QAEngine.load(artifacts["bert", "bfloat16"], backend="torch")  # float artifacts need no special kernel


def test_evaluate_runs_bf16_and_int8_artifacts(artifacts, squad_file):
    from engine.evaluate import evaluate_artifact

    for kind in ("bfloat16", "int8", "int8s"):
        m = evaluate_artifact(artifacts["bert", kind], squad_file, backend="torch", progress=False)
        assert m["questions"] == 8 and m["backend"] == "torch" and 0 <= m["at_zero"]["f1"] <= 100
