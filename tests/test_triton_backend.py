"""The triton backend against the torch reference engine: dense and ragged, BERT and RoBERTa, fp32 and fp16.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so the models are tiny:
hidden 64 = 2 heads of d_h 32 (the kernels need d_h in {32, 64, 128}), 3 layers, sequences of 1, 17 and 40
tokens in one packed batch. On CUDA the same tests run natively, plus the CUDA-graph checks.
"""

from __future__ import annotations

import json

import pytest
import torch

from engine.artifact import load_artifact
from engine.build_model import build
from engine.features import WindowSettings
from engine.model import RaggedQAModel
from engine.packing import cu_seqlens_from_lengths, pack
from engine.qa import QAEngine
from engine.runtime import REGISTRY, create_backend
from engine.runtime.triton_backend import TritonBackend, pad_ffn, seq_bucket, token_bucket, why_unavailable
from tests.conftest import make_checkpoint

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
SMALL = WindowSettings(96, 16, 24)  # the tiny checkpoints have 128 positions
LENGTHS = [1, 17, 40]
FP32_ATOL = 1e-4
# Three layers: 2 heads + odd FFN (29 of 37 units); 0 heads + FFN width 1; 1 head + no FFN.
RAGGED = {
    "layers": [
        {"ffn": list(range(36, 7, -1))},  # 29 units, listed out of order
        {"heads": [], "ffn": [5]},
        {"heads": [1], "ffn": []},
    ]
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """Tiny BERT and RoBERTa (hidden 64, 2 x 32 heads, FFN 37, 3 layers) plus the ragged spec file."""
    root = tmp_path_factory.mktemp("triton_ck")
    spec = root / "ragged.json"
    spec.write_text(json.dumps(RAGGED))
    return {
        "bert": make_checkpoint(root / "bert", "bert", layers=3, heads=2, head_dim=32, ffn=37, seed=3),
        "roberta": make_checkpoint(root / "roberta", "roberta", layers=3, heads=2, head_dim=32, ffn=37, seed=4),
        "spec": spec,
    }


_ARTIFACTS: dict = {}


def _artifact(checkpoints, tmp_path_factory, arch: str, kind: str, dtype: str = "float32"):
    key = (arch, kind, dtype)
    if key not in _ARTIFACTS:
        out = tmp_path_factory.mktemp(f"art_{arch}_{kind}_{dtype}")
        spec = checkpoints["spec"] if kind == "ragged" else None
        _ARTIFACTS[key] = build(checkpoints[arch], out, spec=spec, dtype=dtype, settings=SMALL, force=True)
    return _ARTIFACTS[key]


def _batch(cfg, lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.randint(5, cfg.vocab_size, (len(lengths), seq), generator=g)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    types = torch.zeros_like(ids)
    if cfg.type_vocab_size > 1:
        types[:, seq // 3 :] = 1
    return ids, mask, types


def _max_err(eng: QAEngine, ref: tuple[torch.Tensor, torch.Tensor], lengths: list[int]) -> float:
    ids, mask, types = _batch(eng.cfg, lengths)
    s, e = eng.forward(ids, mask, types)
    keep = mask.bool()
    assert torch.isfinite(s[keep]).all() and torch.isfinite(e[keep]).all()
    return max((s - ref[0])[keep].abs().max().item(), (e - ref[1])[keep].abs().max().item())


def _torch_reference(path, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    eng = QAEngine.load(path, backend="torch")  # fp32 compute on CPU, also for half artifacts
    ids, mask, types = _batch(eng.cfg, lengths)
    with torch.no_grad():
        return eng.forward(ids, mask, types)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("kind", ["dense", "ragged"])
@pytest.mark.parametrize("ffn_align, graphs", [(1, False), (16, True)], ids=["unpadded-eager", "padded-bucketed"])
def test_fp32_matches_torch(checkpoints, tmp_path_factory, arch, kind, ffn_align, graphs):
    path = _artifact(checkpoints, tmp_path_factory, arch, kind)
    art = load_artifact(path)
    backend = TritonBackend(art, DEVICE, ffn_align=ffn_align, cuda_graphs=graphs)
    if kind == "ragged":
        want = (32, 16, 0) if ffn_align == 16 else (29, 1, 0)
        assert backend.ffn_widths == want
    err = _max_err(QAEngine(art, backend), _torch_reference(path, LENGTHS), LENGTHS)
    assert err < FP32_ATOL, f"max |logit diff| {err:.3g}"


@pytest.mark.parametrize("act", ["gelu_new", "relu"])
def test_other_activations(checkpoints, tmp_path_factory, act):
    """gelu_new and relu run as fused epilogues of the FFN-in GEMM."""
    root = tmp_path_factory.mktemp(f"act_{act}")
    src = make_checkpoint(root / "ck", "bert", layers=3, heads=2, head_dim=32, ffn=37, seed=5, act=act)
    path = build(src, root / "art", spec=checkpoints["spec"], settings=SMALL, force=True)
    art = load_artifact(path)
    err = _max_err(QAEngine(art, TritonBackend(art, DEVICE)), _torch_reference(path, LENGTHS), LENGTHS)
    assert err < FP32_ATOL, f"max |logit diff| {err:.3g}"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"] if ON_CUDA else ["float16"])
def test_half_within_rounding_of_torch(checkpoints, tmp_path_factory, dtype):
    """Half artifact: error vs the fp32 reference of the same (rounded) weights, bounded by torch's own half path."""
    path = _artifact(checkpoints, tmp_path_factory, "bert", "ragged", dtype)
    art = load_artifact(path)
    ref = _torch_reference(path, LENGTHS)
    err = _max_err(QAEngine(art, TritonBackend(art, DEVICE)), ref, LENGTHS)
    # PyTorch's own half path: the reference model in the artifact's dtype, on the same device.
    half = RaggedQAModel(art.cfg).to(DEVICE, art.state["qa.weight"].dtype).eval()
    half.load_state_dict(art.state)
    ids, mask, types = _batch(art.cfg, LENGTHS)
    lengths = mask.sum(1)
    cu = cu_seqlens_from_lengths(lengths)
    with torch.no_grad():
        s, e = half(pack(ids, lengths).to(DEVICE), pack(types, lengths).to(DEVICE), cu, max(LENGTHS))
    keep = mask.bool()
    torch_err = max(
        (s.float().cpu() - ref[0][keep]).abs().max().item(), (e.float().cpu() - ref[1][keep]).abs().max().item()
    )
    scale = max(ref[0][keep].abs().max().item(), ref[1][keep].abs().max().item())
    half_ulp = scale * torch.finfo(art.state["qa.weight"].dtype).eps / 2
    assert err <= 3 * torch_err + half_ulp, f"triton {err:.3g} vs torch-{dtype} {torch_err:.3g} (scale {scale:.3g})"


def test_bucketed_runs_many_shapes(checkpoints, tmp_path_factory):
    """The static-buffer path (a CUDA graph per bucket on GPU) across buckets, in and out of order, vs eager."""
    path = _artifact(checkpoints, tmp_path_factory, "roberta", "ragged")
    art = load_artifact(path)
    bucketed, eager = TritonBackend(art, DEVICE, cuda_graphs=True), TritonBackend(art, DEVICE, cuda_graphs=False)
    g = torch.Generator().manual_seed(7)
    shapes = [[40], [3, 5], [2], [1, 17, 40]] + ([[40, 40], [40] * 9, [17] * 3, [3, 5]] if ON_CUDA else [])
    for lengths in shapes:  # [40] then [3, 5]: the same token bucket, fewer tokens; [2] reuses graph (64, 1)
        cu = cu_seqlens_from_lengths(lengths)
        ids = torch.randint(5, art.cfg.vocab_size, (int(cu[-1]),), generator=g)
        types = torch.zeros_like(ids)
        got = bucketed.forward_packed(ids, types, cu, max(lengths))
        want = eager.forward_packed(ids, types, cu, max(lengths))
        for a, b in zip(got, want):
            assert a.shape == (int(cu[-1]),) and a.dtype == torch.float32
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    if ON_CUDA:
        assert len(bucketed.runner.graphs) >= 4


def test_buckets():
    for total in [1, 63, 64, 65, 128, 383, 384, 1024, 1025, 5000, 12288, 16384]:
        b = token_bucket(total)
        assert b >= max(total, 1) and b % 64 == 0
        assert b - total < max(64, total / 8 + 1), (total, b)
    assert token_bucket(384) == 384 and token_bucket(12288) == 12288
    assert [seq_bucket(n) for n in (1, 2, 3, 5, 32, 33)] == [1, 2, 4, 8, 32, 64]


def test_pad_ffn_is_exact():
    g = torch.Generator().manual_seed(0)
    w_in, b_in, w_out = torch.randn(29, 8, generator=g), torch.randn(29, generator=g), torch.randn(8, 29, generator=g)
    p_in, p_b, p_out = pad_ffn(w_in, b_in, w_out, 16)
    assert p_in.shape == (32, 8) and p_b.shape == (32,) and p_out.shape == (8, 32)
    x = torch.randn(5, 8, generator=g)
    ffn = lambda wi, bi, wo: torch.nn.functional.gelu(x @ wi.T + bi) @ wo.T  # noqa: E731
    torch.testing.assert_close(ffn(p_in, p_b, p_out), ffn(w_in, b_in, w_out))
    empty = pad_ffn(w_in[:0], b_in[:0], w_out[:, :0], 16)
    assert empty[0].shape == (0, 8)


def test_why_unavailable(monkeypatch):
    assert "cuda" in why_unavailable(torch.device("meta"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in why_unavailable(torch.device("cpu"))


def test_through_registry(checkpoints, tmp_path_factory):
    """QAEngine.load(..., backend="triton") where the registry lists this device (cpu: once it lists cpu)."""
    entry = next(e for e in REGISTRY if e.name == "triton")
    if DEVICE.type not in entry.devices:
        pytest.skip(f"registry lists triton for {entry.devices}, not {DEVICE.type}")
    path = _artifact(checkpoints, tmp_path_factory, "bert", "dense")
    backend = create_backend("triton", load_artifact(path), DEVICE)
    assert backend.name == "triton"
    err = _max_err(QAEngine(load_artifact(path), backend), _torch_reference(path, LENGTHS), LENGTHS)
    assert err < FP32_ATOL
