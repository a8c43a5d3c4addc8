"""Interleaved CPU timing of the C++ engine against the torch backend and ONNX Runtime (same process, same inputs).

    python csrc/tools/bench_cpu.py [--threads 2] [--models dense,half] [--reps 15] [--providers ...]
    python csrc/tools/bench_cpu.py --attention [--threads 2]     # the fused attention kernel against SDPA
    python csrc/tools/bench_cpu.py --breakdown [--threads 1]     # where a forward's time goes: GEMM, attention, rest

Each round runs every provider once per shape, in turn, so machine noise hits all of them alike; the table shows
the best (min) and median time per provider and encoder GFLOP/s (engine.flops, DESIGN.md's count) of the best.
The pytest-benchmark suites in bench/ remain the project's recorded benchmarks; this is the kernel author's tool.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import SHAPES, inputs, minilm  # noqa: E402
from bench.providers import PROVIDERS, available  # noqa: E402
from engine.artifact import load_artifact  # noqa: E402
from engine.flops import encoder_flops  # noqa: E402


def attention(threads: int, reps: int) -> None:
    """GFLOP/s (4 S^2 h d_h per sequence) of engine._C.testing.cpu_attention against torch SDPA, MiniLM's 12 heads."""
    import torch.nn.functional as F

    from engine import _C

    print(f"threads={threads}  fused attention (best ISA) vs F.scaled_dot_product_attention, fp32")
    for head_dim in (32, 64):
        for b, s in SHAPES:
            heads = 384 // head_dim
            total = b * s
            qkv = torch.randn(total, 3 * heads * head_dim)
            bias = 0.1 * torch.randn(3 * heads * head_dim)
            cu = torch.arange(0, total + 1, s, dtype=torch.int32)
            q, k, v = (qkv + bias).view(b, s, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            fns = {
                "fused": lambda: _C.testing.cpu_attention(qkv, bias, cu, heads, s),
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
            }
            best = {n: float("inf") for n in fns}
            for _ in range(reps):
                for n, f in fns.items():
                    t0 = time.perf_counter()
                    f()
                    best[n] = min(best[n], time.perf_counter() - t0)
            flops = 4 * b * s * s * heads * head_dim
            print(
                f"d_h={head_dim:<3} {b:>3}x{s:<4} "
                + "  ".join(f"{n} {flops / t / 1e9:6.1f} GFLOP/s ({t * 1e3:6.2f} ms)" for n, t in best.items()),
                flush=True,
            )


def breakdown(models: list[str], shapes: list[tuple[int, int]], reps: int) -> None:
    """Single-threaded split of one C++ engine forward into its GEMMs (oneDNN, the model's exact shapes),
    fused attention and the rest (embeddings, LayerNorms, GELU epilogues, copies, call overhead), by timing each
    part alone."""
    from engine import _C
    from engine.qa import QAEngine

    torch.set_num_threads(1)

    def best(fn) -> float:
        for _ in range(3):
            fn()
        t = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
        return min(t)

    print("threads=1  engine-cpp forward = GEMM + attention + rest (ms, and share of the forward)")
    for kind in models:
        m = minilm(kind)
        cfg = load_artifact(m.artifact).cfg
        eng = QAEngine.load(m.artifact, backend="cpp")
        for b, s in shapes:
            total_tokens = b * s
            ids = torch.randint(1000, cfg.vocab_size, (total_tokens,))
            cu = torch.arange(0, total_tokens + 1, s, dtype=torch.int32)
            fwd = best(lambda: eng.backend.forward_packed(ids, torch.zeros_like(ids), cu, s))
            gemm = attn = 0.0
            for heads, ffn in zip(cfg.heads, cfg.ffn):
                w = heads * cfg.head_dim
                shapes_nk = ([(3 * w, cfg.hidden), (cfg.hidden, w)] if heads else []) + (
                    [(ffn, cfg.hidden), (cfg.hidden, ffn)] if ffn else []
                )
                for n, k in shapes_nk:
                    packed = torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k), None)
                    x, bias = torch.randn(total_tokens, k), torch.randn(n)
                    gemm += best(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], ""))
                if heads:
                    qkv = torch.randn(total_tokens, 3 * w)
                    attn += best(lambda: _C.testing.cpu_attention(qkv, torch.zeros(3 * w), cu, heads, s))
            rest = fwd - gemm - attn
            print(
                f"{m.name:<12} {b:>3}x{s:<4} forward {fwd * 1e3:7.2f}  gemm {gemm * 1e3:7.2f} ({gemm / fwd:4.0%})  "
                f"attention {attn * 1e3:6.2f} ({attn / fwd:4.0%})  rest {rest * 1e3:6.2f} ({rest / fwd:4.0%})",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="dense,half")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--providers", default="engine-cpp,engine-torch,ort,ort-fused")
    ap.add_argument("--shapes", default=",".join(f"{b}x{s}" for b, s in SHAPES))
    ap.add_argument("--attention", action="store_true", help="time the fused attention kernel against SDPA")
    ap.add_argument("--breakdown", action="store_true", help="split a single-threaded forward: GEMM, attention, rest")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.attention:
        attention(args.threads, args.reps)
        return
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.breakdown:
        breakdown(args.models.split(","), shapes, args.reps)
        return
    names = [p for p in args.providers.split(",") if available(p) is None]
    print(f"threads={args.threads} providers={names}")
    for kind in args.models.split(","):
        m = minilm(kind)
        cfg = load_artifact(m.artifact).cfg
        fwd = {p: PROVIDERS[p](m) for p in names}
        print(f"\n{m.name}: heads {list(cfg.heads)} ffn {list(cfg.ffn)}")
        print(f"{'shape':>8} " + " ".join(f"{p:>24}" for p in names))
        for b, s in shapes:
            x = inputs(b, s)
            for f in fwd.values():  # warm-up (ORT/oneDNN/MKL initialisation)
                f(x)
                f(x)
            times: dict[str, list[float]] = {p: [] for p in names}
            reps = max(3, args.reps // max(1, (b * s) // 1024))
            for _ in range(reps):
                for p, f in fwd.items():
                    t0 = time.perf_counter()
                    f(x)
                    times[p].append(time.perf_counter() - t0)
            flops = encoder_flops(cfg, b, s)
            cells = []
            for p in names:
                best, med = min(times[p]), statistics.median(times[p])
                cells.append(f"{best * 1e3:7.1f}/{med * 1e3:7.1f}ms {flops / best / 1e9:5.0f}GF")
            print(f"{b:>3}x{s:<4} " + " ".join(f"{c:>24}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
