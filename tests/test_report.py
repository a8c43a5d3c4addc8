"""bench.report: the tables and ratios it derives from saved benchmark and evaluation JSON (synthetic inputs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench import report


def _bench_file(path: Path, rows: list[dict]) -> None:
    """A pytest-benchmark JSON with the given (extra_info, median seconds) rows."""
    benchmarks = [{"extra_info": info, "stats": {"median": median}} for info, median in rows]
    path.write_text(json.dumps({"machine_info": {"cpu": {"brand_raw": "Test CPU"}}, "benchmarks": benchmarks}))


def _info(model: str, provider: str, batch: int, seq: int, flops: float, dense_flops: float, median: float) -> tuple:
    return (
        {
            "provider": provider,
            "model": model,
            "batch": batch,
            "seq": seq,
            "dtype": "float32",
            "threads": 2,
            "flops": flops,
            "dense_flops": dense_flops,
            "gflops_per_s": flops / median / 1e9,
            "gemm_peak_gflops": 500.0,
            "pct_of_peak": 100 * flops / median / 1e9 / 500.0,
        },
        median,
    )


def _eval_file(path: Path, f1: float, best_f1: float, has: float) -> Path:
    path.write_text(
        json.dumps(
            {
                "artifact": "unused",
                "at_zero": {"exact": f1 - 5, "f1": f1, "best_f1": best_f1, "HasAns_f1": has, "NoAns_f1": 2 * f1 - has},
            }
        )
    )
    return path


@pytest.fixture
def results(tmp_path: Path) -> Path:
    res = tmp_path / "results"
    res.mkdir()
    d, h = 8e9, 4e9  # dense and pruned FLOPs: a 2.0x FLOP reduction
    _bench_file(
        res / "cpu.json",
        [
            _info("minilm-dense", "engine-cpp", 8, 384, d, d, 0.200),
            _info("minilm-half", "engine-cpp", 8, 384, h, d, 0.125),  # realized 1.6x -> 0.80 of the FLOP reduction
            _info("minilm-half", "ort-fused", 8, 384, h, d, 0.150),
            _info("minilm-dense", "hf-eager", 8, 384, d, d, 0.800),
        ],
    )
    teacher = _eval_file(res / "eval-teacher-minilm.json", 60.0, 62.0, 70.0)
    student = _eval_file(res / "eval-l0-0.5.json", 58.5, 61.0, 67.0)
    acc = [
        {
            "name": "teacher-minilm",
            "eval": str(teacher),
            "artifact_flops": d,
            "dense_flops": d,
            "command": "c1",
            "latency": {"8x384": {"ms": 100.0, "speedup_vs_teacher": 1.0, "speedup_vs_hf_eager": 8.0}},
        },
        {
            "name": "l0-0.5",
            "eval": str(student),
            "artifact_flops": h,
            "dense_flops": d,
            "command": "c2",
            "speedup": 1.9,
            "latency": {"8x384": {"ms": 52.6, "speedup_vs_teacher": 1.9, "speedup_vs_hf_eager": 15.2}},
        },
        {"name": "always no answer (floor)", "note": "quoted", "quoted": {"f1": 50.07}},
    ]
    (res / "accuracy.json").write_text(json.dumps(acc))
    return res


def test_report_tables_and_ratios(results: Path, tmp_path: Path):
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    # realized 0.200/0.125 = 1.6x over a 2.0x FLOP reduction; 0.150/0.125 = 1.20x over ORT; 0.8/0.125 = 6.40x
    row = next(line for line in text.splitlines() if line.startswith("| (8,384) | engine-cpp | 0.80"))
    assert "1.20x" in row and "6.40x" in row
    # F1 lost: 60.0 - 58.5 at threshold 0, 62 - 61 best, 70 - 67 HasAns
    loss = next(line for line in text.splitlines() if line.startswith("| l0-0.5 | 0.50 |"))
    assert re.search(r"\+1\.50 \| \+1\.00 \| \+3\.00", loss), loss
    assert "1.90x" in loss
    # the student row of the accuracy table carries its latency and both speedups; the quoted row says so
    acc = next(line for line in text.splitlines() if line.startswith("| l0-0.5 | 53.50 |"))
    assert "52.6" in acc and "1.90x" in acc and "15.20x" in acc
    assert "quoted: quoted" in text
    assert (tmp_path / "latency_vs_flops.png").stat().st_size > 0
    assert (tmp_path / "f1_vs_speedup.png").stat().st_size > 0
    # the targets in one table, each with its verdict
    lines = text.splitlines()
    assert (
        "| pruned C++ engine vs ORT-fused | stretch >= 1.2x (must >= 1.0x) | minilm-half (8,384) | 1.20x | yes | - |"
        in lines
    )
    assert any(
        line.startswith(
            "| realized speedup ÷ FLOP reduction (C++ engine) | >= 0.95 | minilm-half vs dense "
            "(8,384) | 0.80 (1.60x of 2.00x) | no | - |"
        )
        for line in lines
    )
    f1_row = next(line for line in lines if line.startswith("| F1 lost at about 2x"))
    assert "l0-0.5 (1.90x at (8,384))" in f1_row and "+1.50 (best-F1 +1.00) | yes | - |" in f1_row


def test_report_without_accuracy_has_no_loss_table(results: Path, tmp_path: Path):
    (results / "accuracy.json").unlink()
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    assert "F1 lost" not in out.read_text()
    assert not (tmp_path / "f1_vs_speedup.png").exists()


def test_workload_table_compares_with_the_hf_pipeline(tmp_path: Path):
    def info(provider, model, batch, questions, qps):
        return {
            "extra_info": {
                "provider": provider,
                "backend": "cpp" if provider == "engine" else "transformers-sdpa",
                "model": model,
                "batch": batch,
                "questions": questions,
                "questions_per_s": qps,
                "p50_ms": 10.0,
                "p99_ms": 30.0,
                "latency_unit": "per question",
            }
        }

    path = tmp_path / "workload-full.json"
    path.write_text(
        json.dumps(
            {
                "benchmarks": [
                    info("hf-pipeline", "m", 1, 11873, 20.0),
                    info("engine", "m", 1, 11873, 90.0),
                    info("engine", "m", 32, 11873, 100.0),
                    info("engine", "m", 1, 400, 70.0),
                ]
            }
        )
    )
    lines = report.workload_table([path]).splitlines()
    assert lines[2].startswith("| 11873 | m | 1 | engine | cpp | 90.0 | 4.50x |")  # full run first, HF ratio
    assert "| 11873 | m | 32 | engine | cpp | 100.0 | - |" in lines[4]  # no HF row at batch 32: no ratio
    assert lines[-1].startswith("| 400 | m | 1 | engine | cpp | 70.0 | - |")  # other question counts are not compared


def test_gpu_section_names_the_card_or_says_why_not(tmp_path: Path):
    assert "No GPU figures" in report.gpu_section(tmp_path / "gpu.json")
    (tmp_path / "gpu.json").write_text(
        json.dumps(
            {
                "status": "measured on NVIDIA H100",
                "machine": {"device": "NVIDIA H100 80GB HBM3", "bf16_gemm_peak_tflops": 700},
                "errors": [],
                "rows": [
                    {
                        "model": "ragged",
                        "dtype": "bfloat16",
                        "shape": "1x128",
                        "provider": "triton",
                        "ms": 0.5,
                        "tflops": 12.3,
                        "pct_peak": 1.8,
                        "speedup_vs_hf_sdpa": 3.0,
                        "speedup_vs_dense": 1.9,
                    }
                ],
            }
        )
    )
    text = report.gpu_section(tmp_path / "gpu.json")
    assert (
        "NVIDIA H100 80GB HBM3" in text
        and "| ragged | bfloat16 | 1x128 | triton | 0.500 | 12.3 | 2% | 3.00x | 1.90x |" in text
    )


def test_ablation_table_subtracts_the_baseline_at_the_same_budget():
    pts = [
        {"name": "l0-0.5", "f1": 36.0, "best_f1": 54.0, "HasAns_f1": 62.0},
        {"name": "nodistill-0.5", "f1": 35.0, "best_f1": 52.5, "HasAns_f1": 57.0},
        {"name": "importance-0.5-ft1000", "f1": 30.0, "best_f1": 50.0, "HasAns_f1": 40.0},
    ]  # its L0 pair is absent
    lines = report.ablation_table(pts).splitlines()
    assert len(lines) == 3 and "| l0-0.5 | nodistill-0.5 | +1.00 | +1.50 | +5.00 |" in lines[2]
    assert report.ablation_table(pts[1:]) == ""


def test_repeated_cpu_runs_are_listed_beside_the_recorded_one(results: Path, tmp_path: Path):
    d, h = 8e9, 4e9
    _bench_file(
        results / "cpu-repeat-1.json",
        [
            _info("minilm-dense", "engine-cpp", 8, 384, d, d, 0.190),
            _info("minilm-half", "engine-cpp", 8, 384, h, d, 0.100),  # 1.9x of 2.0x -> 0.95; ORT 0.150/0.100
            _info("minilm-half", "ort-fused", 8, 384, h, d, 0.150),
        ],
    )
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert any(line.endswith("| 0.80 (1.60x of 2.00x) | no | 0.95 |") for line in lines)  # recorded run decides
    assert any(line.endswith("| 1.20x | yes | 1.50x |") for line in lines)
    # the repeat's rows are not mixed into the latency tables
    assert sum(line.startswith("| (8,384) | engine-cpp | 0.80") for line in lines) == 1


def test_suite_sections_come_from_the_committed_results(tmp_path: Path):
    """Each suite with a committed JSON file gets its section, and the table cells are that file's numbers."""
    committed = report.RESULTS
    for name in ("train.json", "serve.json", "batch_qa.json", "coexist.json", "tokenizer.json"):
        if not (committed / name).is_file():
            pytest.skip(f"bench/results/{name} is not committed")
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(committed), "--out", str(out)]) == 0
    text = out.read_text()
    for title in ("Training throughput", "HTTP serving", "Offline batch QA", "beside PyTorch", "byte-level BPE"):
        assert f"## {title}" in text or title in text, title
    for b in json.loads((committed / "train.json").read_text())["benchmarks"]:
        i = b["extra_info"]
        assert f"| {i['provider']} | {i['windows_per_s']:.2f} | {i['vs_hf_padded']:.2f}x |" in text
    serve = json.loads((committed / "serve.json").read_text())
    for r in serve["rows"]:
        assert f"| {r['server']} | {r['clients']} | {r['qps']:.1f} | {r['p50_ms']:.0f} |" in text
    tok = json.loads((committed / "tokenizer.json").read_text())["benchmarks"][0]["extra_info"]
    assert f"{tok['speed_vs_hf']:.2f}x" in text
