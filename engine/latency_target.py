"""Latency targets on the command line, shared by engine.prune (L0) and engine.prune_fast (post-training).

    (--target-latency-ms T | --target-speedup X)  [--latency-shape 8,384] [--backend cpp] [--latency-threads N]
    [--latency-dtype float32] [--latency-table T.json] [--remeasure-latency]

`add_latency_args` adds the flags (the two targets into the CLI's mutually exclusive target group),
`latency_args_error` checks them before any work, and `resolve_latency_target` turns them into the latency table
of this machine (engine.latency's cache: measured on the user's engine, keyed by machine, backend, dtype, shape,
threads and model dims) and the budget in ms, refusing an unreachable target with what is reachable.
`meet_measured_latency` then measures a shape cut to that budget against the dense model on the engine and
corrects the budget until the measured figure is within --latency-tolerance of the target.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from engine.config import EncoderConfig
from engine.latency_table import LatencyTable
from engine.latency_timer import Shape

T = TypeVar("T")

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
    ap.add_argument(
        "--latency-tolerance",
        type=float,
        default=0.03,
        help="re-cut until the engine-measured latency (or speedup) is within this fraction of the target",
    )
    ap.add_argument(
        "--latency-iterations",
        type=int,
        default=4,
        help="at most this many measure-and-correct rounds (engine.prune: 0 trusts the table alone)",
    )


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
    if args.latency_iterations < 0 or args.latency_tolerance <= 0:
        return "--latency-iterations must be >= 0 and --latency-tolerance > 0"
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
    from engine.latency import load_or_measure
    from engine.latency_table import latency_budget

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


def exported_latency(
    args: argparse.Namespace, model_dir: Path, cfg: EncoderConfig, table: LatencyTable, budget_ms: float
) -> dict[str, Any]:
    """metrics.json's `latency` of a pruned checkpoint: its speedup over the teacher measured on the engine (both
    built with their real weights, timed interleaved: engine.latency_timer.measure_speedup) and the table's prediction
    for its shape `cfg` against the budget."""
    from engine.latency_timer import measure_speedup

    batch, seq, threads = latency_setting(args)
    measured = measure_speedup(model_dir, args.teacher, batch, seq, args.backend, threads, args.latency_dtype)
    predicted = table.predict(cfg.heads, cfg.ffn)
    return {
        **measured,
        "predicted_ms": predicted,
        "predicted_dense_ms": table.dense_ms(),
        "predicted_speedup": table.dense_ms() / predicted,
        "budget_ms": budget_ms,
        "table_base_ms": table.base_ms,
        "table_key": asdict(table.key),
    }


def meet_measured_latency(
    args: argparse.Namespace,
    dense: EncoderConfig,
    table: LatencyTable,
    budget: float,
    choose: Callable[[float], tuple[T, Shape, float]],
) -> tuple[T, list[dict[str, Any]]]:
    """Cut to the table's budget, measure the cut shape and the dense one on the engine, correct the budget, repeat.

    `choose(budget_ms)` returns (the cut, its shape, its table-predicted ms). Each round times both shapes
    interleaved (engine.latency_timer.EngineTimer, random weights: only the shape matters); the loop stops when the
    measured latency (or the paired speedup) is within --latency-tolerance of the target, or after
    --latency-iterations rounds (at least one). Returns the cut of the round closest to the target, and every round.
    """
    from engine.latency_timer import EngineTimer

    batch, seq, threads = latency_setting(args)
    timer = EngineTimer(
        dense, args.teacher, args.backend, args.latency_dtype, batch, seq, threads, reps=7, progress=False
    )
    rounds: list[dict[str, Any]] = []
    best: tuple[T, float] | None = None
    try:
        for _ in range(max(1, args.latency_iterations)):
            cut, shape, predicted = choose(budget)
            ms, dense_ms = timer([shape, (dense.heads, dense.ffn)])
            speedup = timer.paired_speedup()  # median of back-to-back ratios: robust to changing machine load
            if args.target_latency_ms is not None:
                want, err = args.target_latency_ms, args.target_latency_ms / ms - 1  # > 0: faster than needed
            else:
                want, err = dense_ms / args.target_speedup, speedup / args.target_speedup - 1
                ms = dense_ms / speedup  # the pruned latency implied by the paired speedup
            rounds.append(
                {
                    "budget_ms": budget,
                    "predicted_ms": predicted,
                    "measured_ms": ms,
                    "measured_dense_ms": dense_ms,
                    "measured_speedup": speedup,
                    "target_ms": want,
                    "rel_error": err,
                    "heads": list(shape[0]),
                    "ffn": list(shape[1]),
                }
            )
            if best is None or abs(err) < abs(best[1]):
                best = (cut, err)
            if abs(err) <= args.latency_tolerance:
                break
            # Correct the table by the median over all rounds so far (one noisy round moves it little) of measured /
            # predicted latency, or for a speedup target of measured / predicted speedup (relative to the dense model
            # measured in the same round, so load that changes between rounds cancels).
            if args.target_latency_ms is not None:
                k = statistics.median(r["measured_ms"] / r["predicted_ms"] for r in rounds)
                budget = args.target_latency_ms / k
            else:
                k = statistics.median(r["measured_speedup"] * r["predicted_ms"] / table.dense_ms() for r in rounds)
                budget = table.dense_ms() * k / args.target_speedup
            budget = max(table.base_ms * 1.02, budget)
    finally:
        timer.close()
    return best[0], rounds
