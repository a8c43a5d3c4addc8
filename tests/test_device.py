"""`--device` for training and evaluation: what resolves where, clear refusals, and (on a GPU) fine-tuning, pruning
and evaluation on CUDA: exact resume there, the CPU-side outputs, and the GPU's numbers against the CPU's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoint import load_checkpoint
from engine.finetune import build_parser as finetune_parser
from engine.finetune import finetune
from engine.model import RaggedQAModel
from engine.packing import cu_seqlens_from_lengths, positions
from engine.prune.train import build_parser as prune_parser
from engine.prune.train import prune
from engine.train import resolve_device
from tests.conftest import TINY_TRAIN_ARGS, make_checkpoint
from tests.test_finetune import _squad

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")


def test_resolve_device_here():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="cpu or cuda"):
        resolve_device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_refused_without_a_gpu(tmp_path):
    with pytest.raises(ValueError, match="sees no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="sees no CUDA device"):
        resolve_device("cuda:1")


def test_positions_follow_cu_seqlens_device():
    cu = cu_seqlens_from_lengths([3, 1, 2])
    assert positions(cu, 2).tolist() == [2, 3, 4, 2, 2, 3]
    if torch.cuda.is_available():
        assert positions(cu.cuda(), 2).device.type == "cuda"


def _finetune(tiny_prune_data, out: Path, device: str, *extra: str) -> dict:
    root, teacher = tiny_prune_data
    argv = ["--model", str(teacher), "--train", str(root / "train.json.gz"), "--out", str(out), *TINY_TRAIN_ARGS]
    argv += ["--eval-fraction", "0.34", "--negatives-ratio", "0.5", "--lr", "1e-3", "--device", device]
    return finetune(finetune_parser().parse_args([*argv, *extra]))


@needs_cuda
def test_finetune_on_cuda_resumes_exactly(tiny_prune_data, tmp_path):
    common = ("--max-steps", "12", "--checkpoint-every", "5", "--eval-every", "4", "--keep-checkpoints", "5")
    full = tmp_path / "full"
    m = _finetune(tiny_prune_data, full, "cuda", *common, "--precision", "fp32")
    assert m["throughput"]["device"].startswith("cuda") and m["steps"] == 12
    part = tmp_path / "part"
    shutil.copytree(full / "checkpoints" / "step-00000005", part / "checkpoints" / "step-00000005")
    _finetune(tiny_prune_data, part, "cuda", *common, "--precision", "fp32", "--resume")
    a = load_file(str(full / "checkpoints" / "step-00000012" / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / "step-00000012" / "model.safetensors"))
    for k in a:
        assert a[k].device.type == "cpu"
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    ck = load_checkpoint(full)  # the best checkpoint: written from GPU tensors, loads on the CPU
    assert ck.null_threshold is not None and all(v.device.type == "cpu" for v in ck.state.values())


@needs_cuda
def test_finetune_on_cuda_bf16_learns(tiny_prune_data, tmp_path):
    m = _finetune(
        tiny_prune_data, tmp_path / "bf16", "cuda", "--max-steps", "30", "--precision", "bf16", "--lr", "3e-3"
    )
    assert m["throughput"]["precision"] == "bf16"
    first, last = m["loss"]["first"], m["loss"]["last"]
    assert sum(last) / len(last) < 0.9 * sum(first) / len(first), (first, last)


@needs_cuda
@pytest.mark.parametrize("teacher_logits", ["live", "cached"])
def test_prune_on_cuda_end_to_end(tiny_prune_data, tmp_path, teacher_logits):
    root, teacher = tiny_prune_data
    argv = ["--teacher", str(teacher), "--train", str(root / "train.json.gz"), "--eval", str(root / "dev.json")]
    argv += ["--out", str(tmp_path / "o"), *TINY_TRAIN_ARGS, "--log-every", "0", "--device", "cuda"]
    argv += ["--target-sparsity", "0.5", "--max-steps", "12", "--finetune-max-steps", "3", "--precision", "fp32"]
    if teacher_logits == "cached":
        argv += ["--teacher-logits", "cached", "--teacher-precision", "float32"]
    else:
        argv += ["--teacher-logits", "live", "--hidden-weight", "0.5"]
    m = prune(prune_parser().parse_args(argv))
    assert 0 < m["achieved_flop_sparsity"] < 1 and "f1" in m["student"]
    ck = load_checkpoint(tmp_path / "o")
    assert ck.is_ragged and all(v.device.type == "cpu" for v in ck.state.values())


@needs_cuda
def test_cuda_forward_matches_cpu(tmp_path):
    src = make_checkpoint(tmp_path / "m", "bert", layers=3, heads=4, head_dim=8, ffn=37, seed=22)
    ck = load_checkpoint(src)
    cpu = RaggedQAModel(ck.cfg).eval()
    cpu.load_state_dict(ck.state)
    gpu = RaggedQAModel(ck.cfg).eval().cuda()
    gpu.load_state_dict(ck.state)
    lengths = [13, 1, 29, 7]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, ck.cfg.vocab_size, (sum(lengths),), generator=g)
    cu = cu_seqlens_from_lengths(lengths)
    with torch.no_grad():
        want = cpu(ids, None, cu, max(lengths))
        got = gpu(ids.cuda(), None, cu.cuda(), max(lengths))
    for w, o in zip(want, got):
        torch.testing.assert_close(o.cpu(), w, atol=1e-4, rtol=1e-4)


@needs_cuda
@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param(
            "triton",
            marks=pytest.mark.xfail(
                reason="failed on an H200 on 2026-12-04 (docs/TRAINING.md, 'Training on a GPU'); the run's output "
                "was cut before the error, so the cause is not known yet",
                strict=False,
            ),
        ),
    ],
)
def test_evaluate_on_cuda_matches_cpu(tiny_bert, tmp_path, backend):
    from engine.build_model import build
    from engine.evaluate import evaluate_artifact
    from engine.features import WindowSettings

    art = build(tiny_bert, tmp_path / "a", settings=WindowSettings(96, 16, 24), null_threshold=0.25)
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(_squad(3, 2)))
    cpu = evaluate_artifact(art, path, backend="torch", progress=False)
    gpu = evaluate_artifact(art, path, backend=backend, progress=False, device="cuda")
    assert gpu["backend"] == backend and gpu["device"] == "cuda"
    assert gpu["at_stored_threshold"]["f1"] == pytest.approx(cpu["at_stored_threshold"]["f1"], abs=1e-6)


def test_prune_finetune_curve(tiny_prune_data, tmp_path):
    """--eval-every in engine.prune scores the student on the held-out data during the fixed-structure phase."""
    root, teacher = tiny_prune_data
    argv = ["--teacher", str(teacher), "--train", str(root / "train.json.gz"), "--eval", str(root / "dev.json")]
    argv += ["--out", str(tmp_path / "o"), *TINY_TRAIN_ARGS, "--log-every", "0", "--device", "auto"]
    argv += ["--target-sparsity", "0.5", "--max-steps", "4", "--finetune-max-steps", "4", "--eval-every", "2"]
    m = prune(prune_parser().parse_args([*argv, "--teacher-logits", "live"]))
    steps = [r["step"] for r in m["finetune_curve"]]
    assert steps[-1] == 4 and 2 in steps and steps == sorted(set(steps))
    assert m["finetune_curve"][-1]["f1"] == pytest.approx(m["student"]["f1"])
