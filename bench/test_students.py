"""CPU latency of every evaluated model of the reproduction run (teacher, students, baselines, precisions).

Each `bench/results/eval-NAME.json` (from `python -m engine.evaluate`; the current teacher's group, while the previous
teacher's rows and their medians stay in bench/results/previous/) names the artifact it scored; this suite
times that artifact on the engine (`backend="auto"`: cpp when built) at (1,384) and (8,384), and dense fp32 HF
eager on the packaged MiniLM (the teacher's architecture and shapes, so the same cost) as the common baseline. The
packaged dense MiniLM is also timed on the engine: the stand-in for a dense teacher whose artifact was built on another
machine (teacher v3's, on the GPU machine), since latency depends on the shapes and dtype, not on the weights.
`python -m bench.accuracy_rows` joins the medians to the accuracy rows: speedup over the dense teacher on the same
engine, and over HF eager.

Run: `pytest bench/test_students.py --benchmark-json=bench/results/students.json` (`make bench-students`).
Another group's folder: `SPARSEQA_STUDENTS_DIR=bench/results/cpu pytest bench/test_students.py
--benchmark-json=bench/results/cpu/students.json`.
Skips, saying why, when no evaluated artifact is present (they come from scripts/reproduce_squad.sh).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from bench.common import DENSE_ENGINE_MODEL, THREADS, inputs, minilm, record
from bench.providers import hf_masked_provider

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(1, 384), (8, 384)]


def evaluated_artifacts() -> list[tuple[str, Path]]:
    """(name, artifact dir) of every eval-NAME.json whose artifact still exists on this machine."""
    out = []
    folder = Path(os.environ.get("SPARSEQA_STUDENTS_DIR", ROOT / "bench" / "results"))
    for p in sorted(folder.glob("eval-*.json")):
        art = Path(json.loads(p.read_text())["artifact"])
        if (art / "engine.json").is_file():
            out.append((p.stem.removeprefix("eval-"), art))
    return out


ARTIFACTS = evaluated_artifacts()


@pytest.fixture(scope="module", autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


def _run(benchmark, fwd, cfg, dense_cfg, batch, seq, provider, model, dtype):
    x = inputs(batch, seq)
    benchmark.group = f"students {batch}x{seq}"
    with torch.inference_mode():
        benchmark.pedantic(fwd, args=(x,), rounds=10 if batch == 1 else 3, iterations=1, warmup_rounds=1)
    record(benchmark, cfg, batch, seq, provider, model, dtype=dtype, dense_cfg=dense_cfg)


@pytest.mark.parametrize("batch, seq", SHAPES, ids=[f"{b}x{s}" for b, s in SHAPES])
def test_hf_eager_dense(benchmark, batch, seq):
    from engine.artifact import load_artifact

    m = minilm("dense")
    cfg = load_artifact(m.artifact).cfg
    _run(benchmark, hf_masked_provider(m, "eager"), cfg, cfg, batch, seq, "hf-eager", "hf-eager-dense", "float32")


def _engine(benchmark, art: Path, name: str, batch: int, seq: int) -> None:
    """Time artifact `art` on the engine (`backend="auto"`) under `name`, its FLOPs against the dense MiniLM's."""
    from engine.artifact import load_artifact
    from engine.qa import QAEngine

    a = load_artifact(art)
    eng = QAEngine.load(art, backend="auto")
    fwd = lambda x: eng.forward(x["input_ids"], x["attention_mask"], x["token_type_ids"])  # noqa: E731
    dense = load_artifact(minilm("dense").artifact).cfg
    _run(benchmark, fwd, a.cfg, dense, batch, seq, f"engine-{eng.backend.name}", name, a.dtype)


@pytest.mark.parametrize("batch, seq", SHAPES, ids=[f"{b}x{s}" for b, s in SHAPES])
def test_engine_dense(benchmark, batch, seq):
    """The dense MiniLM on the engine: the stand-in for a dense teacher whose own artifact was built elsewhere."""
    _engine(benchmark, minilm("dense").artifact, DENSE_ENGINE_MODEL, batch, seq)


NO_STUDENTS = "no bench/results/eval-*.json with its artifact on this machine: run scripts/reproduce_squad.sh first"
STUDENTS = ARTIFACTS or [pytest.param("none", None, marks=pytest.mark.skip(reason=NO_STUDENTS))]


@pytest.mark.parametrize("batch, seq", SHAPES, ids=[f"{b}x{s}" for b, s in SHAPES])
@pytest.mark.parametrize("name, art", STUDENTS, ids=[n for n, _ in ARTIFACTS] or ["none"])
def test_engine_student(benchmark, name, art, batch, seq):
    _engine(benchmark, art, name, batch, seq)
