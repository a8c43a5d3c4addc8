"""scripts/gpu_v3.sh collect-e1 / restore-e1: what issue #13's chain on one GPU sends back (the 64 MiB the device
transfer allows) and how it is put back here: the bundle and the teacher as artifacts, or the teacher's whole
checkpoint when no student was made; the dev scores into the results folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_v3.sh"
BUNDLE = "bundle-fast-cpu-0.5-teacher-cpu-e1-sn2-obs2L-kd1024s32k"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("split") is None, reason="needs bash")


def _gpu(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {
        **os.environ,
        "PY": sys.executable,
        "RUNS": str(tmp_path / "runs"),
        "E1_SEQ": "128",
        "E1_STRIDE": "32",
        **env,
    }
    r = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=full, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture
def e1_runs(tiny_bert, tmp_path: Path) -> Path:
    """What the chain leaves under RUNS and RESULTS_DIR there: the -sn2 teacher (with training checkpoints), a bundle,
    run metrics, dev scores and logs."""
    runs = tmp_path / "runs"
    shutil.copytree(tiny_bert, runs / "teacher-cpu-e1-sn2")
    (runs / "teacher-cpu-e1-sn2" / "checkpoints" / "step-00000800").mkdir(parents=True)
    (runs / "teacher-cpu-e1-sn2" / "metrics.json").write_text('{"history": []}')
    (runs / "art" / BUNDLE).mkdir(parents=True)
    (runs / "art" / BUNDLE / "engine.json").write_text('{"bundle": true}')
    (runs / "logs" / "session").mkdir(parents=True)
    (runs / "logs" / "session" / "times.tsv").write_text("teacher\t100 s\texit 0\tparallel\n")
    results = tmp_path / "there" / "cpu-e1"
    results.mkdir(parents=True)
    (results / "eval-teacher-cpu-e1-sn2.json").write_text('{"at_zero": {"f1": 60.0}}')
    return runs


def _restore(tmp_path: Path, out: Path) -> tuple[Path, Path]:
    local, results = tmp_path / "local", tmp_path / "here" / "cpu-e1"
    _gpu(tmp_path, "restore-e1", str(out), LOCAL_RUNS=str(local), RESULTS_DIR=str(results))
    return local, results


def test_a_finished_chain_sends_the_bundle_and_the_teacher_artifact(e1_runs: Path, tmp_path: Path):
    out = tmp_path / "out"
    _gpu(tmp_path, "collect-e1", OUT=str(out), RESULTS_DIR=str(tmp_path / "there" / "cpu-e1"))
    names = sorted(p.name for p in out.iterdir())
    assert "results.tgz" in names and "bundle.tar.aa" in names and "teacher.tar.aa" in names
    assert not any(n.startswith("teacher-ck") for n in names)
    assert all(p.stat().st_size <= 15 * 2**20 for p in out.iterdir())  # each piece within the transfer's limit
    with tarfile.open(out / "results.tgz") as t:
        got = t.getnames()
    assert any(n.endswith("teacher-cpu-e1-sn2/metrics.json") for n in got)
    assert any(n.endswith("logs/session/times.tsv") for n in got)
    local, results = _restore(tmp_path, out)
    assert json.loads((results / "eval-teacher-cpu-e1-sn2.json").read_text())["at_zero"]["f1"] == 60.0
    assert json.loads((local / "art" / BUNDLE / "engine.json").read_text()) == {"bundle": True}
    teacher = json.loads((local / "art" / "teacher-cpu-e1-sn2-fp16" / "engine.json").read_text())
    assert "float16" in json.dumps(teacher)  # built as an fp16 artifact there


def test_without_a_student_the_teacher_comes_back_whole(e1_runs: Path, tiny_bert, tmp_path: Path):
    shutil.rmtree(e1_runs / "art" / BUNDLE)
    out = tmp_path / "out"
    _gpu(tmp_path, "collect-e1", OUT=str(out), RESULTS_DIR=str(tmp_path / "there" / "cpu-e1"))
    names = sorted(p.name for p in out.iterdir())
    assert "teacher-ck.tar.aa" in names and not any(n.startswith(("bundle", "teacher.tar")) for n in names)
    local, _ = _restore(tmp_path, out)
    back, ref = load_checkpoint(local / "teacher-cpu-e1-sn2"), load_checkpoint(tiny_bert)
    assert not (local / "teacher-cpu-e1-sn2" / "checkpoints").exists()  # the training state stays there
    assert back.cfg == ref.cfg and back.state.keys() == ref.state.keys()
    for k, v in ref.state.items():
        assert back.state[k].dtype == v.dtype  # fp32 again, for the CPU stages
        torch.testing.assert_close(back.state[k], v.half().to(v.dtype), rtol=0, atol=0)  # only fp16's rounding
