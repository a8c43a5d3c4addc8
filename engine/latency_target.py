"""Latency targets on the command line, shared by engine.prune (L0) and engine.prune_fast (post-training).

    (--target-latency-ms T | --target-speedup X)  [--latency-shape 8,384] [--backend cpp] [--latency-threads N]
    [--latency-dtype float32] [--latency-table T.json] [--remeasure-latency]

`add_latency_args` adds the flags (the two targets into the CLI's mutually exclusive target group),
`latency_args_error` checks them before any work, and `resolve_latency_target` turns them into the latency table
of this machine (engine.latency's cache: measured on the user's engine, keyed by machine, backend, dtype, shape,
threads and model dims) and the budget in ms, refusing an unreachable target with what is reachable.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engine.latency import LatencyTable

DEFAULT_LATENCY_THREADS = 2


def add_latency_args(
    ap: argparse.ArgumentParser, targets: argparse._MutuallyExclusiveGroup, default_shape: str | None = None
) -> None:
    """--target-latency-ms / --target-speedup into `targets`, and the engine setting they are measured on into `ap`."""
    targets.add_argument("--target-latency-ms", type=float, help="latency (ms) at --latency-shape on --backend")
    targets.add_argument("--target-speedup", type=float, help="speedup over the dense teacher on the same engine")
    ap.add_argument(
        "--latency-shape",
        default=default_shape,
        help="BATCH,SEQ of the forward whose latency is targeted (e.g. 8,384)"
        + (f"; default {default_shape}" if default_shape else "")
        + "; with a FLOP target only engine.prune_fast uses it, to add the measured speedup to metrics.json",
    )
    ap.add_argument("--backend", default="cpp", help="engine backend the latency is measured on")
    ap.add_argument("--latency-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--latency-threads",
        type=int,
        help=f"threads of the engine the latency is measured on (default: --threads, else {DEFAULT_LATENCY_THREADS})",
    )
    ap.add_argument("--latency-table", type=Path, help="use this table (refused unless measured for this setting)")
    ap.add_argument("--remeasure-latency", action="store_true", help="measure the table even if one is cached")


def has_latency_target(args: argparse.Namespace) -> bool:
    """Whether the run targets a latency (--target-latency-ms or --target-speedup)."""
    return args.target_latency_ms is not None or args.target_speedup is not None


def latency_args_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the latency flags, for ArgumentParser.error; None when they are usable."""
    from engine.latency import parse_shape

    if has_latency_target(args) and args.latency_shape is None:
        return "a latency target (--target-latency-ms / --target-speedup) needs --latency-shape BATCH,SEQ"
    if args.target_latency_ms is not None and args.target_latency_ms <= 0:
        return "--target-latency-ms must be > 0"
    if args.target_speedup is not None and args.target_speedup <= 1:
        return f"--target-speedup must be > 1 (relative to the dense teacher), got {args.target_speedup}"
    if args.latency_threads is not None and args.latency_threads < 1:
        return "--latency-threads must be >= 1"
    if args.latency_shape is not None:
        try:
            parse_shape(args.latency_shape)
        except ValueError as e:
            return str(e)
    return None


def latency_setting(args: argparse.Namespace) -> tuple[int, int, int]:
    """(batch, seq, threads) the latency is measured at."""
    from engine.latency import parse_shape

    if args.latency_shape is None:
        raise ValueError("a latency target needs --latency-shape BATCH,SEQ (e.g. 8,384)")
    b, s = parse_shape(args.latency_shape)
    return b, s, args.latency_threads or args.threads or DEFAULT_LATENCY_THREADS


def resolve_latency_target(args: argparse.Namespace, progress: bool = True) -> tuple[LatencyTable, float]:
    """The latency table of `args.teacher` on this machine (cached, or measured now) and the budget in ms.

    Raises ValueError (LatencyTableError for another setting's --latency-table) saying what is reachable when the
    target is below the empty model's latency or not below the dense one's. Sets torch's threads to the latency
    threads when it measures; callers that train afterwards set their own again.
    """
    from engine.latency import latency_budget, load_or_measure

    batch, seq, threads = latency_setting(args)
    table = load_or_measure(
        args.teacher,
        batch,
        seq,
        args.backend,
        threads,
        args.latency_dtype,
        args.latency_table,
        remeasure=args.remeasure_latency,
        progress=progress,
    )
    return table, latency_budget(table, args.target_latency_ms, args.target_speedup)


def latency_target_info(args: argparse.Namespace) -> dict[str, Any]:
    """metrics.json's `target` for a latency target: what was asked, and the engine setting it is measured on."""
    by, value = (
        ("latency_ms", args.target_latency_ms)
        if args.target_latency_ms is not None
        else ("speedup", args.target_speedup)
    )
    batch, seq, threads = latency_setting(args)
    return {
        "by": by,
        "value": value,
        "shape": args.latency_shape,
        "backend": args.backend,
        "threads": threads,
        "dtype": args.latency_dtype,
    }
