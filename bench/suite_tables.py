"""RESULTS.md sections of the suites that write one JSON file each: training throughput, serving, batch QA, the
engine beside torch, and the C++ tokenizer (used by `bench.report`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _extra(path: Path) -> list[dict[str, Any]]:
    """The `extra_info` of every benchmark in one pytest-benchmark JSON file."""
    return [b["extra_info"] for b in json.loads(path.read_text()).get("benchmarks", [])]


def train_table(path: Path) -> str:
    """Training throughput per step variant (bench/test_train_throughput.py), against HF's padded fp32 step."""
    rows = _extra(path)
    first = rows[0]
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in first.get("gemm_peak_gflops", {}).items())
    out = [
        f"Machine: {first['cpu']}, {first['threads']} threads; MiniLM-L6 at batch {first['batch']} x seq "
        f"{first['seq']} (real SQuAD windows); GEMM peak measured in the same run (GFLOP/s): {peaks}. "
        "Variants are timed interleaved in one process.\n",
        "| step | precision | windows/s | vs HF padded | train GFLOP/s | % of that precision's GEMM peak |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        precision = r.get("precision", "bf16" if r["provider"] == "ours-bf16" else "fp32")
        out.append(
            f"| {r['provider']} | {precision} | {r['windows_per_s']:.2f} | {r['vs_hf_padded']:.2f}x | "
            f"{r['train_gflops']:.1f} | {r['pct_of_peak']:.0f}% |"
        )
    return "\n".join(out)


def serve_table(path: Path) -> str:
    """HTTP serving throughput and latency, batched server against one-request-per-call (bench/test_serve.py)."""
    res = json.loads(path.read_text())
    out = [
        f"Model {res['model']} ({res['dtype']}, {res['backend']} backend, {res['threads']} threads) on "
        f"{res['device']}; `QAEngine.answer_batch` alone: {res['engine_answer_batch_qps']:.1f} questions/s. "
        f"Note: {res.get('note', '')}.\n",
        "| server | clients | questions/s | p50 ms | p99 ms | questions per server CPU-s | errors / lost |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        out.append(
            f"| {r['server']} | {r['clients']} | {r['qps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
            f"{r['q_per_cpu_s']:.1f} | {r['errors']} / {r['lost']} |"
        )
    ratio = ", ".join(f"{c} clients {v:.2f}x" for c, v in res.get("speedup_vs_naive", {}).items())
    served = ", ".join(f"{c} clients {v:.0%}" for c, v in res.get("served_vs_answer_batch", {}).items())
    out.append(f"\nBatched vs naive throughput: {ratio}. Served / answer_batch throughput: {served}.")
    return "\n".join(out)


def coexist_table(path: Path) -> str:
    """Engine latency alone and right after torch work in the same process (bench/test_coexist.py)."""
    out = [
        "| backend | model | shape | condition | p50 ms | p99 ms | p99 / p50 | p50 vs alone |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = _extra(path)
    for r in rows:
        shape = f"{r['batch']}x{r['seq']}" if "batch" in r else f"{r.get('pairs', '-')} pairs"
        for cond, c in r["conditions"].items():
            vs = r.get("p50_ratio_vs_alone", {}).get(cond)
            out.append(
                f"| {r['backend']} | {r['model']} | {shape} | {cond} | {c['p50_ms']:.1f} | {c['p99_ms']:.1f} | "
                f"{c['p99_ms'] / c['p50_ms']:.2f} | {f'{vs:.2f}x' if vs else '-'} |"
            )
    r0 = rows[0]
    out.append(
        f"\nOpenMP state: {r0['openmp_state']} (GOMP_SPINCOUNT={r0['GOMP_SPINCOUNT']}), {r0['threads']} threads, "
        f"1-minute load average at start {r0['loadavg_1min_start']:.1f}."
    )
    return "\n".join(out)


def tokenizer_line(path: Path) -> str:
    """C++ byte-level BPE against HF `tokenizers` (bench/test_tokenizer_speed.py)."""
    r = _extra(path)[0]
    return (
        f"{r['work']} ({r['texts']:,} texts, {r['chars']:,} characters, ids + offsets, {r['threads']} thread, "
        f"{r['device']}): C++ {r['cpp_chars_per_s'] / 1e6:.2f} M chars/s, HF `tokenizers` "
        f"{r['hf_chars_per_s'] / 1e6:.2f} M chars/s: {r['speed_vs_hf']:.2f}x, "
        f"median of {r['rounds']} interleaved rounds."
    )


def batch_qa_table(path: Path) -> str:
    """Offline batch QA over the whole dev set, one process against Ray workers (engine.batch_qa)."""
    res = json.loads(path.read_text())
    dev = res["dev"]
    out = [
        f"{dev['questions']:,} dev questions, {dev['model']} on the {dev['backend']} backend, {dev['device']}. "
        f"Note: {dev.get('note', '')}.\n",
        "| run | args | seconds | questions/s | missing | mismatched |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("local", "ray"):
        r = dev[name]
        out.append(
            f"| {name} | `{' '.join(r['args'])}` | {r['seconds']:.0f} | {r['qps']:.1f} | {r['missing']} | "
            f"{r['mismatched']} |"
        )
    k = res.get("ray_kill_and_resume")
    if k:
        out.append(
            f"\nKill and resume: a Ray worker was killed after {k['shards_written_at_actor_kill']} of "
            f"{k['shards_total']} shards and the job after {k['shards_written_before_job_killed']}; the resumed run "
            f"wrote {k['lines']:,} lines, {k['unique_ids']:,} unique ids, {k['missing']} missing, "
            f"{k['mismatched']} mismatched."
        )
    return "\n".join(out)
