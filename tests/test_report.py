"""bench.report: the tables and ratios it derives from saved benchmark and evaluation JSON (synthetic inputs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import accuracy_tables, report
from tests.results_files import accuracy_row, bench_file, bench_info, eval_file, one_line

# name -> (F1 thr 0, best F1, HasAns F1 thr 0, F1 stored thr, HasAns F1 stored thr, FLOPs fraction, speedup)
CURRENT = {
    "teacher-v3": (60.0, 63.0, 76.0, 53.0, 70.0, 1.0, 1.0),
    "l0-v3-0.52": (59.5, 62.6, 75.1, 52.2, 69.0, 0.48, 2.1),  # loses 0.50 / 0.80 / 0.90: meets the 2x target
    "l0-v3-0.4": (59.9, 62.9, 75.9, 52.9, 69.9, 0.60, 1.6),  # better, but not 2x fewer FLOPs
    "l0-v3-0.5": (59.8, 62.8, 75.8, 52.8, 69.8, 0.502, 2.0),  # 1.99x fewer FLOPs: not >= 2x
    "nodistill-v3-0.52": (60.0, 63.0, 76.0, 53.0, 70.0, 0.45, 2.2),  # no loss, but a baseline, not a student
    "l0-v3-0.75": (57.0, 61.0, 70.0, 50.0, 64.0, 0.25, 3.8),  # loses 3.00 at >= 3.5x: misses the 2.5 target
}
# a weaker superseded teacher whose students would meet every target against it: the targets never look here
V2 = {
    "teacher-v2": (50.0, 58.0, 70.0, 48.0, 66.0, 1.0, 1.0),
    "l0-v2-0.52": (49.0, 57.0, 69.0, 47.0, 65.0, 0.48, 2.2),
    "random-v2-0.52": (45.0, 55.0, 60.0, 44.0, 58.0, 0.48, 2.2),
    "fast-v2-0.3": (50.0, 58.0, 70.0, 48.0, 66.0, 0.2, 4.5),
}
PREVIOUS = {
    "teacher-minilm": (40.0, 55.0, 66.0, 43.0, 62.0, 1.0, 1.0),
    "l0-0.5": (38.5, 54.0, 63.0, 42.0, 60.0, 0.5, 1.9),
}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    res = tmp_path / "results"
    res.mkdir()
    d, h = 8e9, 4e9  # dense and pruned FLOPs: a 2.0x FLOP reduction
    bench_file(
        res / "cpu.json",
        [
            bench_info("minilm-dense", "engine-cpp", 8, 384, d, d, 0.200),
            bench_info("minilm-half", "engine-cpp", 8, 384, h, d, 0.125),  # realized 1.6x -> 0.80 of the FLOP reduction
            bench_info("minilm-half", "ort-fused", 8, 384, h, d, 0.150),
            bench_info("minilm-dense", "hf-eager", 8, 384, d, d, 0.800),
        ],
    )
    acc = {"quoted": [{"name": "always no answer (floor)", "note": "quoted", "quoted": {"f1": 50.07}}]}
    for group, sub, runs in (("current", ".", CURRENT), ("v2", "v2", V2), ("previous", "previous", PREVIOUS)):
        for name, (f1, best, has, f1s, hass, _, _) in runs.items():
            eval_file(res / sub / f"eval-{name}.json", f1, best, has, f1s, hass)
        rows = [accuracy_row(res, n, v[5], v[6], sub) for n, v in runs.items()]
        acc[group] = {"folder": str(res / sub), "teacher": next(iter(runs)), "rows": rows}
    (res / "accuracy.json").write_text(json.dumps(acc))
    return res


def test_report_tables_and_ratios(results: Path, tmp_path: Path):
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    lines = text.splitlines()
    # realized 0.200/0.125 = 1.6x over a 2.0x FLOP reduction; 0.150/0.125 = 1.20x over ORT; 0.8/0.125 = 6.40x
    row = one_line(lines, "| (8,384) | engine-cpp | 0.80")
    assert "1.20x" in row and "6.40x" in row
    assert (tmp_path / "latency_vs_flops.png").stat().st_size > 0
    assert (tmp_path / "f1_vs_speedup.png").stat().st_size > 0
    assert (
        "| pruned C++ engine vs ORT-fused | stretch >= 1.2x (must >= 1.0x) | minilm-half (8,384) | 1.20x | yes | - |"
        in lines
    )
    assert one_line(
        lines, "| realized speedup ÷ FLOP reduction (C++ engine) | >= 0.95 | minilm-half vs dense "
    ).endswith("(8,384) | 0.80 (1.60x of 2.00x) | no | - |")


def test_each_group_is_judged_against_its_own_teacher(results: Path, tmp_path: Path):
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    current, rest = text.split("## Teacher v2 (every train file, 2,200 steps of 32 windows on 2 CPU cores)")
    v2, previous = rest.split("## Previous teacher (MiniLM fine-tuned on 25k windows, 1,600 steps)")
    current = current.split("## Accuracy on the complete official SQuAD 2.0 dev set")[1]  # in GROUPS order
    assert "`l0-v3-T`" in current and "Superseded" not in current
    assert "Superseded" in v2 and "`bench/results/v2/`" in v2 and "`l0-v2-T`" in v2
    assert "Superseded" in previous and "`bench/results/previous/`" in previous
    previous = previous.split("\n## ")[0]  # up to the next section
    assert "teacher-v2" not in current and "teacher-minilm" not in current + v2
    assert "teacher-v3" not in v2 + previous and "teacher-v2" not in previous
    # accuracy table: EM | F1 thr 0 | F1 stored | best | HasAns thr 0 | HasAns stored | NoAns (2 F1 - HasAns) | FLOPs
    assert "| l0-v3-0.52 | 54.50 | 59.50 | 52.20 | 62.60 | 75.10 | 69.00 | 43.90 | 0.48 | 47.6 | 2.10x |" in current
    assert "| l0-v2-0.52 | 44.00 | 49.00 | 47.00 | 57.00 | 69.00 | 65.00 | 29.00 | 0.48 | 45.5 | 2.20x |" in v2
    assert "| l0-0.5 | 33.50 | 38.50 | 42.00 | 54.00 | 63.00 | 60.00 | 14.00 | 0.50 | 52.6 | 1.90x |" in previous
    # F1 lost (thr 0 | stored thr | best | HasAns): against teacher-v3 in the current group ...
    assert "| l0-v3-0.52 | teacher-v3 | 0.48 | 2.10x | +0.50 | +0.80 | +0.40 | +0.90 |" in current
    assert "| l0-v3-0.75 | teacher-v3 | 0.25 | 3.80x | +3.00 | +3.00 | +2.00 | +6.00 |" in current
    # ... against teacher-v2 in the v2 group (against teacher-v3 it would be +10.50) ...
    assert "| l0-v2-0.52 | teacher-v2 | 0.48 | 2.20x | +1.00 | +1.00 | +1.00 | +1.00 |" in v2
    assert "| fast-v2-0.3 | teacher-v2 | 0.20 | 4.50x | +0.00 | +0.00 | +0.00 | +0.00 |" in v2
    # ... and against teacher-minilm in the previous one (against teacher-v3 it would be +21.50)
    assert "| l0-0.5 | teacher-minilm | 0.50 | 1.90x | +1.50 | +1.00 | +1.00 | +3.00 |" in previous
    assert "F1 lost against the fp32 teacher `teacher-v3` or the later teacher" in current
    assert "F1 lost against the fp32 teacher `teacher-v2` or the later teacher" in v2
    assert "F1 lost against the fp32 teacher `teacher-minilm` or the later teacher" in previous

    def ablations(section: str) -> list[str]:
        return [line for line in section.splitlines() if line.startswith(("| distillation", "| L0 gates"))]

    # ablations: each group's own pairs, only where both runs exist
    assert ablations(current) == [
        "| distillation (same L0 gates, hard labels only) | l0-v3-0.52 | nodistill-v3-0.52 | -0.50 | -0.80 | "
        "-0.40 | -0.90 |"
    ]
    assert ablations(v2) == [
        "| L0 gates vs random heads/units | l0-v2-0.52 | random-v2-0.52 | +4.00 | +3.00 | +2.00 | +9.00 |"
    ]
    assert "nodistill-0.5" not in previous  # the previous group's pairs are absent from it: no ablation table
    assert "What distillation and L0 gates buy" not in previous


def test_accuracy_targets_met_and_not_met(results: Path, tmp_path: Path):
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    # judged on the current group only: teacher-v3, not the weaker teacher-v2 nor its loss-free fast-v2-0.3
    assert one_line(lines, "| teacher HasAns F1 (thr 0) | >= 75.00 | teacher-v3 | 76.00 | yes |")
    assert one_line(
        lines, "| teacher F1 at its stored threshold | >= 52.07 | teacher-v3 (stored thr -3.00) | 53.00 | yes |"
    )
    assert one_line(lines, "| teacher best F1 | >= 62.00 | teacher-v3 | 63.00 | yes |")
    # the best student at <= 0.5 of the FLOPs: l0-v3-0.52 (l0-v3-0.5 is at 0.502, nodistill is a baseline)
    where = "| <= 1.00 (FLOPs fraction <= 0.5) | l0-v3-0.52 (FLOPs 0.480, 2.10x at (8,384)) |"
    assert one_line(lines, "| F1 lost by the best student at >= 2x fewer FLOPs (thr 0) ").endswith(
        f"{where} +0.50 | yes | - |"
    )
    assert one_line(lines, "| F1 lost by the best student at >= 2x fewer FLOPs (stored thr) ").endswith(
        f"{where} +0.80 | yes | - |"
    )
    assert one_line(lines, "| F1 lost by the best student at >= 2x fewer FLOPs (HasAns F1, thr 0) ").endswith(
        f"{where} +0.90 | yes | - |"
    )
    assert one_line(lines, "| F1 lost by the best student at >= 3.5x fewer FLOPs (thr 0) ").endswith(
        "| l0-v3-0.75 (FLOPs 0.250, 3.80x at (8,384)) | +3.00 (stored thr +3.00, HasAns +6.00) | no | - |"
    )
    assert not any("F1 lost at about 2x" in line for line in lines)  # the previous teacher's target is gone


def test_report_without_current_rows_says_so(results: Path, tmp_path: Path):
    acc = json.loads((results / "accuracy.json").read_text())
    acc["current"] = {"folder": str(results), "teacher": None, "rows": []}
    (results / "accuracy.json").write_text(json.dumps(acc))
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert "No current-teacher rows yet: evaluate `teacher-v3`" in text
    assert "| l0-0.5 | teacher-minilm | 0.50 | 1.90x | +1.50 |" in text
    assert "| l0-v2-0.52 | teacher-v2 | 0.48 | 2.20x | +1.00 |" in text
    assert sum("| not yet measured | - | - |" in line for line in text.splitlines()) == 11  # v2 rows are not judged
    assert (tmp_path / "f1_vs_speedup.png").stat().st_size > 0  # plotted from the v2 group


def test_report_without_accuracy_has_no_loss_table(results: Path, tmp_path: Path):
    (results / "accuracy.json").unlink()
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    assert "F1 lost against" not in out.read_text()
    assert not (tmp_path / "f1_vs_speedup.png").exists()


def test_report_refuses_the_old_one_teacher_format(results: Path, tmp_path: Path):
    (results / "accuracy.json").write_text(json.dumps([{"name": "x"}]))
    with pytest.raises(SystemExit, match="bench.accuracy_rows"):
        report.main(["--results", str(results), "--out", str(tmp_path / "RESULTS.md")])


def test_plots_come_from_the_newest_group_with_speedups(results: Path, tmp_path: Path, monkeypatch):
    seen = []
    monkeypatch.setattr(report, "plots", lambda rows, points, outdir, teacher=None: seen.append(teacher) or [])
    acc = json.loads((results / "accuracy.json").read_text())
    for drop in ("current", "v2"):
        assert report.main(["--results", str(results), "--out", str(tmp_path / "RESULTS.md")]) == 0
        acc[drop]["rows"] = []
        (results / "accuracy.json").write_text(json.dumps(acc))
    assert report.main(["--results", str(results), "--out", str(tmp_path / "RESULTS.md")]) == 0
    assert seen == ["teacher-v3", "teacher-v2", "teacher-minilm"]


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
        {"name": "l0-0.5", "f1": 36.0, "f1_stored": 44.0, "best_f1": 54.0, "HasAns_f1": 62.0},
        {"name": "nodistill-0.5", "f1": 35.0, "f1_stored": 41.5, "best_f1": 52.5, "HasAns_f1": 57.0},
        {"name": "importance-0.5-ft1000", "f1": 30.0, "f1_stored": 40.0, "best_f1": 50.0, "HasAns_f1": 40.0},
    ]  # its L0 pair is absent
    pairs = accuracy_tables.GROUP["previous"].ablations
    lines = accuracy_tables.ablation_table(pts, pairs).splitlines()
    assert len(lines) == 3 and "| l0-0.5 | nodistill-0.5 | +1.00 | +2.50 | +1.50 | +5.00 |" in lines[2]
    assert accuracy_tables.ablation_table(pts[1:], pairs) == ""
    assert accuracy_tables.ablation_table(pts, accuracy_tables.GROUP["current"].ablations) == ""


def test_distill_curve_from_the_metrics_beside_the_eval(tmp_path: Path):
    """A prune_fast run's held-out step curve (metrics-NAME.json beside eval-NAME.json) becomes its own table, with
    the best-F1 change from point to point; a row without one gets none."""
    ev = tmp_path / "eval-fast-cpu-0.75-x.json"
    ev.write_text("{}")
    assert accuracy_tables.distill_curve(ev) == []
    row = {"f1": 50.0, "best_f1": 55.5, "HasAns_f1_at_zero": 60.25, "auc": 0.7}
    curve = [{"step": 256, **row}, {"step": 512, **row, "best_f1": 56.0, "auc": None}]
    metrics = {"stages": {"distill": {"steps": 512, "curve": curve}}}
    (tmp_path / "metrics-fast-cpu-0.75-x.json").write_text(json.dumps(metrics))
    assert accuracy_tables.distill_curve(ev) == curve
    pts = [{"name": "fast-cpu-0.75-x", "curve": curve}, {"name": "other", "curve": []}]
    lines = accuracy_tables.curve_tables(pts).strip().splitlines()
    assert "`fast-cpu-0.75-x`" in lines[0] and "other" not in "".join(lines)
    assert lines[-2:] == [
        "| 256 | 50.00 | 55.50 | 60.25 | 0.700 |  |",
        "| 512 | 50.00 | 56.00 | 60.25 | not measured | +0.50 |",
    ]
    assert accuracy_tables.curve_tables(pts[1:]) == ""


def test_repeated_cpu_runs_are_listed_beside_the_recorded_one(results: Path, tmp_path: Path):
    d, h = 8e9, 4e9
    bench_file(
        results / "cpu-repeat-1.json",
        [
            bench_info("minilm-dense", "engine-cpp", 8, 384, d, d, 0.190),
            bench_info("minilm-half", "engine-cpp", 8, 384, h, d, 0.100),  # 1.9x of 2.0x -> 0.95; ORT 0.150/0.100
            bench_info("minilm-half", "ort-fused", 8, 384, h, d, 0.150),
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
        precision = i.get("precision", "bf16" if i["provider"] == "ours-bf16" else "fp32")
        assert f"| {i['provider']} | {precision} | {i['windows_per_s']:.2f} | {i['vs_hf_padded']:.2f}x |" in text
    serve = json.loads((committed / "serve.json").read_text())
    for r in serve["rows"]:
        assert f"| {r['server']} | {r['clients']} | {r['qps']:.1f} | {r['p50_ms']:.0f} |" in text
    tok = json.loads((committed / "tokenizer.json").read_text())["benchmarks"][0]["extra_info"]
    assert f"{tok['speed_vs_hf']:.2f}x" in text
