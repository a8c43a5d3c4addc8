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
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import load_checkpoint, load_config, save_checkpoint
from engine.config import EncoderConfig
from engine.data.predict import add_threshold_arg
from engine.features import WindowMaker, WindowSettings, load_tokenizer
from engine.finetune import add_data_args, add_negatives_args, add_precision_arg
from engine.flops import encoder_params, flop_sparsity
from engine.latency_target import (
    add_latency_args,
    latency_args_error,
    latency_setting,
    latency_target_info,
)
from engine.model import RaggedQAModel
from engine.prune_fast.masked import fold_masks
from engine.prune_fast.stages import (
    StageStore,
    masks_from_indices,
    sample_features,
    stage_distill,
    stage_fisher,
    stage_obs,
    stage_rearrange,
    stage_refit,
    stage_scores,
    stage_search,
    stage_tune,
)
from engine.prune_fast.tune import REFIT_RIDGE
from engine.spec import PruneSpec, SpecError, parse_spec
from engine.train.config import resolve_device, resolve_precision
from engine.train.teacher import add_teacher_logits_args

MIN_SAMPLES = 16
DISTILL_LR = {"all": 5e-5, "bias-ln": 1e-3}  # --distill-lr defaults (docs/PRUNING.md: measured at 30%)
# Arguments a run may be resumed with other values of: how, where and from what the same numbers are computed (the
# cached teacher logits equal the live teacher's, to float rounding).
_RESUME_IRRELEVANT = {"resume", "no_progress", "threads", "no_teacher_eval", "threshold_rule", "device",
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


def _check_resume(store: StageStore, args: argparse.Namespace) -> None:
    """Refuse to resume a run started with different arguments."""
    fp = {
        k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
        for k, v in vars(args).items()
        if k not in _RESUME_IRRELEVANT
    }
    old = store.json("run.json")
    if old is not None:
        # an argument added after the run started counts as given at its default
        defaults = {k: v for k, v in fp.items() if k not in old and v == build_parser().get_default(k)}
        old = {**defaults, **old}
        diff = sorted(k for k in set(fp) | set(old) if fp.get(k) != old.get(k))
        if diff:
            raise ValueError(
                f"--resume: {store.root.parent} was started with other arguments ({', '.join(diff)}); "
                f"use the same arguments or another --out"
            )
    store.put_json("run.json", fp)


def _save_stage_model(
    out: Path,
    name: str,
    model: RaggedQAModel,
    hk: list[torch.Tensor],
    fk: list[torch.Tensor],
    hf_config: dict[str, Any],
    tokenizer: Any,
) -> None:
    cfg, state = fold_masks(model, [m.float() for m in hk], [m.float() for m in fk])
    save_checkpoint(out / "stages" / name, cfg, state, hf_config, tokenizer=tokenizer)


def prune_fast(args: argparse.Namespace) -> dict[str, Any]:
    """Run every stage; returns metrics.json's content."""
    from transformers import AutoTokenizer

    from engine.data.predict import evaluate_model, stored_threshold
    from engine.finetune import prepare_data
    from engine.prune.train import metrics_row

    t_start = time.monotonic()
    progress = not args.no_progress
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise FileExistsError(f"{out} is not empty; pass --resume to continue that run or choose another --out")
    teacher_ck = load_checkpoint(args.teacher)
    dense = teacher_ck.cfg
    if teacher_ck.qa_head_initialised:
        print(
            "warning: the teacher has no trained QA head (a bare encoder); its scores are meaningless", file=sys.stderr
        )
    # checked before anything is read, computed or written
    source_ck = (
        None if args.distill_teacher is None else load_distill_teacher(args.distill_teacher, args.teacher, dense)
    )
    store = StageStore(out / "state")
    _check_resume(store, args)
    settings = WindowSettings(args.max_seq_length, args.doc_stride, args.max_query_length)
    settings.validate(dense.architecture, dense.max_position_embeddings)
    maker = WindowMaker(load_tokenizer(args.teacher), dense.architecture, settings)
    train, evals, data_info = prepare_data(args)
    pool = sample_features(
        train, maker, max(args.samples, args.refit_samples or 0, args.distill_samples or 0), args.seed
    )
    feats = pool[: args.samples]  # a prefix: the same windows as sampling --samples alone
    data_info["train"]["windows_used"] = len(pool)
    model = RaggedQAModel(dense)
    model.load_state_dict(teacher_ck.state)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(args.teacher))

    stages: dict[str, Any]
    if args.spec is not None:  # the units are given: no scores, no search, no rearrangement
        hk, fk = spec_masks(parse_spec(args.spec, dense), dense)
        stages = {"spec": {"path": str(args.spec), "heads_kept": int(sum(m.sum() for m in hk)), "time_s": 0.0,
                           "cpu_s": 0.0}}  # fmt: skip
    else:
        hg, fg, fisher_info = stage_fisher(store, model, feats, args.batch, progress, args.device)
        hs, fs, scores_info = stage_scores(store, args, model, pool, hg, fg, progress)
        hk, fk, search_info = stage_search(store, args, dense, hs, fs, progress)
        if args.save_stages:
            _save_stage_model(out, "search", model, hk, fk, teacher_ck.hf_config, tokenizer)
        stages = {"fisher": fisher_info, "scores": scores_info, "search": search_info}
    if args.select == "obs":
        cfg, state, stages["obs"] = stage_obs(store, args, model, hk, fk, pool, progress)
    else:
        if args.spec is None:
            hk, fk, stages["rearrange"] = stage_rearrange(store, args, dense, hg, fg, hk, fk)
            if args.save_stages:
                _save_stage_model(out, "rearrange", model, hk, fk, teacher_ck.hf_config, tokenizer)
        hm, fm, stages["tune"] = stage_tune(store, args, model, feats, hk, fk, progress)
        cfg, state = fold_masks(model, hm, fm)
        if args.save_stages and args.refit != "none":
            save_checkpoint(out / "stages" / "tune", cfg, state, teacher_ck.hf_config, tokenizer=tokenizer)
        state, stages["refit"] = stage_refit(store, args, model, cfg, state, pool, progress)

    def held_out(student: RaggedQAModel) -> dict[str, Any]:  # a distillation curve point (on the CPU)
        return metrics_row(evaluate_model(student.eval(), evals, maker, progress=False))

    source, source_cfg = model, dense
    if source_ck is not None:
        source, source_cfg = RaggedQAModel(source_ck.cfg), source_ck.cfg
        source.load_state_dict(source_ck.state)
        source.eval()
    state, stages["distill"] = stage_distill(
        store,
        args,
        source,
        (cfg, state),
        pool,
        settings,
        progress,
        held_out if args.distill_eval_every else None,
        args.distill_teacher,
    )
    prune_time = sum(s["time_s"] for s in stages.values())
    prune_cpu = sum(s["cpu_s"] for s in stages.values())

    student = RaggedQAModel(cfg)
    student.load_state_dict(state)
    res_s = evaluate_model(student.eval(), evals, maker, progress=progress)
    res_t = None if args.no_teacher_eval else evaluate_model(model, evals, maker, progress=progress)
    res_s = stored_threshold(args.threshold_rule, res_s, res_t, teacher_ck.null_threshold, evals)
    save_checkpoint(out, cfg, state, teacher_ck.hf_config, tokenizer=tokenizer, null_threshold=res_s["null_threshold"])
    metrics = {
        "schema_version": 1,
        "method": "post-training",
        "target": _target_info(args),
        "achieved_flop_sparsity": flop_sparsity(cfg, dense, args.flops_seq_len),
        "achieved_param_sparsity": 1.0 - encoder_params(cfg) / encoder_params(dense),
        "heads": list(cfg.heads),
        "ffn": list(cfg.ffn),
        "dense_heads": list(dense.heads),
        "dense_ffn": list(dense.ffn),
        "teacher": metrics_row(res_t) if res_t else None,
        "student": metrics_row(res_s),
        "f1_loss": res_t["at_zero"]["f1"] - res_s["at_zero"]["f1"] if res_t else None,
        "distill_teacher": None
        if args.distill_teacher is None
        else {
            "path": str(args.distill_teacher),
            "heads": list(source_cfg.heads),
            "ffn": list(source_cfg.ffn),
            "achieved_flop_sparsity": flop_sparsity(cfg, source_cfg, args.flops_seq_len),
        },
        "stages": stages,
        "prune_time_s": prune_time,
        "prune_cpu_s": prune_cpu,
        "distillation": bool(args.distill_steps),
        "device": args.device,
        "threshold_rule": args.threshold_rule,
        "data": data_info,
    }
    if args.latency_shape is not None:
        from engine.latency import measure_speedup

        batch, seq, threads = latency_setting(args)
        metrics["latency"] = measure_speedup(out, args.teacher, batch, seq, args.backend, threads, args.latency_dtype)
    metrics["wall_time_s"] = time.monotonic() - t_start
    metrics["args"] = store.json("run.json")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def load_distill_teacher(path: Path, pruned: Path, pruned_cfg: EncoderConfig) -> Any:
    """The --distill-teacher checkpoint, refused unless it shares the pruned model's dims (all but the shape) and
    tokenizer vocabulary: the student's windows are fed to it as they are."""
    from transformers import AutoTokenizer

    ck = load_checkpoint(path)
    if ck.cfg != pruned_cfg.with_shape(ck.cfg.heads, ck.cfg.ffn):
        raise ValueError(
            f"--distill-teacher {path} is not the same kind of model as --teacher {pruned} "
            f"(they may differ in per-layer heads and FFN widths only)"
        )
    if ck.qa_head_initialised:
        raise ValueError(f"--distill-teacher {path} has no trained QA head: there is nothing to distil from it")
    if AutoTokenizer.from_pretrained(str(path)).get_vocab() != AutoTokenizer.from_pretrained(str(pruned)).get_vocab():
        raise ValueError(f"--distill-teacher {path} has another tokenizer vocabulary than --teacher {pruned}")
    return ck


def spec_masks(spec: PruneSpec, cfg: EncoderConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A spec's kept heads and FFN units as the boolean keep-masks the stages take, one per layer."""
    return masks_from_indices({"heads": [list(lk.heads) for lk in spec.layers],
                               "ffn": [list(lk.ffn) for lk in spec.layers]}, cfg)  # fmt: skip


def _target_info(args: argparse.Namespace) -> dict[str, Any]:
    if args.spec is not None:
        return {"by": "spec", "spec": str(args.spec)}
    if args.target_sparsity is not None:
        return {"by": "flops", "value": args.target_sparsity, "seq_len": args.flops_seq_len}
    return latency_target_info(args)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
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
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            parse_spec(args.spec, dense)
        except SpecError as e:
            ap.error(f"--spec: {e}")
    if args.distill_lr is None:
        args.distill_lr = DISTILL_LR[args.distill_params]
    if args.distill_steps < 0 or args.distill_lr <= 0 or not 0 <= args.distill_weight <= 1:
        ap.error("--distill-steps must be >= 0, --distill-lr > 0 and --distill-weight in [0, 1]")
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
    try:
        m = prune_fast(args)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                k: m[k]
                for k in (
                    "achieved_flop_sparsity",
                    "heads",
                    "ffn",
                    "teacher",
                    "student",
                    "f1_loss",
                    "prune_time_s",
                    "prune_cpu_s",
                    "wall_time_s",
                )
                if k in m
            },
            indent=2,
        )
    )
    if "latency" in m:
        print(json.dumps({"latency": m["latency"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
