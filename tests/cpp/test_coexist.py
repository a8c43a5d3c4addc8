"""The cpp backend sharing its process with torch (issue #18): identical logits while torch works on other threads,
the caller's OpenMP team released or not, and engine.openmp's spin default (a user's own setting always wins).

Skips when engine._C is not built.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

_C = pytest.importorskip("engine._C", reason="engine._C is not built (C++ toolchain or deps missing at install)")

from engine import openmp
from engine.build_model import build
from engine.features import WindowSettings
from engine.qa import QAEngine

ROOT = Path(__file__).resolve().parents[2]
CONTEXTS = [
    "The treasure is buried under the old oak tree, which Zoë Ångström planted in 1921 near São Paulo.",
    " ".join(f"word{i % 97}" for i in range(200)) + " The river that runs through the city is the Thames.",
]
QUESTIONS = ["Where is the treasure?", "Who planted the tree?", "Which river runs through the city?"]


@pytest.fixture(scope="module")
def qa(minilm, tmp_path_factory) -> QAEngine:
    art = build(
        minilm,
        tmp_path_factory.mktemp("coexist") / "a",
        settings=WindowSettings(max_seq_length=96, doc_stride=32, max_query_length=16),
    )
    return QAEngine.load(art, backend="cpp", threads=2)


def _batch(qa: QAEngine) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, qa.cfg.vocab_size, (3, 80), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 50:] = 0  # one padded row: the packed path as well
    return {"input_ids": ids, "attention_mask": mask}


def test_logits_identical_while_torch_runs_on_other_threads(qa):
    x = _batch(qa)
    jobs = [(q, c) for q in QUESTIONS for c in CONTEXTS]
    a, w = torch.randn(384, 1536), torch.randn(1536, 384)
    want_mm = a @ w
    want_logits = qa.forward(**x)
    want_answers = [qa.answer(q, c) for q, c in jobs]

    def mixed(worker: int) -> list:
        out = []
        for i in range(6):
            out.append(torch.equal(a @ w, want_mm))  # torch's own threads, right before the engine's
            if (worker + i) % 2:
                out.append(qa.forward(**x))
            else:
                out.append([qa.answer(q, c) for q, c in jobs])
        return out

    with ThreadPoolExecutor(4) as pool:
        results = [r for rs in pool.map(mixed, range(4)) for r in rs]
    for r in results:
        if isinstance(r, bool):
            assert r, "a torch matmul changed while the engine ran"
        elif isinstance(r, tuple):
            assert torch.equal(r[0], want_logits[0]) and torch.equal(r[1], want_logits[1])
        else:
            assert r == want_answers  # text, offsets and float scores: identical logits


def test_release_caller_team_keeps_logits(qa, monkeypatch):
    x = _batch(qa)
    a, w = torch.randn(256, 512), torch.randn(512, 256)
    saved = _C.release_caller_team()
    try:
        out = {}
        for release in (False, True):
            _C.set_release_caller_team(release)
            assert _C.release_caller_team() is release
            a @ w  # leaves this thread's OpenMP team spinning: released by the next forward when `release`
            out[release] = qa.forward(**x)
            a @ w
            assert torch.equal((a @ w), a @ w)  # and torch rebuilds its team afterwards
        assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
    finally:
        _C.set_release_caller_team(saved)


@pytest.mark.parametrize("state, release", [("late", True), ("bounded", False), ("user", False)])
def test_cpp_backend_releases_only_when_libgomp_started_unbounded(qa, monkeypatch, state, release):
    from engine.runtime.cpp_backend import CppBackend

    saved = _C.release_caller_team()
    monkeypatch.setattr(openmp, "STATE", state)
    try:
        CppBackend(qa.artifact.path, "cpu", None)
        assert _C.release_caller_team() is release
    finally:
        _C.set_release_caller_team(saved)


PROBE = "import os, engine; print(engine.openmp.STATE, os.environ.get('GOMP_SPINCOUNT'))"


@pytest.mark.parametrize(
    "env, prelude, want",
    [
        ({}, "", f"bounded {openmp.SPIN_COUNT}"),
        ({"GOMP_SPINCOUNT": "123"}, "", "user 123"),
        ({"GOMP_SPINCOUNT": "infinite"}, "import torch; ", "user infinite"),
        ({"OMP_WAIT_POLICY": "active"}, "", "user None"),
        ({"OMP_WAIT_POLICY": "passive"}, "", "user None"),
        ({}, "import torch; ", "late None"),
    ],
    ids=["default", "user-count", "user-count-torch-first", "user-active", "user-passive", "torch-first"],
)
def test_spin_default_never_overrides_the_user(env, prelude, want):
    base = {k: v for k, v in os.environ.items() if k not in openmp.USER_VARIABLES}
    run = subprocess.run(
        [sys.executable, "-c", prelude + PROBE],
        env={**base, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == want


def test_configure_on_a_given_environment():
    if openmp.libgomp_loaded():  # this test process: torch is in already
        assert openmp.configure({}) == "late"
    env = {"GOMP_SPINCOUNT": "5"}
    assert openmp.configure(env) == "user" and env == {"GOMP_SPINCOUNT": "5"}
