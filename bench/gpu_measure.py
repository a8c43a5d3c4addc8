"""GPU measurements for bench/gpu_bench.py: latency with CUDA events, and the card's own roofline numbers.

Everything here is measured in the same process as the benchmark rows: the bf16 GEMM peak (torch.mm on
8192^3), the device copy bandwidth (1 GiB), the time per node of a CUDA graph of tiny kernels (the launch
floor per kernel) and the kernel count of one call (torch profiler).
"""

from __future__ import annotations

import time

import torch


def cuda_time_ms(fn, budget_s: float = 1.0, min_iters: int = 10, max_iters: int = 200, warmup: int = 3) -> dict:
    """Latency of `fn()` in ms (CUDA events around each synchronised call): median, p10, p90, iterations."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() < deadline):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    t = torch.tensor(times)
    return {
        "ms": t.median().item(),
        "p10_ms": t.quantile(0.1).item(),
        "p90_ms": t.quantile(0.9).item(),
        "iters": len(times),
    }


def gemm_peak_tflops(n: int = 8192) -> float:
    """Best bf16 torch.mm rate (TFLOP/s) on n x n x n matrices."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = cuda_time_ms(lambda: torch.mm(a, b), budget_s=2.0, min_iters=20)["p10_ms"]
    return 2 * n**3 / ms / 1e9


def memory_bandwidth_gbs(size_bytes: int = 1 << 30) -> float:
    """Device-to-device copy rate (GB/s, read + write bytes) of a 1 GiB buffer."""
    src = torch.empty(size_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), budget_s=1.0, min_iters=20)["p10_ms"]
    return 2 * size_bytes / ms / 1e6


def graph_node_launch_us(nodes: int = 2000) -> float:
    """Time per node (µs) of a CUDA graph of `nodes` dependent one-element kernels: the launch floor per kernel."""
    x = torch.zeros(1, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x.add_(1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(nodes):
            x.add_(1)
    return cuda_time_ms(graph.replay, budget_s=1.0, min_iters=10)["ms"] * 1e3 / nodes


def count_kernels(fn) -> int | None:
    """Number of GPU kernels one call of `fn` launches (torch profiler), or None if the profiler fails."""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = [e.name.lower() for e in prof.events() if e.device_type == DeviceType.CUDA]
        return sum(1 for n in names if "memcpy" not in n and "memset" not in n) or None
    except Exception as e:  # the profiler is optional: the launch floor is then left out
        print(f"  (kernel count unavailable: {e!r})")
        return None


def machine_info() -> dict:
    """Card, versions, and this run's measured bf16 GEMM peak, copy bandwidth and graph-node launch time."""
    import transformers
    import triton

    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "bf16_gemm_peak_tflops": gemm_peak_tflops(),
        "memory_bandwidth_gbs": memory_bandwidth_gbs(),
        "graph_node_launch_us": graph_node_launch_us(),
    }
    torch.cuda.empty_cache()
    return info
