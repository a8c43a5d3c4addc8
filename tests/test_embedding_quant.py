"""Int8 word embeddings on disk (`build_model --embeddings int8`, format_version 3; docs/ARTIFACT.md).

Both loaders (engine/artifact.py, libqaengine) dequantize the table to the same bits; rows lie within scale/2 of the
originals; logits stay close to the `same` artifact's; malformed artifacts raise errors naming the tensor; default
artifacts are unchanged.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.artifact import load_artifact
from engine.build_model import build, main
from engine.checkpoint import load_checkpoint
from engine.features import WindowSettings
from engine.manifest import WORD, WORD_SCALE, ArtifactError
from engine.qa import QAEngine

SMALL = WindowSettings(96, 16, 24)
DTYPES = ("float32", "float16", "bfloat16", "int8")

try:
    from engine import _C
except ImportError:
    _C = None
needs_cpp = pytest.mark.skipif(_C is None, reason="engine._C is not built (C++ toolchain or deps missing at install)")


@pytest.fixture(scope="module")
def checkpoints(tiny_bert, tiny_roberta):
    return {"bert": tiny_bert, "roberta": tiny_roberta}


@pytest.fixture(scope="module")
def artifacts(checkpoints, tmp_path_factory):
    """(arch, dtype, embeddings) -> artifact dir, for both architectures, every dtype, both embedding storages."""
    root = tmp_path_factory.mktemp("embq")
    return {
        (arch, dtype, emb): build(ck, root / f"{arch}-{dtype}-{emb}", dtype=dtype, settings=SMALL, embeddings=emb)
        for arch, ck in checkpoints.items()
        for dtype in DTYPES
        for emb in ("same", "int8")
    }


def _header(path):
    with safe_open(str(path / "weights.safetensors"), "pt") as f:
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_storage_and_dequantized_state(artifacts, checkpoints, arch, dtype):
    same, q = artifacts[arch, dtype, "same"], artifacts[arch, dtype, "int8"]
    hs, hq = _header(same), _header(q)
    v, d = hs[WORD][1]
    # Only the word table changes: I8 [V, d] + F32 scale [V]; every other tensor is stored exactly as before.
    assert hq.pop(WORD) == ("I8", (v, d)) and hq.pop(WORD_SCALE) == ("F32", (v,))
    hs.pop(WORD)
    assert hq == hs
    m = json.loads((q / "engine.json").read_text())
    assert m["format_version"] == 3 and m["embeddings"] == {"word": "int8_symmetric_per_row"}
    assert ("quantization" in m) == (dtype == "int8")
    a_same, a_q = load_artifact(same), load_artifact(q)
    assert a_q.embeddings == "int8" and a_same.embeddings == "same"
    assert set(a_q.state) == set(a_same.state)  # the scale is consumed at load
    word = a_q.state[WORD]
    assert word.dtype == a_same.state[WORD].dtype  # the artifact's float dtype (fp32 for int8 artifacts)
    # Exact rounding: stored codes are round(w / s); the dequantized rows lie within s/2 of the fp32 source.
    src = load_checkpoint(checkpoints[arch]).state[WORD].float()
    raw = load_file(str(q / "weights.safetensors"))
    codes, scale = raw[WORD], raw[WORD_SCALE]
    amax = src.abs().amax(1)
    assert torch.equal(scale, torch.where(amax > 0, amax / 127, 1.0))  # a zero row (BERT's [PAD]) gets scale 1
    assert torch.equal(codes, torch.round(src / scale[:, None]).to(torch.int8))
    deq32 = codes.float() * scale[:, None]
    assert torch.equal(word, deq32.to(word.dtype))
    err = (deq32 - src).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-6)).all()
    assert err.max() > 0  # really quantized


def test_zero_rows_survive(tiny_bert, tmp_path):
    from transformers import AutoModelForQuestionAnswering

    m = AutoModelForQuestionAnswering.from_pretrained(str(tiny_bert))
    with torch.no_grad():
        m.bert.embeddings.word_embeddings.weight[[0, 3]] = 0.0
    src = tmp_path / "src"
    m.save_pretrained(str(src))
    for f in tiny_bert.iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            shutil.copy(f, src / f.name)
    art = build(src, tmp_path / "a", settings=SMALL, embeddings="int8")
    raw = load_file(str(art / "weights.safetensors"))
    assert raw[WORD_SCALE][[0, 3]].tolist() == [1.0, 1.0] and not raw[WORD][[0, 3]].any()
    word = load_artifact(art).state[WORD]
    assert not word[[0, 3]].any() and word[1].abs().max() > 0
    if _C is not None:
        assert torch.equal(_C.testing.artifact_tensors(str(art))[WORD], word)


@needs_cpp
@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_python_and_cpp_loaders_agree_bitwise(artifacts, arch, dtype):
    art = artifacts[arch, dtype, "int8"]
    py = load_artifact(art).state[WORD]
    cpp = _C.testing.artifact_tensors(str(art))
    assert WORD_SCALE not in cpp
    assert cpp[WORD].dtype == torch.float32  # libqaengine keeps embeddings in fp32: the same values, widened
    assert torch.equal(cpp[WORD], py.float())


def _inputs(cfg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (3, 48), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    return ids, mask


# Logit bound for int8 vs same embeddings (fp32 artifacts, tiny random models). Each word-embedding element moves by
# at most s/2 = max|row| / 254, i.e. at most 0.4% of its row's largest entry (~0.2% RMS for these Gaussian rows);
# the embedding LayerNorm passes that through as the same relative change of its output, and the 3 layers of the
# tiny models amplify a relative input change by well under 10x (measured: fp16 weight rounding, 2^-11 relative,
# moves their logits by < 2e-3, tests/test_artifact.py). Logits are O(0.1-1), so |delta| <= 0.004 * 10 * 1 = 0.04.
LOGIT_BOUND = 0.04


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_logits_close_to_same_artifact(artifacts, arch):
    same = QAEngine.load(artifacts[arch, "float32", "same"], backend="torch")
    q = QAEngine.load(artifacts[arch, "float32", "int8"], backend="torch")
    ids, mask = _inputs(same.cfg)
    s0, e0 = same.forward(ids, mask)
    s1, e1 = q.forward(ids, mask)
    keep = mask.bool()
    diff = max((s0 - s1)[keep].abs().max().item(), (e0 - e1)[keep].abs().max().item())
    assert 0 < diff < LOGIT_BOUND
    # Exactly the same model as the fp32 reference with the dequantized table swapped in (the only change).
    from engine.model import RaggedQAModel
    from engine.packing import cu_seqlens_from_lengths, pack, unpack

    ref = RaggedQAModel(q.cfg).eval()
    ref.load_state_dict({**same.artifact.state, WORD: q.artifact.state[WORD]})
    lengths = mask.sum(1)
    cu = cu_seqlens_from_lengths(lengths)
    with torch.no_grad():
        rs, _ = ref(pack(ids, lengths), pack(torch.zeros_like(ids), lengths), cu, ids.shape[1])
    torch.testing.assert_close(unpack(rs, cu, ids.shape[1])[keep], s1[keep], atol=1e-5, rtol=0)


@needs_cpp
@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_backends_run_int8_embeddings(artifacts, arch, dtype):
    art = artifacts[arch, dtype, "int8"]
    torch_eng = QAEngine.load(art, backend="torch")
    cpp_eng = QAEngine.load(art, backend="cpp")
    ids, mask = _inputs(torch_eng.cfg, 1)
    keep = mask.bool()
    st, _ = torch_eng.forward(ids, mask)
    sc, _ = cpp_eng.forward(ids, mask)
    # fp32 / fp16: both compute fp32 on identical tables; int8: the int8 GEMM paths differ by rounding flips only.
    tol = 1e-4 if dtype != "int8" else 0.1
    assert (st - sc)[keep].abs().max() < tol


CONTEXTS = [
    ("Who conquered England?", "The Normans conquered England in 1066 after the Battle of Hastings."),
    ("What is the capital of France?", "Paris is the capital city of France, on the river Seine."),
    ("Where was William born?", "William was born in Normandy; he died in France after the war."),
]


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_answers_agree(artifacts, arch):
    same = QAEngine.load(artifacts[arch, "float32", "same"], backend="torch")
    q = QAEngine.load(artifacts[arch, "float32", "int8"], backend="torch")
    for question, context in CONTEXTS:
        a, b = same.answer(question, context), q.answer(question, context)
        assert (a.text, a.start, a.end) == (b.text, b.start, b.end)


def _broken(art, tmp_path, edit):
    out = tmp_path / "broken"
    shutil.copytree(art, out)
    t = load_file(str(out / "weights.safetensors"))
    edit(t)
    save_file(t, str(out / "weights.safetensors"), metadata={"format": "sparseqa-engine"})
    return out


@pytest.mark.parametrize(
    "edit, expect",
    [
        (lambda t: t.pop(WORD_SCALE), f"tensor '{WORD_SCALE}' is missing"),
        (lambda t: t.update({WORD_SCALE: t[WORD_SCALE][:-1].clone()}), f"tensor '{WORD_SCALE}' has shape"),
        (lambda t: t.update({WORD_SCALE: t[WORD_SCALE].half()}), f"tensor '{WORD_SCALE}' has dtype F16, expected F32"),
        (lambda t: t.update({WORD: t[WORD].float()}), f"tensor '{WORD}' has dtype F32, expected I8"),
        (lambda t: t[WORD].__setitem__((2, 1), -128), f"tensor '{WORD}' holds -128"),
        (lambda t: t[WORD_SCALE].__setitem__(4, 0.0), f"tensor '{WORD_SCALE}' must be positive"),
        (lambda t: t[WORD_SCALE].__setitem__(4, float("nan")), f"tensor '{WORD_SCALE}' contains NaN or inf"),
    ],
)
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_malformed_in_both_loaders(artifacts, tmp_path, edit, expect, dtype):
    bad = _broken(artifacts["bert", dtype, "int8"], tmp_path, edit)
    with pytest.raises(ArtifactError, match=expect.replace("(", r"\(")):
        load_artifact(bad)
    if _C is not None:
        with pytest.raises(_C.Error) as ei:
            _C.Engine.load(str(bad), "cpu")
        assert expect in str(ei.value)


@pytest.mark.parametrize(
    "change, expect",
    [
        (lambda m: m.pop("embeddings"), "missing field(s) ['embeddings']"),
        (lambda m: m.update(embeddings={"word": "int4"}), "word is 'int4', this SparseQA reads only"),
        (lambda m: m.update(embeddings={"word": "int8_symmetric_per_row", "x": 1}), "unknown field(s) ['x']"),
        (lambda m: m.update(format_version=1), "unknown field(s) ['embeddings']"),
        (lambda m: m.update(format_version=4), "format_version 4 was written by a newer SparseQA"),
    ],
)
def test_malformed_manifest_in_both_loaders(artifacts, tmp_path, change, expect):
    bad = tmp_path / "bad"
    shutil.copytree(artifacts["bert", "float32", "int8"], bad)
    m = json.loads((bad / "engine.json").read_text())
    change(m)
    (bad / "engine.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError) as ei:
        load_artifact(bad)
    assert expect in str(ei.value)
    if _C is not None:
        with pytest.raises(_C.Error) as ei:
            _C.Engine.load(str(bad), "cpu")
        assert expect in str(ei.value)


def test_older_reader_refuses(artifacts, monkeypatch):
    """A reader of versions 1-2 (before this change) sees format_version 3 and asks for an upgrade."""
    import engine.manifest as M

    monkeypatch.setattr(M, "FORMAT_VERSION", 2)
    with pytest.raises(ArtifactError, match="format_version 3 was written by a newer SparseQA.*upgrade SparseQA"):
        load_artifact(artifacts["bert", "float16", "int8"])


def test_default_artifacts_unchanged(artifacts, checkpoints, tmp_path):
    """`--embeddings same` (the default) writes exactly what build_model wrote before: same bytes, version 1/2."""
    for dtype in DTYPES:
        default = build(checkpoints["bert"], tmp_path / dtype, dtype=dtype, settings=SMALL)
        same = artifacts["bert", dtype, "same"]
        assert (default / "weights.safetensors").read_bytes() == (same / "weights.safetensors").read_bytes()
        m = json.loads((default / "engine.json").read_text())
        assert "embeddings" not in m and m["format_version"] == (2 if dtype == "int8" else 1)
        hdr = _header(default)
        assert WORD_SCALE not in hdr
        assert hdr[WORD][0] == {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int8": "F32"}[dtype]


def test_cli(tiny_bert, tmp_path, capsys):
    args = ["--model", str(tiny_bert), "--max-seq-length", "96", "--doc-stride", "16", "--max-query-length", "24"]
    assert main([*args, "--out", str(tmp_path / "a"), "--dtype", "float16", "--embeddings", "int8", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "float16, int8 word embeddings" in out and "verify:" in out
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "b"), "--embeddings", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_triton_backend_runs_int8_embeddings(tmp_path):
    """The triton backend (interpreted on CPU) reads `Artifact.state`: it gets the dequantized table."""
    pytest.importorskip("triton")
    from engine.runtime.triton_backend import TritonBackend, why_unavailable
    from tests.conftest import make_checkpoint

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if why_unavailable(device):
        pytest.skip(why_unavailable(device))
    src = make_checkpoint(tmp_path / "src", "bert", layers=2, heads=2, head_dim=32, ffn=29, seed=2)  # d_h 32
    art = load_artifact(build(src, tmp_path / "a", settings=SMALL, embeddings="int8"))
    ref = QAEngine.load(art.path, backend="torch")
    eng = QAEngine(art, TritonBackend(art, device))
    ids, mask = _inputs(ref.cfg, 2)
    ids, mask = ids[:, :20], mask[:, :20]
    s0, _ = ref.forward(ids, mask)
    s1, _ = eng.forward(ids, mask)
    assert (s0 - s1.cpu())[mask.bool()].abs().max() < 1e-4


def test_onnx_export_of_int8_embeddings(artifacts, tmp_path):
    """engine.export_onnx exports from `Artifact.state`: the graph holds the dequantized fp32 table."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from engine import export_onnx as ex

    a = load_artifact(artifacts["roberta", "float16", "int8"])
    path = ex.export(a, tmp_path / "m.onnx")
    assert max(ex.check(a, [path], seed=0, batch=2, seq=24).values()) < 1e-4
