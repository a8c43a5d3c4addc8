"""Precision modes: int8 (per-channel weights; per-token or calibrated static activations) and bf16 Linears.

Tolerances are derived from each scheme, not fitted to measurements; each test states its derivation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.artifact import load_artifact
from engine.qa import QAEngine
from engine.quant import (
    QMAX,
    bf16_model,
    dequantize_per_channel,
    dequantize_per_token,
    int8_model,
    quantize_per_channel,
    quantize_per_token,
)
from tests.conftest import needs_exact_int8
from tests.quant.helpers import (
    NEEDS_INT8,
    U_BF16,
    capture_inputs,
    fp32_model,
    int8_layer_bound,
    int8_linear_inputs,
    layer_errors,
    packed,
)

pytestmark = NEEDS_INT8


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
    art, ref, model, seen = int8_linear_inputs(artifacts[arch, kind], artifacts[arch, "float32"])
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


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_bf16_within_roundoff_of_fp32(artifacts, arch):
    """A layer's output passes through at most 14 bf16 roundings, each relative <= u = 2^-9: the input, weight
    and output of 4 GEMMs (12) and the stored LayerNorm parameters (2). With unit gains through attention, GELU
    and LayerNorm, first-order errors add: per layer <= 14u = 7·2^-8. The logits add the embeddings' and QA head's
    storage roundings to every layer's: <= (2 + 14 L) u."""
    art = load_artifact(artifacts[arch, "bfloat16"])
    ref = fp32_model(artifacts[arch, "float32"])
    model = bf16_model(art.cfg, art.state)
    errs, logit_err = layer_errors(ref, model, art.cfg)
    assert max(errs) <= 14 * U_BF16, errs
    assert logit_err <= (2 + 14 * art.cfg.num_layers) * U_BF16
    assert logit_err > 0
    ids, types, cu, ms = packed(art.cfg, [30, 7])
    with torch.no_grad():
        seen = capture_inputs(model, lambda: model(ids, types, cu, ms))
        assert len(seen) == 8
        for mod, x in seen.values():  # the GEMMs really ran in bf16: outputs are bf16 numbers
            y = mod(x)
            assert y.dtype == torch.float32 and torch.equal(y, y.bfloat16().float())


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_int8_dynamic_within_step_of_fp32(artifacts, arch):
    art = load_artifact(artifacts[arch, "int8"])
    ref = fp32_model(artifacts[arch, "float32"])
    errs, logit_err = layer_errors(ref, int8_model(art.cfg, art.state, art.quantization), art.cfg)
    bounds = [int8_layer_bound(art.cfg, l) for l in range(art.cfg.num_layers)]
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
