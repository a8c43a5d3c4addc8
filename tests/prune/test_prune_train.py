"""Gated student <-> exported ragged model parity, the prune CLI end to end, exact resume, and a 2-process DDP run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoint import load_checkpoint
from engine.model import RaggedQAModel
from engine.packing import cu_seqlens_from_lengths
from engine.prune.export import calibrate, deterministic_shape
from engine.prune.gated import GatedQAModel, export_ragged
from engine.prune.train import build_parser, prune
from tests.conftest import ROOT, TINY_TRAIN_ARGS, make_checkpoint


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("sublayer", [False, True])
def test_export_parity(arch, sublayer, tmp_path):
    src = make_checkpoint(tmp_path / "m", arch, layers=4, heads=4, head_dim=8, ffn=23, seed=11)
    ck = load_checkpoint(src)
    base = RaggedQAModel(ck.cfg)
    base.load_state_dict(ck.state)
    gated = GatedQAModel(base, sublayer_gates=sublayer)
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():  # a mix of closed (<-2.4), fractional and fully open gates
        for p in gated.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 3)
        gated.head_gates[1].log_alpha.fill_(-5.0)  # a layer with 0 heads
        gated.ffn_gates[2].log_alpha.fill_(-5.0)  # a layer with 0 FFN units
    gated.eval()
    cfg, state = export_ragged(gated)
    assert cfg.heads[1] == 0 and cfg.ffn[2] == 0 and cfg == deterministic_shape(gated)
    small = RaggedQAModel(cfg).eval()
    small.load_state_dict(state)
    lengths = [13, 1, 29]
    ids = torch.randint(5, ck.cfg.vocab_size, (sum(lengths),), generator=g)
    cu = cu_seqlens_from_lengths(lengths)
    with torch.no_grad():
        want = gated(ids, None, cu, max(lengths))
        got = small(ids, None, cu, max(lengths))
    assert max((want[0] - got[0]).abs().max(), (want[1] - got[1]).abs().max()) < 1e-5


def test_calibrate_hits_target(tmp_path):
    src = make_checkpoint(tmp_path / "m", "bert", layers=3, heads=4, head_dim=8, ffn=40, seed=13)
    ck = load_checkpoint(src)
    gated = GatedQAModel(RaggedQAModel(ck.cfg))
    with torch.no_grad():
        for p in gated.gate_parameters():
            p.normal_(0, 2)
    for target in (0.3, 0.5, 0.7):
        info = calibrate(gated, ck.cfg, target, seq_len=128, tol=0.005)
        assert abs(info["after"] - target) <= 0.02, info


@pytest.fixture(scope="module")
def data(tiny_prune_data):
    return tiny_prune_data


def _argv(data, out: Path, *extra: str) -> list[str]:
    root, teacher = data
    return [
        "--teacher",
        str(teacher),
        "--train",
        str(root / "train.json.gz"),
        "--eval",
        str(root / "dev.json"),
        "--out",
        str(out),
        *TINY_TRAIN_ARGS,
        "--log-every",
        "0",
        *extra,
    ]


def test_prune_cli_end_to_end(data, tmp_path):
    m = prune(
        build_parser().parse_args(
            _argv(
                data,
                tmp_path / "o",
                "--target-sparsity",
                "0.5",
                "--max-steps",
                "12",
                "--finetune-max-steps",
                "3",
                "--hidden-weight",
                "0.5",
            )
        )
    )
    assert abs(m["achieved_flop_sparsity"] - 0.5) <= 0.02
    for key in ("teacher", "student", "heads", "ffn", "f1_loss", "wall_time_s", "gates", "target"):
        assert key in m
    for row in (m["teacher"], m["student"]):
        assert {"exact", "f1", "best_f1", "HasAns_f1", "NoAns_f1", "auc"} <= set(row)
    back = load_checkpoint(tmp_path / "o")
    assert back.is_ragged and list(back.cfg.heads) == m["heads"] and back.null_threshold is not None
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["heads"] == m["heads"]
    assert (tmp_path / "o" / "gates.json").is_file()


def test_prune_target_params_and_no_distill(data, tmp_path):
    m = prune(
        build_parser().parse_args(
            _argv(
                data,
                tmp_path / "o",
                "--target-params",
                "0.4",
                "--max-steps",
                "4",
                "--finetune-max-steps",
                "1",
                "--no-distill",
                "--threshold-rule",
                "teacher-rate",
            )
        )
    )
    assert abs(m["achieved_param_sparsity"] - 0.4) <= 0.02 and m["distillation"] is False
    assert m["threshold_rule"] == "teacher-rate"  # the rule itself: tests/data/test_squad.py, test_prune_fast_cli.py
    assert load_checkpoint(tmp_path / "o").null_threshold == m["student"]["null_threshold"]


def test_resume_equals_uninterrupted(data, tmp_path, monkeypatch):
    common = ["--target-sparsity", "0.5", "--max-steps", "6", "--finetune-max-steps", "2", "--checkpoint-every", "1"]
    prune(build_parser().parse_args(_argv(data, tmp_path / "full", *common)))

    import engine.train.loop as loop

    real = loop.check_finite

    def crash_at_4(loss, step):
        if step == 4:
            raise KeyboardInterrupt("simulated kill")
        real(loss, step)

    monkeypatch.setattr(loop, "check_finite", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        prune(build_parser().parse_args(_argv(data, tmp_path / "cut", *common)))
    monkeypatch.setattr(loop, "check_finite", real)
    prune(build_parser().parse_args(_argv(data, tmp_path / "cut", *common, "--resume")))
    a = json.loads((tmp_path / "full" / "gates.json").read_text())["log_alpha"]
    b = json.loads((tmp_path / "cut" / "gates.json").read_text())["log_alpha"]
    assert set(a) == set(b) and all(torch.allclose(torch.tensor(a[k]), torch.tensor(b[k]), atol=1e-6) for k in a)
    wa, wb = (
        load_file(str(tmp_path / "full" / "model.safetensors")),
        load_file(str(tmp_path / "cut" / "model.safetensors")),
    )
    assert set(wa) == set(wb) and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_nan_loss_names_step(data, tmp_path, monkeypatch):
    import engine.train.loop as loop

    monkeypatch.setattr(loop, "task_and_distill", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(FloatingPointError, match="at step 1"):
        prune(build_parser().parse_args(_argv(data, tmp_path / "o", "--target-sparsity", "0.5", "--max-steps", "2")))


DDP_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _torchrun(port: int, *argv: str) -> list[str]:
    """`engine.prune ARGV` as two CPU (gloo) processes under torchrun."""
    dist = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    return [sys.executable, *dist, "-m", "engine.prune", *argv]


def test_ddp_two_processes(data, tmp_path):
    argv = _argv(data, tmp_path / "ddp", "--target-sparsity", "0.5", "--max-steps", "3", "--finetune-max-steps", "1")
    cmd = _torchrun(29517, *argv)
    r = subprocess.run(cmd, env=DDP_ENV, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert abs(m["achieved_flop_sparsity"] - 0.5) <= 0.02


def test_ddp_sigterm_to_the_process_group_saves_once_and_resumes(data, tmp_path):
    """`timeout` (or cpu_session.sh advance) sends SIGTERM to a torchrun job's process group; torchrun forwards it to
    its workers (each in a session of its own): the ranks agree on the step, rank 0 saves it once, all exit before
    torchrun gives up on them, and --resume under torchrun finishes the run."""
    import signal
    import time

    out = tmp_path / "ddp"

    def cmd(*extra: str) -> list[str]:
        argv = _argv(data, out, "--target-sparsity", "0.5", "--max-steps", "400", "--finetune-max-steps", "1")
        return _torchrun(29518, *argv, "--checkpoint-every", "1000", "--log-every", "1", *extra)

    log = tmp_path / "ddp.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd(), env=DDP_ENV, cwd=ROOT, stdout=f, stderr=f, start_new_session=True)
        deadline = time.monotonic() + 300
        while "step 3/400" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=300)
    text = log.read_text()
    assert proc.returncode != 0 and "SIGTERM at step" in text, text[-3000:]
    saved = sorted(out.rglob("step-*/trainer.json"))
    assert len(saved) == 1, (saved, text[-3000:])
    step = int(saved[0].parent.name.removeprefix("step-"))
    assert 3 <= step < 400 and not (out / "metrics.json").exists()
    r = subprocess.run(cmd("--resume"), env=DDP_ENV, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at step {step}" in r.stderr and (out / "metrics.json").exists()


def test_prune_roberta_teacher(data, tmp_path):
    root, _ = data
    teacher = make_checkpoint(tmp_path / "rt", "roberta", layers=2, heads=4, head_dim=8, ffn=29, seed=15)
    m = prune(
        build_parser().parse_args(
            _argv(
                (root, teacher),
                tmp_path / "o",
                "--target-sparsity",
                "0.4",
                "--max-steps",
                "4",
                "--finetune-max-steps",
                "1",
            )
        )
    )
    # One head of this tiny model is 11.7% of its FLOPs and all FFN units only 6%: 0.4 is reachable to ~0.03.
    assert abs(m["achieved_flop_sparsity"] - 0.4) <= 0.03
    assert load_checkpoint(tmp_path / "o").cfg.architecture.value == "roberta"
