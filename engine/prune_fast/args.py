"""`python -m engine.prune_fast`: post-training pruning of a QA teacher in minutes, with no retraining.

    python -m engine.prune_fast --teacher DIR --train FILE [FILE ...] (--eval FILE | --eval-fraction F) --out DIR
        (--target-sparsity S | --target-latency-ms T | --target-speedup X) [--latency-shape 8,384 --backend cpp]
        [--samples 2048]

Stages (Kwon et al., NeurIPS 2022); each one's result is saved under OUT/state/ and reused by --resume:
  1. fisher     gradients of the span loss w.r.t. all-ones head and FFN-unit masks, one row per mini-batch of
                --batch windows over --samples train windows (saved every few batches, so resumable mid-stage);
  2. search     keep the units with the largest diagonal Fisher under the budget: encoder FLOPs (engine.flops) or
                latency from a table measured on the target engine (engine.latency); a latency-targeted shape is
                then measured on the engine against the dense one and the budget corrected (by the median ratio of
                measured to predicted latency over the rounds so far) until within --latency-tolerance;
  3. rearrange  within each layer, a greedy swap lowers the pruned units' full (not diagonal) Fisher quadratic form;
  4. tune       kept masks become real scales, fitted layer by layer by least squares against the dense teacher;
then the scales are folded into `o.weight` / `ffn_out.weight` columns, and (SparseQA's addition, --refit)
  5. refit      every kept output projection (`o`, `ffn_out`, with bias), layer by layer, and the QA head are
                refitted by ridge least squares against the teacher on the same windows (--refit head: the QA
                head alone; --refit none: Kwon et al.'s method as published);
SparseQA's reconstruction-aware options (engine/prune_fast/obs.py): --scores obs has the search rank units by what a
least-squares refit leaves of their removal (a stage between 1 and 2); --select obs replaces stages 3-5 by choosing
each layer's heads and units greedily by that refit's error, refitting as it goes. --distill-steps N (off by
default) then trains the cut model for N steps of logit distillation from the dense teacher on the same windows (or
on --distill-samples of them): only its biases and LayerNorms (--distill-params bias-ln) or every weight (all); the
shape stays. With --distill-teacher DENSE, --teacher may be a student already cut from DENSE (iterative pruning): it
is scored, searched and refitted as above, then distilled from DENSE. The stored null threshold comes from held-out
data: by default the one at which the student abstains as often as the teacher (--threshold-rule teacher-rate). OUT
gets a ragged checkpoint and metrics.json (docs/PRUNING.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.checkpoint import load_config
from engine.data.predict import add_threshold_arg
from engine.finetune import add_data_args, add_negatives_args, add_precision_arg
from engine.latency_target import add_latency_args, latency_args_error
from engine.prune_fast.tune import REFIT_RIDGE
from engine.spec import SpecError, parse_spec
from engine.train.config import resolve_device, resolve_precision
from engine.train.teacher import add_teacher_logits_args

MIN_SAMPLES = 16
DISTILL_LR = {"all": 5e-5, "bias-ln": 1e-3}  # --distill-lr defaults (docs/PRUNING.md: measured at 30%)
# Arguments a run may be resumed with other values of: how, where and from what the same numbers are computed (the
# cached teacher logits equal the live teacher's, to float rounding).
RESUME_IRRELEVANT = {"resume", "no_progress", "threads", "no_teacher_eval", "threshold_rule", "device",
                      "distill_device", "teacher_logits", "teacher_cache", "distill_eval_every"}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    ap = argparse.ArgumentParser(
        prog="python -m engine.prune_fast",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    ap.add_argument("--teacher", required=True, type=Path, help="fine-tuned QA checkpoint (BERT or RoBERTa)")
    add_data_args(ap)
    ap.add_argument("--out", required=True, type=Path)
    tgt = ap.add_mutually_exclusive_group(required=True)
    tgt.add_argument("--target-sparsity", type=float, help="fraction of encoder FLOPs to remove (at --flops-seq-len)")
    ap.add_argument("--flops-seq-len", type=int, default=384, help="sequence length at which FLOPs are counted")
    add_latency_args(ap, tgt)
    tgt.add_argument(
        "--spec",
        type=Path,
        help="keep exactly the heads and FFN units of this spec (engine.make_spec --by importance or random) instead "
        "of scoring and searching: an ablation of the choice of units; tuning, --refit and --distill-steps follow as "
        "usual (with --select fisher, no rearrangement)",
    )
    ap.add_argument("--samples", type=int, default=2048, help="train windows for Fisher scores and mask tuning")
    ap.add_argument("--tune-samples", type=int, help="windows for mask tuning (default: all --samples)")
    ap.add_argument("--batch", type=int, default=32, help="windows per Fisher mini-batch (one gradient row each)")
    ap.add_argument(
        "--scores",
        choices=("fisher", "obs"),
        default="fisher",
        help="per-unit scores the search allocates the budget by: fisher = diagonal Fisher (Kwon et al.); obs = "
        "what a least-squares refit leaves of each removal, on the Fisher scale (docs/PRUNING.md)",
    )
    ap.add_argument(
        "--score-samples",
        type=int,
        default=1024,
        help="windows (the first of --samples) on which --scores obs runs the removal paths",
    )
    ap.add_argument(
        "--select",
        choices=("fisher", "obs"),
        default="fisher",
        help="which heads and units each layer keeps (the search fixes how many): fisher = Kwon et al.'s "
        "rearrangement, then tuning and --refit; obs = chosen layer by layer by the error a least-squares refit of "
        "the output projection is left with, and refitted as chosen (replaces rearrange, tune and the layers' refit)",
    )
    ap.add_argument("--no-rearrange", action="store_true", help="skip mask rearrangement (ablation)")
    ap.add_argument("--no-tune", action="store_true", help="skip mask tuning: kept masks stay 1 (ablation)")
    ap.add_argument(
        "--refit",
        choices=("all", "layers", "head", "none"),
        default="all",
        help="after tuning, refit by least squares against the teacher every kept output projection and the QA "
        "head (all), the projections alone (layers), the QA head alone (head), or nothing (none: Kwon et al.'s "
        "method as published)",
    )
    ap.add_argument(
        "--refit-samples",
        type=int,
        help="train windows for the refit (default: the tuning windows); more than --samples draws further "
        "windows from the same seeded shuffle (a forward pass each, no gradients)",
    )
    ap.add_argument(
        "--refit-ridge",
        type=float,
        default=REFIT_RIDGE,
        help="the refit's ridge toward the tuned weights, relative to each system's mean Gram diagonal",
    )
    ap.add_argument(
        "--fit-error",
        choices=("pre-ln", "ln"),
        default="pre-ln",
        help="the error that the refit and --select obs minimise: each sublayer's squared pre-LayerNorm error "
        "(pre-ln), or that error weighted per token by 1/sigma^2 of its LayerNorm and per output by the LayerNorm "
        "gain^2, which is the error after LayerNorm to first order (ln); --scores obs stays pre-ln",
    )
    ap.add_argument(
        "--distill-steps",
        type=int,
        default=0,
        help="after the least-squares stages, this many steps of --batch windows of logit distillation from the "
        "dense teacher on the --samples windows (0, the default: none, no training at all)",
    )
    ap.add_argument(
        "--distill-params",
        choices=("all", "bias-ln"),
        default="all",
        help="what --distill-steps trains: every weight (all) or the biases and LayerNorms only (bias-ln)",
    )
    ap.add_argument(
        "--distill-lr",
        type=float,
        help=f"peak learning rate of --distill-steps (default {DISTILL_LR['all']:g} for all, "
        f"{DISTILL_LR['bias-ln']:g} for bias-ln)",
    )
    ap.add_argument(
        "--distill-weight",
        type=float,
        default=1.0,
        help="KD weight of --distill-steps; the span CE on the train labels gets 1 - w (default 1: match the "
        "teacher alone)",
    )
    ap.add_argument("--distill-temperature", type=float, default=2.0, help="KD temperature of --distill-steps")
    ap.add_argument(
        "--distill-hidden-weight",
        dest="hidden_weight",
        type=float,
        default=0.0,
        help="weight of a layer-by-layer MSE between the student's and the teacher's layer outputs, added to the "
        "logit loss of --distill-steps (TinyBERT/CoFi's layer distillation; the cut keeps the hidden size, so layer "
        "l matches layer l); > 0 runs the teacher live on every step (default 0: logits only)",
    )
    ap.add_argument(
        "--distill-teacher",
        type=Path,
        help="distil from this checkpoint instead of --teacher: iterative pruning, where --teacher is a student "
        "already pruned from it (same tokenizer and dims; --target-sparsity counts against --teacher's FLOPs)",
    )
    ap.add_argument(
        "--distill-eval-every",
        type=int,
        default=0,
        metavar="N",
        help="score the student on the held-out data every N distillation steps, at epoch ends and at the last "
        "step: the step curve in metrics.json (stages.distill.curve), kept across --resume (default 0: no curve)",
    )
    add_teacher_logits_args(ap, "auto")
    ap.add_argument(
        "--device",
        default="cpu",
        help="where the stages that run the model compute (Fisher, OBS scores and selection, tuning, refit, "
        "distillation): cpu (default), cuda, cuda:N, or auto (the first GPU torch sees, else the CPU); the search, "
        "evaluation and latency stay on the CPU, and every stage's result is kept on the CPU",
    )
    ap.add_argument(
        "--distill-device",
        help="where --distill-steps trains, if not on --device",
    )
    add_precision_arg(ap, "--distill-steps")
    ap.add_argument(
        "--distill-samples",
        type=int,
        help="train windows --distill-steps cycles through (default: --samples); more than --samples draws further "
        "windows from the same seeded shuffle",
    )
    ap.add_argument(
        "--save-stages",
        action="store_true",
        help="also write the untuned search and rearrange models as ragged checkpoints in OUT/stages/",
    )
    add_negatives_args(ap)
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--doc-stride", type=int, default=128)
    ap.add_argument("--max-query-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch threads for pruning, and for latency measurement (default 2)")
    ap.add_argument("--no-teacher-eval", action="store_true", help="do not evaluate the teacher (no f1_loss)")
    add_threshold_arg(ap, None)  # teacher-rate, or heldout under --no-teacher-eval (docs/PRUNING.md)
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT")
    ap.add_argument("--no-progress", action="store_true")
    return ap


# ------------------------------------------------------------------------------------------------- the run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed and checked (every refusal before the data or the teacher's weights are read) and
    its derived defaults filled in; a bad one exits with status 2 and the reason."""
    ap = build_parser()
    args = ap.parse_args(argv)
    for name in ("target_sparsity", "eval_fraction"):
        v = getattr(args, name)
        if v is not None and not 0 < v < 1:
            ap.error(f"--{name.replace('_', '-')} must lie in (0, 1)")
    if args.samples < MIN_SAMPLES:
        ap.error(
            f"--samples {args.samples} is too few for stable Fisher scores: use at least {MIN_SAMPLES} "
            f"(Kwon et al. use 2048)"
        )
    if args.refit_samples is not None and args.refit_samples < MIN_SAMPLES:
        ap.error(f"--refit-samples must be at least {MIN_SAMPLES}; got {args.refit_samples}")
    if args.score_samples < MIN_SAMPLES:
        ap.error(f"--score-samples must be at least {MIN_SAMPLES}; got {args.score_samples}")
    if args.select == "obs" and args.refit not in ("all", "layers"):
        ap.error(
            "--select obs refits every layer's output projection as it selects; --refit must be all (and the QA "
            "head) or layers"
        )
    if args.select == "obs" and (args.no_rearrange or args.no_tune):
        ap.error("--no-rearrange and --no-tune are ablations of --select fisher")
    if args.spec is not None and (args.select == "obs" or args.scores == "obs"):
        ap.error("--spec fixes the kept units: it takes --select fisher and --scores fisher (the defaults)")
    if args.spec is not None:  # checked before the data (or the teacher's weights) is read
        try:
            dense = load_config(args.teacher)
        except (OSError, ValueError) as e:
            ap.exit(2, f"error: {e}\n")
        try:
            parse_spec(args.spec, dense)
        except SpecError as e:
            ap.error(f"--spec: {e}")
    if args.distill_lr is None:
        args.distill_lr = DISTILL_LR[args.distill_params]
    if args.distill_steps < 0 or args.distill_lr <= 0 or not 0 <= args.distill_weight <= 1:
        ap.error("--distill-steps must be >= 0, --distill-lr > 0 and --distill-weight in [0, 1]")
    if args.hidden_weight < 0 or (args.hidden_weight and not args.distill_steps):
        ap.error(f"--distill-hidden-weight takes w >= 0 with --distill-steps; got {args.hidden_weight}")
    if args.hidden_weight and args.teacher_logits == "cached":
        ap.error("--distill-hidden-weight needs the teacher's layer outputs: --teacher-logits live or auto")
    if args.distill_teacher is not None and not args.distill_steps:
        ap.error("--distill-teacher is what --distill-steps distils from: give --distill-steps N too")
    if args.distill_eval_every < 0 or (args.distill_eval_every and not args.distill_steps):
        ap.error(f"--distill-eval-every takes N >= 1 with --distill-steps; got {args.distill_eval_every}")
    if args.threshold_rule is None:
        args.threshold_rule = "heldout" if args.no_teacher_eval else "teacher-rate"
    if args.threshold_rule == "teacher-rate" and args.no_teacher_eval:
        ap.error("--threshold-rule teacher-rate needs the teacher's held-out scores: drop --no-teacher-eval")
    for dest in ("device", "distill_device"):  # auto -> cuda or cpu; a device torch cannot use is refused here
        if getattr(args, dest) is None:
            continue
        try:
            setattr(args, dest, str(resolve_device(getattr(args, dest))))
        except (RuntimeError, ValueError) as e:
            flag, msg = "--" + dest.replace("_", "-"), str(e)
            ap.error(msg.replace("--device", flag, 1) if "--device" in msg else f"{flag}: {msg}")
    try:
        resolve_precision(args.precision, resolve_device(args.distill_device or args.device))
    except ValueError as e:
        ap.error(str(e))
    if args.distill_samples is not None and args.distill_samples < args.batch:
        ap.error(f"--distill-samples must be at least --batch ({args.batch}); got {args.distill_samples}")
    if args.batch < 1 or args.samples < args.batch:
        ap.error(f"--batch must lie in [1, --samples]; got {args.batch}")
    err = latency_args_error(args)
    if err is not None:
        ap.error(err)
    return args
