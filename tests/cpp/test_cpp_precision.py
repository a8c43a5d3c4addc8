"""bf16 and int8 compute in the C++ engine (docs/PRECISION.md, docs/CPP.md) against the torch backend and fp32.

The cpp backend runs the scheme of engine/quant.py: the same quantization arithmetic, the same oneDNN GEMMs, fp32
everywhere else. The tests check it at three levels:
- each Linear on the inputs it sees inside the model, against the torch module and the scheme's integer product:
  sharp, since the inputs are identical;
- whole-model logits against the torch backend on the same artifact, up to the noise floor that fp32-level
  differences in the other kernels cause (derived in `_noise_floor`);
- whole-model logits against the fp32 model, within the scheme-derived bounds of tests/quant/test_quant.py.
Ragged tiny BERT and RoBERTa models with a 0-head / 0-FFN layer, dynamic and static int8, bf16; skips when engine._C
is not built or this torch has no oneDNN int8 linear.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

_C = pytest.importorskip("engine._C", reason="engine._C is not built (C++ toolchain or deps missing at install)")

from engine.artifact import load_artifact  # noqa: E402
from engine.build_model import build  # noqa: E402
from engine.manifest import KNOWN_KERNELS  # noqa: E402
from engine.qa import QAEngine  # noqa: E402
from engine.quant import QMAX, int8_kernels_available, quantize_per_token  # noqa: E402
from engine.runtime import (  # noqa: E402
    REGISTRY,
    _missing_kernels,
    cpp_backend,  # noqa: E402
    create_backend,
)
from tests.conftest import NO_BF16_GEMM, needs_bf16_gemm, needs_exact_int8  # noqa: E402
from tests.quant.helpers import (  # noqa: E402
    RAGGED,
    U_BF16,
    capture_inputs,
    int8_layer_bound,
    int8_linear_inputs,
    packed,
    precision_artifacts,
    synthetic_squad,
)

pytestmark = pytest.mark.skipif(
    not int8_kernels_available(torch.device("cpu")) or not _C.supported_kernels(),
    reason="this torch build has no oneDNN int8 linear",
)

KINDS = ("int8", "int8s", "bfloat16")  # int8s: static (calibrated) activation scales
PRECISION = {
    "float32": "float32",
    "bfloat16": "bfloat16",
    "int8": "int8_dynamic_per_token",
    "int8s": "int8_static_per_input_channel",
}
LENGTHS = [37, 5, 60, 1, 23, 96]
NOISE = 1e-6  # relative: the order of the fp32 differences between the cpp and torch kernels (attention, LN, GELU)


@pytest.fixture(scope="module")
def artifacts(tiny_bert, tiny_roberta, tmp_path_factory):
    """(arch, kind) -> artifact dir; every model ragged with a 0-head/0-FFN layer (tests/quant/helpers.py RAGGED)."""
    root = tmp_path_factory.mktemp("cpp_precision")
    spec, squad = root / "spec.json", root / "squad.json"
    spec.write_text(json.dumps(RAGGED))
    squad.write_text(json.dumps(synthetic_squad()))
    return precision_artifacts(tiny_bert, tiny_roberta, spec, squad, root)


def _logits(backend, ids, types, cu, ms) -> torch.Tensor:
    return torch.cat(backend.forward_packed(ids, types, cu, ms))


def _noise_floor(torch_backend, ids, types, cu, ms, trials: int = 3) -> float:
    """How far the torch backend's logits move when its embeddings get relative noise NOISE (largest L2 distance over
    `trials` seeds).

    Why the cpp and torch logits cannot agree to fp32 precision: their attention, LayerNorm and GELU kernels differ in
    fp32 rounding, and a bf16 / int8 rounding of a value that close to a boundary goes the other way, a full step
    (twice the largest error the scheme makes there). That moves every later input by far more than fp32 noise, so
    further roundings flip downstream; on MiniLM at 384 tokens the torch backend alone moves by about half its own
    bf16 / int8 error under 1e-7 relative noise. This measures that amplification on the torch side; the cpp backend,
    a different perturbation of the same size, must stay within twice it.
    """
    base = _logits(torch_backend, ids, types, cu, ms)
    emb = torch_backend.model.embeddings
    orig = emb.forward
    worst = 0.0
    for trial in range(trials):
        gen = torch.Generator().manual_seed(1000 + trial)
        emb.forward = lambda *a, **k: (lambda h: h * (1 + NOISE * torch.randn(h.shape, generator=gen)))(orig(*a, **k))
        try:
            worst = max(worst, (_logits(torch_backend, ids, types, cu, ms) - base).norm().item())
        finally:
            emb.forward = orig
    return worst


# ---- kernels, precision, registry ------------------------------------------------------------------------------------


@needs_bf16_gemm
def test_kernels_and_precision(artifacts):
    assert set(_C.supported_kernels()) == set(KNOWN_KERNELS) == set(_C.supported_kernels("cpu"))
    assert _C.supported_kernels("cuda") == []
    assert cpp_backend.supported_kernels(torch.device("cpu")) == KNOWN_KERNELS
    assert cpp_backend.supported_kernels(torch.device("cuda")) == frozenset()
    for (arch, kind), path in artifacts.items():
        assert _C.Engine.load(str(path)).precision == PRECISION[kind], (arch, kind)


@pytest.mark.parametrize("kind", ["bfloat16", "int8", "int8s"])
def test_auto_picks_cpp_and_answers(artifacts, kind):
    """On CPU, `auto` runs int8 (and bf16) artifacts on the cpp backend once it declares the kernels."""
    if kind == "bfloat16" and NO_BF16_GEMM:
        pytest.skip(needs_bf16_gemm.kwargs["reason"])
    eng = QAEngine.load(artifacts["bert", kind], backend="auto")
    assert eng.backend_name == "cpp"
    q, c = "when was england conquered?", "the normans conquered england in 1066 after the battle of hastings."
    a = eng.answer(q, c, null_threshold=float("inf"))
    assert c[a.start : a.end] == a.text and math.isfinite(a.score)


@needs_bf16_gemm
def test_refused_without_kernels_or_on_cuda(artifacts, monkeypatch):
    art = load_artifact(artifacts["bert", "int8"])
    cpp = next(e for e in REGISTRY if e.name == "cpp")
    # CUDA: libqaengine has no int8 GEMM there; the registry refuses it, and so does the engine itself.
    assert _missing_kernels(cpp, torch.device("cuda"), art) == ["int8_gemm_per_token"]
    with pytest.raises(
        _C.Error,
        match=r"needs kernel\(s\) \['int8_gemm_per_token'\].*does not provide on cuda.*"
        r"CPU only",
    ):
        _C.Engine.load(str(artifacts["bert", "int8"]), "cuda")
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"needs kernel\(s\) \['int8_gemm_per_token'\]"):
            create_backend("cpp", art, "cuda")
    # A build whose torch lacks the oneDNN int8 ops declares no kernels: refused by name, `auto` falls back to torch.
    monkeypatch.setattr(cpp_backend, "supported_kernels", lambda device: frozenset())
    with pytest.raises(
        RuntimeError,
        match=r"backend 'cpp' cannot run this int8 artifact on cpu: it needs "
        r"kernel\(s\) \['int8_gemm_per_token'\].*Backends that can: \['torch'\]",
    ):
        create_backend("cpp", art, "cpu")
    assert QAEngine.load(artifacts["bert", "int8"], backend="auto").backend_name == "torch"
    assert QAEngine.load(artifacts["bert", "bfloat16"], backend="cpp").backend_name == "cpp"  # needs no kernel


# ---- each Linear, on identical inputs --------------------------------------------------------------------------------


def _act_name(cfg) -> str:
    return {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu"}[cfg.activation]


def _torch_act(y: torch.Tensor, name: str) -> torch.Tensor:
    return F.relu(y) if name == "relu" else F.gelu(y, approximate="tanh" if name == "gelu_new" else "none")


@needs_exact_int8
@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("kind", ["int8", "int8s"])
def test_int8_linears_match_torch_and_integer_product(artifacts, arch, kind):
    """Every int8 Linear of the engine, fed the inputs the torch model's Linears see, gives the torch module's output
    and the scheme's integer product up to fp32 epilogue rounding.

    Both quantize x the same way (x · (127 / max|x_t|) or x · (1 / c), rounded to nearest even: bit-identical codes,
    csrc/tests/test_quant.cpp) and run the same exact int32 GEMM; only the fp32 rescale and bias add may round
    differently: a few ulps of the largest term, 1e-5 of it (tests/quant/test_quant.py). With the activation fused
    (ffn_in), the result is the activation of that, within 2e-6 (the erf approximation, <= 1.5e-7 absolute).
    The error against the fp32 Linear obeys the scheme's bound (tests/quant/test_quant.py derives it).
    """
    art, ref, _, seen = int8_linear_inputs(artifacts[arch, kind], artifacts[arch, "float32"])
    assert len(seen) == 8  # layers 0 and 2 run four Linears each; the empty layer 1 none
    for name, (mod, x) in seen.items():
        Q, s_w, bias = (art.state[name + s] for s in (".weight", ".weight_scale", ".bias"))
        c = art.state.get(name + ".input_scale")
        got = _C.testing.int8_linear(x, Q, s_w, bias, c)
        want = mod(x)
        Qd, sd, bd = Q.double(), s_w.double(), bias.double()
        if c is None:
            q, s_x = quantize_per_token(x)
            q, sigma = q.double(), s_x.double()[:, None] * sd[None, :]
            d = x.double() / s_x.double()[:, None] - q
        else:
            q = torch.round(x * (1.0 / c)).clamp(-QMAX, QMAX).double()
            sigma = sd[None, :].expand(x.shape[0], -1)
            d = x.double() / c.double() - q
        mag = sigma * (q.abs() @ Qd.abs().t()) + bd.abs()
        integer = (q @ Qd.t()) * sigma + bd
        assert ((got.double() - integer).abs() <= 1e-5 * mag + 1e-30).all(), name
        assert ((got - want).double().abs() <= 1e-5 * mag + 1e-30).all(), name
        lin = ref.get_submodule(name)
        exact = F.linear(x.double(), lin.weight.double(), lin.bias.double())
        bound = sigma * (d.abs() @ (Qd.abs() + 0.5).t() + q.abs().sum(1, keepdim=True) / 2)
        assert ((got.double() - exact).abs() <= bound * (1 + 1e-5) + 1e-5 * mag).all(), name
        if name.endswith("ffn_in"):
            act = _act_name(art.cfg)
            fused = _C.testing.int8_linear(x, Q, s_w, bias, c, act)
            torch.testing.assert_close(fused, _torch_act(got, act), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("gemm", ["auto", "aten"])
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_bf16_linears_match_torch(artifacts, arch, gemm):
    """Every bf16 Linear of the engine, on the torch model's inputs, gives a bf16 number (the GEMM really ran in bf16)
    within one bf16 ulp of the torch module's output; with gemm='aten' (ATen's bf16 addmm) on any CPU.

    Both round x, W and b to bf16 and let oneDNN sum exact bf16 x bf16 products in fp32; the sums may differ by
    fp32 summation order (k · 2^-24 relative, far below a bf16 ulp), so after the final rounding to bf16 the outputs
    are equal or one ulp apart.
    """
    from engine.quant import bf16_model

    if gemm != "aten" and NO_BF16_GEMM:
        pytest.skip(needs_bf16_gemm.kwargs["reason"])
    art = load_artifact(artifacts[arch, "bfloat16"])
    model = bf16_model(art.cfg, art.state)
    ids, types, cu, ms = packed(art.cfg, [30, 7, 61])
    with torch.no_grad():
        seen = capture_inputs(model, lambda: model(ids, types, cu, ms))
    assert len(seen) == 8
    for name, (mod, x) in seen.items():
        w, b = art.state[name + ".weight"].float(), art.state[name + ".bias"].float()
        got = _C.testing.bf16_linear(x, w, b, None, gemm)
        want = mod(x)
        assert torch.equal(got, got.bfloat16().float()), name
        big = torch.maximum(got.abs(), want.abs())
        ulp = torch.where(big > 0, torch.exp2(torch.floor(torch.log2(big)) - 7), torch.zeros_like(big))
        assert ((got - want).abs() <= ulp).all(), (name, gemm)
        if name.endswith("ffn_in"):
            act = _act_name(art.cfg)
            fused = _C.testing.bf16_linear(x, w, b, act, gemm)
            torch.testing.assert_close(fused, _torch_act(got, act), atol=2e-6, rtol=2e-6)


def test_zero_width_linears():
    """0 heads / 0 FFN units keep zero-width Linears ([d, 0] weights, input_scale [0]): the output is act(b) per row
    (an empty sum), or empty; nothing is multiplied."""
    g = torch.Generator().manual_seed(0)
    x0, x5 = torch.zeros(4, 0), torch.randn(4, 5, generator=g)
    b = torch.randn(6, generator=g)
    for c in (None, torch.ones(0)):
        y = _C.testing.int8_linear(x0, torch.zeros(6, 0, dtype=torch.int8), torch.ones(6), b, c)
        assert torch.equal(y, b.expand(4, 6))
        y = _C.testing.int8_linear(x0, torch.zeros(6, 0, dtype=torch.int8), torch.ones(6), b, c, "relu")
        assert torch.equal(y, F.relu(b).expand(4, 6))
    for c in (None, torch.ones(5)):
        assert _C.testing.int8_linear(
            x5, torch.zeros(0, 5, dtype=torch.int8), torch.ones(0), torch.ones(0), c
        ).shape == (4, 0)
        assert _C.testing.int8_linear(
            torch.zeros(0, 5), torch.ones(3, 5, dtype=torch.int8), torch.ones(3), torch.ones(3), c
        ).shape == (0, 3)
    assert torch.equal(_C.testing.bf16_linear(x0, torch.zeros(6, 0), b), b.expand(4, 6))
    assert _C.testing.bf16_linear(x5, torch.zeros(0, 5), torch.zeros(0)).shape == (4, 0)


# ---- whole model -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_logits_match_torch_backend(artifacts, arch, kind, threads):
    """The same artifact on the cpp and torch backends: within twice the noise floor (see _noise_floor) plus fp32
    noise (1e-6 of the logits), and far closer to each other than either is to the fp32 model."""
    if kind == "bfloat16" and NO_BF16_GEMM:
        pytest.skip(needs_bf16_gemm.kwargs["reason"])
    art = load_artifact(artifacts[arch, kind])
    ids, types, cu, ms = packed(art.cfg, LENGTHS)
    tb = create_backend("torch", art, "cpu")
    want = _logits(tb, ids, types, cu, ms)
    got = _logits(create_backend("cpp", art, "cpu", threads=threads), ids, types, cu, ms)
    floor = _noise_floor(tb, ids, types, cu, ms)
    fp32 = _logits(create_backend("torch", load_artifact(artifacts[arch, "float32"]), "cpu"), ids, types, cu, ms)
    dist, own = (got - want).norm().item(), (want - fp32).norm().item()
    assert dist <= 2 * floor + NOISE * want.norm().item(), (dist, floor, own)
    assert dist <= 0.1 * own, (dist, floor, own)  # here the floor is tiny against the precision's own error


@needs_bf16_gemm
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_logits_within_scheme_bounds_of_fp32(artifacts, arch):
    """cpp logits against the fp32 model, within the bounds tests/quant/test_quant.py derives for the scheme
    (relative L2): int8 dynamic <= the sum over layers of sum_GEMMs sqrt(k) / 127; bf16 <= (2 + 14 L) u, u = 2^-9."""
    cfg = load_artifact(artifacts[arch, "float32"]).cfg
    ids, types, cu, ms = packed(cfg, [37, 5, 60, 1, 23], seed=3)
    fp32 = _logits(create_backend("torch", load_artifact(artifacts[arch, "float32"]), "cpu"), ids, types, cu, ms)
    bounds = {
        "int8": sum(int8_layer_bound(cfg, l) for l in range(cfg.num_layers)),
        "bfloat16": (2 + 14 * cfg.num_layers) * U_BF16,
    }
    for kind, bound in bounds.items():
        got = _logits(create_backend("cpp", load_artifact(artifacts[arch, kind]), "cpu"), ids, types, cu, ms)
        err = ((got - fp32).norm() / fp32.norm()).item()
        assert 0 < err <= bound, (kind, err, bound)


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_minilm_half_matches_torch_backend(minilm, dtype, tmp_path):
    """The real MiniLM pruned by specs/minilm-half.json at full window length: here the noise floor is about half the
    precision's own error (flips cascade over 384 tokens and 6 layers), so this checks the engine at realistic sizes
    and shapes (K = 384 and 768) rather than sharply; the sharp checks are the per-Linear ones above."""
    if dtype == "bfloat16" and NO_BF16_GEMM:
        pytest.skip(needs_bf16_gemm.kwargs["reason"])
    from pathlib import Path

    spec = Path(__file__).resolve().parents[2] / "specs" / "minilm-half.json"
    art = load_artifact(build(minilm, tmp_path / "a", spec=spec, dtype=dtype))
    ref = load_artifact(build(minilm, tmp_path / "f", spec=spec))
    lengths = [384, 100, 7, 1]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, art.cfg.vocab_size, (sum(lengths),), generator=g)
    types, cu, ms = torch.zeros_like(ids), torch.tensor([0, 384, 484, 491, 492], dtype=torch.int32), 384
    tb = create_backend("torch", art, "cpu")
    want = _logits(tb, ids, types, cu, ms)
    got = _logits(create_backend("cpp", art, "cpu", threads=2), ids, types, cu, ms)
    fp32 = _logits(create_backend("torch", ref, "cpu"), ids, types, cu, ms)
    dist, own, floor = (got - want).norm().item(), (want - fp32).norm().item(), _noise_floor(tb, ids, types, cu, ms)
    assert dist <= 2 * floor + NOISE * want.norm().item(), (dist, floor, own)
    assert dist < own, (dist, floor, own)
