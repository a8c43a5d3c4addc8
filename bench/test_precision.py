"""Precision modes on CPU: fp32, bf16 and int8 engines, dense MiniLM and minilm-half, against dense fp32 HF eager.

Run: `pytest bench/test_precision.py --benchmark-json=bench/results/precision.json` (part of `make bench`).
"""

from __future__ import annotations

import pytest
import torch

from bench.common import THREADS, configs, inputs, minilm, record
from bench.providers import engine_provider, hf_masked_provider

SHAPES = [(1, 384), (8, 384)]
DTYPES = ["float32", "bfloat16", "int8"]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


def _run(benchmark, fwd, kind, batch, seq, provider, model, dtype):
    x = inputs(batch, seq)
    benchmark.group = f"precision {batch}x{seq}"
    with torch.inference_mode():
        benchmark.pedantic(fwd, args=(x,), rounds=10 if batch == 1 else 3, iterations=1, warmup_rounds=1)
    cfg, dense = configs(kind)
    record(benchmark, cfg, batch, seq, provider, model, dtype=dtype, dense_cfg=dense)


@pytest.mark.parametrize("batch, seq", SHAPES, ids=[f"{b}x{s}" for b, s in SHAPES])
def test_hf_eager_dense_fp32(benchmark, batch, seq):
    _run(
        benchmark,
        hf_masked_provider(minilm("dense"), "eager"),
        "dense",
        batch,
        seq,
        "hf-eager",
        "minilm-dense",
        "float32",
    )


@pytest.mark.parametrize("batch, seq", SHAPES, ids=[f"{b}x{s}" for b, s in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["dense", "half"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_engine_precision(benchmark, backend, kind, dtype, batch, seq):
    from engine.runtime import available_backends

    if backend not in available_backends("cpu"):
        pytest.skip(f"backend {backend} not available")
    m = minilm(kind, dtype)
    try:
        fwd = engine_provider(m, backend)
    except RuntimeError as e:  # e.g. a backend that lacks the int8 kernels says so at load
        pytest.skip(str(e))
    _run(benchmark, fwd, kind, batch, seq, f"engine-{backend}", f"minilm-{kind}", dtype)
