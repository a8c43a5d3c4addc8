"""The C++ engine (engine._C / libqaengine) against the Python reference: logits, answers, errors, threads.

Skips when engine._C is not built (the C++ backend is optional; `make install` builds it when the toolchain is there).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

_C = pytest.importorskip("engine._C", reason="engine._C is not built (C++ toolchain or deps missing at install)")

from engine.artifact import load_artifact  # noqa: E402
from engine.build_model import build  # noqa: E402
from engine.features import WindowSettings  # noqa: E402
from engine.manifest import ArtifactError  # noqa: E402
from engine.model import RaggedQAModel  # noqa: E402
from engine.packing import cu_seqlens_from_lengths  # noqa: E402
from engine.qa import QAEngine  # noqa: E402
from engine.runtime import create_backend  # noqa: E402
from engine.runtime.cpp_backend import CppBackend, is_available  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SMALL = WindowSettings(max_seq_length=64, doc_stride=16, max_query_length=16)
# Ragged shapes of the 3-layer, 4-head, 37-unit tiny checkpoints: a 0-head layer and a 0-FFN layer.
RAGGED = {
    "layers": [
        {"heads": [0, 2, 3], "ffn": list(range(0, 37, 2))},
        {"heads": [], "ffn": [20, 3, 7]},
        {"heads": [1], "ffn": []},
    ]
}
LENGTHS = [1, 17, 0, 64, 5, 126]
# (dtype, atol): fp32 compute; fp16 artifacts are upcast and compared with their own upcast weights. bf16 artifacts
# run bf16 GEMMs on the cpp backend: tests/cpp/test_cpp_precision.py.
TOLERANCES = {"float32": 1e-4, "float16": 1e-4}


def _reference(path: Path) -> RaggedQAModel:
    a = load_artifact(path)
    m = RaggedQAModel(a.cfg)
    m.load_state_dict({k: v.float() for k, v in a.state.items()})
    return m.eval()


def _packed(cfg, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    ids = torch.randint(0, cfg.vocab_size, (total,), generator=gen)
    types = torch.randint(0, cfg.type_vocab_size, (total,), generator=gen)
    return ids, types, cu_seqlens_from_lengths(lengths), max(lengths)


def _assert_parity(path: Path, lengths: list[int], atol: float, gemm: str = "auto") -> None:
    ref = _reference(path)
    ids, types, cu, max_len = _packed(ref.cfg, lengths)
    eng = _C.Engine.load(str(path), "cpu", gemm)
    start, end = eng.forward_packed(ids, types, cu, max_len)
    with torch.no_grad():
        rs, re = ref(ids, types, cu, max_len)
    assert start.dtype == torch.float32 and start.shape == rs.shape
    torch.testing.assert_close(start, rs, atol=atol, rtol=0)
    torch.testing.assert_close(end, re, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("spec") / "ragged.json"
    p.write_text(json.dumps(RAGGED))
    return p


@pytest.mark.parametrize("dtype", sorted(TOLERANCES))
@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("ragged", [False, True], ids=["dense", "ragged"])
def test_logits_match_reference(arch, ragged, dtype, tiny_bert, tiny_roberta, spec_path, tmp_path):
    src = tiny_bert if arch == "bert" else tiny_roberta
    art = build(src, tmp_path / "a", spec=spec_path if ragged else None, dtype=dtype, settings=SMALL)
    cfg = load_artifact(art).cfg
    if ragged:
        assert 0 in cfg.heads and 0 in cfg.ffn
    _assert_parity(art, LENGTHS, TOLERANCES[dtype])


@pytest.mark.parametrize("spec", [None, ROOT / "specs" / "minilm-half.json"], ids=["dense", "half"])
def test_minilm_logits_match_reference(minilm, spec, tmp_path):
    art = build(minilm, tmp_path / "a", spec=spec)
    _assert_parity(art, [384, 100, 7, 1], 1e-4)


GEMMS = ["dnnl", "onednn", "aten"] if _C.testing.dnnl_available() else ["onednn", "aten"]


@pytest.mark.parametrize("gemm", GEMMS)
def test_every_gemm_backend_matches_reference(gemm, tiny_bert, minilm, spec_path, tmp_path):
    """Each fp32 GEMM route, on the ragged tiny model (0-head and 0-FFN layers) and MiniLM-half; a long single
    sequence takes the row-chunk path, several sequences the per-group path."""
    tiny = build(tiny_bert, tmp_path / "tiny", spec=spec_path, settings=SMALL)
    assert _C.Engine.load(str(tiny), "cpu", gemm).gemm == gemm
    _assert_parity(tiny, LENGTHS, 1e-4, gemm)
    _assert_parity(tiny, [126], 1e-4, gemm)
    half = build(minilm, tmp_path / "half", spec=ROOT / "specs" / "minilm-half.json")
    _assert_parity(half, [381], 1e-4, gemm)
    _assert_parity(half, [200, 57, 190, 3, 256, 129], 1e-4, gemm)


def test_single_thread_batches_past_the_workspace_cap(minilm, tmp_path):
    """One thread runs the whole batch as one row-chunk job: 5 x 512 tokens exceed the per-thread workspace (16 MB)
    and take freshly allocated buffers; a small batch right after reuses the workspace."""
    half = build(minilm, tmp_path / "half", spec=ROOT / "specs" / "minilm-half.json")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _assert_parity(half, [512, 512, 300, 512, 512, 512], 1e-4)
        _assert_parity(half, [33, 7], 1e-4)
    finally:
        torch.set_num_threads(threads)


def test_auto_gemm_prefers_the_direct_onednn_library(tiny_bert, tmp_path):
    art = build(tiny_bert, tmp_path / "a", settings=SMALL)
    assert _C.Engine.load(str(art)).gemm == ("dnnl" if _C.testing.dnnl_available() else "onednn")
    with pytest.raises(_C.Error, match="gemm must be"):
        _C.Engine.load(str(art), "cpu", "mkl")


@pytest.mark.skipif(not _C.testing.dnnl_available(), reason="engine._C was built without oneDNN's library (libdnnl)")
@pytest.mark.parametrize("rows,cols_in,cols_out", [(1, 1, 1), (3, 7, 5), (64, 384, 1152), (65, 33, 2), (129, 600, 17)])
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_new", "relu"])
def test_dnnl_linear_matches_torch(rows, cols_in, cols_out, activation):
    """One fp32 Linear through libdnnl, plain and in place onto a residual (the encoder's sum post-op)."""
    gen = torch.Generator().manual_seed(rows * 1000 + cols_in)
    x, w = torch.randn(rows, cols_in, generator=gen), torch.randn(cols_out, cols_in, generator=gen)
    b, residual = torch.randn(cols_out, generator=gen), torch.randn(rows, cols_out, generator=gen)
    want = F.linear(x.double(), w.double(), b.double())
    want = {None: want, "relu": F.relu(want), "gelu": F.gelu(want), "gelu_new": F.gelu(want, approximate="tanh")}[
        activation
    ].float()
    tol = 1e-5 * (1 + cols_in**0.5 * 4)
    torch.testing.assert_close(_C.testing.fp32_linear(x, w, b, activation, "dnnl"), want, atol=tol, rtol=1e-5)
    torch.testing.assert_close(
        _C.testing.fp32_linear(x, w, b, activation, "dnnl", residual), want + residual, atol=tol, rtol=1e-5
    )
    with pytest.raises(ValueError, match="residual needs gemm='dnnl'"):
        _C.testing.fp32_linear(x, w, b, activation, "aten", residual)


def _check_varlen_attention(attention, head_dim: int) -> None:
    """`attention(qkv, bias, cu_seqlens, heads, max_seqlen)` on packed random sequences (lengths 0 to 300) against
    fp64 SDPA per sequence."""
    heads, lengths = 3, [1, 31, 0, 257, 300]
    gen = torch.Generator().manual_seed(head_dim)
    total = sum(lengths)
    qkv = 2 * torch.randn(total, 3 * heads * head_dim, generator=gen)
    bias = 0.5 * torch.randn(3 * heads * head_dim, generator=gen)
    cu = cu_seqlens_from_lengths(lengths)
    out = attention(qkv, bias, cu, heads, max(lengths))
    x = (qkv + bias).double().view(total, 3, heads, head_dim)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if a == b:
            continue
        q, k, v = x[a:b].permute(1, 2, 0, 3).unbind(0)
        ref = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(b - a, heads * head_dim)
        torch.testing.assert_close(out[a:b].double(), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("isa", _C.testing.cpu_kernels())
def test_fused_attention_matches_sdpa(isa, head_dim):
    _check_varlen_attention(
        lambda qkv, bias, cu, heads, max_len: _C.testing.cpu_attention(qkv, bias, cu, heads, max_len, isa), head_dim
    )


@pytest.fixture(scope="module")
def minilm_artifact(minilm, tmp_path_factory) -> Path:
    return build(minilm, tmp_path_factory.mktemp("cpp") / "a", settings=SMALL)


CONTEXTS = [
    "Café Müller in São Paulo was founded by Zoë Ångström in 1921, naïvely.",
    "The accent is combining: Cafe\u0301 and nai\u0308ve and e\u0301le\u0300ve appear here.",
    "東京は日本の首都です。 The capital of Japan is Tokyo (東京), population 14 million.",
    "Emoji 😀🎉 and flags 🇫🇷 and family 👨‍👩‍👧 sit between words 🙂 here.",
    "Control\u0000chars\u0007and zero\u200bwidth joiners are odd\ufeff but legal.",
    " ".join(f"word{i % 97}" for i in range(300)) + " The treasure is buried under the old oak tree.",
]


@pytest.fixture(scope="module")
def engines(minilm_artifact) -> tuple[QAEngine, object]:
    return QAEngine.load(minilm_artifact, backend="torch"), _C.Engine.load(str(minilm_artifact))


@pytest.mark.parametrize("context", CONTEXTS)
def test_answers_match_python_engine(engines, context):
    py, cpp = engines
    for question in ("Who or what is it?", "Where is the treasure?"):
        for threshold in (None, -1e9, 1e9):
            want = py.answer(question, context, max_answer_length=12, null_threshold=threshold)
            got = cpp.answer(question, context, max_answer_length=12, null_threshold=threshold)
            assert (got.text, got.start, got.end, got.no_answer) == (want.text, want.start, want.end, want.no_answer)
            assert got.score == pytest.approx(want.score, abs=1e-4)
            assert got.null_score_diff == pytest.approx(want.null_score_diff, abs=1e-4)
            if not got.no_answer:
                assert context.encode()[got.start_byte : got.end_byte].decode() == got.text


def test_backend_registry_and_qaengine(minilm_artifact):
    assert is_available()
    art = load_artifact(minilm_artifact)
    backend = create_backend("cpp", art, "cpu", threads=1)
    assert backend.name == "cpp"
    ids, types, cu, max_len = _packed(art.cfg, [40, 9])
    s, e = backend.forward_packed(ids, types, cu, max_len)
    rs, re = create_backend("torch", art, "cpu").forward_packed(ids, types, cu, max_len)
    torch.testing.assert_close(s, rs, atol=1e-4, rtol=0)
    direct = CppBackend(minilm_artifact, "cpu", None)
    torch.testing.assert_close(
        direct.forward_packed(ids, None, cu, max_len)[1],
        create_backend("torch", art, "cpu").forward_packed(ids, torch.zeros_like(ids), cu, max_len)[1],
        atol=1e-4,
        rtol=0,
    )
    eng = QAEngine.load(minilm_artifact, backend="cpp")
    assert eng.backend_name == "cpp"
    a = eng.answer("Who founded it?", CONTEXTS[0], null_threshold=1e9)
    assert CONTEXTS[0][a.start : a.end] == a.text


def test_concurrent_answers_are_consistent(engines):
    eng = engines[1]
    jobs = [("Who or what is it?", c) for c in CONTEXTS] * 3
    serial = [eng.answer(q, c).text for q, c in jobs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda qc: eng.answer(*qc).text, jobs))
    assert parallel == serial


def test_tokenize_matches_hf(minilm_artifact, engines):
    from engine.features import load_tokenizer

    hf = load_tokenizer(minilm_artifact)
    eng = engines[1]
    for text in CONTEXTS:
        enc = hf.encode(text, add_special_tokens=False)
        ids, offsets, byte_offsets = eng.tokenize(text)
        assert ids == enc.ids and offsets == [tuple(o) for o in enc.offsets]
        assert [text.encode()[a:b].decode() for a, b in byte_offsets] == [text[a:b] for a, b in offsets]


def test_input_checks(engines):
    eng = engines[1]
    ids = torch.randint(0, 1000, (10,))
    types = torch.zeros(10, dtype=torch.long)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    eng.forward_packed(ids, types, cu, 6)
    bad = [
        ((ids.int(), types, cu, 6), "input_ids must be"),
        ((ids.view(2, 5), types, cu, 6), "input_ids must be 1-D"),
        ((ids.repeat(2)[::2], types, cu, 6), "input_ids must be contiguous"),
        ((ids, types[:9], cu, 6), "token_type_ids has 9 tokens"),
        ((ids, types, cu.long(), 6), "cu_seqlens must be"),
        ((ids, types, torch.tensor([0, 4, 9], dtype=torch.int32), 6), "must end at the token count 10"),
        ((ids, types, torch.tensor([0, 7, 4, 10], dtype=torch.int32), 6), "non-decreasing"),
        ((ids, types, torch.tensor([1, 10], dtype=torch.int32), 10), "cu_seqlens[0] must be 0"),
        ((ids, types, cu, 5), "max_seqlen 5"),
        ((ids, types, cu, -1), "max_seqlen must be >= 0"),
        ((torch.full((10,), 10**6), types, cu, 6), "outside the vocabulary"),
        ((ids, torch.full((10,), 2), cu, 6), "token_type_ids[0] = 2"),
    ]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            eng.forward_packed(*args)
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        long = torch.zeros(600, dtype=torch.long)
        eng.forward_packed(long, long, torch.tensor([0, 600], dtype=torch.int32), 600)
    with pytest.raises(ValueError, match="question is empty"):
        eng.answer("  ", "context")
    with pytest.raises(ValueError, match="max_answer_length"):
        eng.answer("q?", "context", max_answer_length=0)


def test_corrupt_artifacts_raise_not_crash(tiny_bert, tmp_path):
    good = build(tiny_bert, tmp_path / "good", settings=SMALL)
    weights = (good / "weights.safetensors").read_bytes()

    def variant(name: str, edit) -> Path:
        d = tmp_path / name
        d.mkdir()
        for f in good.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        edit(d)
        return d

    cases = {
        "truncated": (lambda d: (d / "weights.safetensors").write_bytes(weights[: len(weights) // 2]), "truncated"),
        "tiny": (lambda d: (d / "weights.safetensors").write_bytes(weights[:5]), "too short"),
        "header": (
            lambda d: (d / "weights.safetensors").write_bytes((40).to_bytes(8, "little") + b"x" * 40),
            "not valid JSON",
        ),
        "no_weights": (lambda d: (d / "weights.safetensors").unlink(), "missing"),
        "manifest": (lambda d: (d / "engine.json").write_text("{"), "not valid JSON"),
        "version": (
            lambda d: (d / "engine.json").write_text(
                (good / "engine.json").read_text().replace('"format_version": 1', '"format_version": 7')
            ),
            "newer",
        ),
    }
    for name, (edit, msg) in cases.items():
        d = variant(name, edit)
        with pytest.raises(_C.Error, match=msg):
            _C.Engine.load(str(d))
        with pytest.raises((ArtifactError, ValueError, FileNotFoundError)):  # the Python reader agrees it is bad
            load_artifact(d)
    assert issubclass(_C.Error, ValueError)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_engine_matches_cpu(minilm_artifact):
    if not _C.cuda_built:
        pytest.skip("engine._C was built without CUDA (-DQAENGINE_CUDA=ON)")
    cpu = _C.Engine.load(str(minilm_artifact), "cpu")
    gpu = _C.Engine.load(str(minilm_artifact), "cuda")
    ids, types, cu, max_len = _packed(load_artifact(minilm_artifact).cfg, [64, 3, 50])
    s, e = cpu.forward_packed(ids, types, cu, max_len)
    gs, ge = gpu.forward_packed(ids.cuda(), types.cuda(), cu, max_len)
    torch.testing.assert_close(gs.cpu(), s, atol=1e-3, rtol=0)
    torch.testing.assert_close(ge.cpu(), e, atol=1e-3, rtol=0)


def _require_cuda_build() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not _C.cuda_built:
        pytest.skip("engine._C was built without CUDA (-DQAENGINE_CUDA=ON)")


@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_cuda_attention_matches_sdpa(head_dim):
    _require_cuda_build()
    _check_varlen_attention(
        lambda qkv, bias, cu, heads, max_len: _C.testing.cuda_varlen_attention(
            qkv.cuda(), bias.cuda(), cu.cuda(), heads, max_len
        ).cpu(),
        head_dim,
    )
    with pytest.raises(ValueError, match="head_dim"):
        _C.testing.cuda_varlen_attention(
            torch.zeros(4, 3 * 48, device="cuda"), None, torch.tensor([0, 4], dtype=torch.int32), 1, 4
        )


@pytest.mark.parametrize("cols", [1, 37, 384, 1000])
def test_cuda_add_layernorm_matches_torch(cols):
    _require_cuda_build()
    gen = torch.Generator().manual_seed(cols)
    x, y = (torch.randn(19, cols, generator=gen) for _ in range(2))
    b, g, beta = (torch.randn(cols, generator=gen) for _ in range(3))
    want = F.layer_norm(x + y + b, (cols,), g, beta, 1e-5)
    got = _C.testing.cuda_add_layernorm_(x.cuda(), y.cuda(), b.cuda(), g.cuda(), beta.cuda(), 1e-5).cpu()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
