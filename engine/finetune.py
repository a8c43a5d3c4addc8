"""Fine-tune a dense BERT/RoBERTa QA teacher on SQuAD-format data with our packed RaggedQAModel.

    python -m engine.finetune --model SRC --train FILE [FILE ...] (--eval FILE | --eval-fraction F) --out DIR

Model selection and the null-threshold tuning use the eval data only (a held-out slice of train articles with
--eval-fraction); nothing here reads the official dev set unless it is passed as --eval. The output directory
is an HF-format checkpoint (config.json carries the tuned `sparseqa_null_threshold`) plus metrics.json, the eval
set, its predictions and null_score_diff, and resumable training state under checkpoints/. docs/TRAINING.md
documents the metrics.json schema.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.data.negatives import make_negatives, with_negatives
from engine.data.squad import Example, examples_to_squad, load_squad, split_by_title, train_features
from engine.features import WindowMaker, WindowSettings, load_tokenizer
from engine.model import RaggedQAModel
from engine.training import (adamw, check_finite, epoch_order, evaluate_model, latest_checkpoint, load_training_state,
                             lr_at, model_loss, save_training_state)

DROPOUT = 0.1


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    ap = argparse.ArgumentParser(prog="python -m engine.finetune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="HF checkpoint dir (QA model or bare encoder)")
    ap.add_argument("--train", required=True, nargs="+", type=Path, help="SQuAD 1.1/2.0 train file(s), .json[.gz]")
    ev = ap.add_mutually_exclusive_group(required=True)
    ev.add_argument("--eval", type=Path, help="SQuAD file used for model selection and threshold tuning")
    ev.add_argument("--eval-fraction", type=float, help="hold out this fraction of train articles (by title) instead")
    ap.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    ap.add_argument("--negatives-ratio", type=float, default=0.0,
                    help="unanswerable train examples per answerable one (real ones first, then harder ones)")
    ap.add_argument("--real-negatives-factor", type=int, default=2, help="how often each real unanswerable is used")
    ap.add_argument("--other-paragraph-share", type=float, default=0.0,
                    help="share of generated negatives that pair the question with another paragraph")
    ap.add_argument("--eval-negatives-ratio", type=float, default=1.0,
                    help="with --eval-fraction: negatives per answerable question added to the held-out slice")
    length = ap.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=None, help="training length in epochs (default 2)")
    length.add_argument("--max-steps", type=int, default=None, help="training length in optimizer steps")
    ap.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    ap.add_argument("--warmup", type=float, default=0.1, help="warmup fraction of all steps")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=16, help="windows per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--doc-stride", type=int, default=128)
    ap.add_argument("--max-query-length", type=int, default=64)
    ap.add_argument("--time-budget-min", type=float, default=None,
                    help="stop training (and save) once this many minutes of training have passed, resumes included")
    ap.add_argument("--checkpoint-every", type=int, default=200, help="save resumable state every N steps (0: never)")
    ap.add_argument("--keep-checkpoints", type=int, default=2, help="how many resumable states to keep")
    ap.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: at epoch ends only)")
    ap.add_argument("--log-every", type=int, default=50, help="print a log line every N steps")
    ap.add_argument("--resume", action="store_true", help="continue from the newest state in OUT/checkpoints")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--no-progress", action="store_true", help="disable progress bars")
    return ap


def _load_examples(paths: list[Path]) -> list[Example]:
    out: list[Example] = []
    for p in paths:
        out += load_squad(p)
    seen: set[str] = set()
    for e in out:
        if e.qid in seen:
            raise ValueError(f"question id {e.qid!r} occurs in more than one train file")
        seen.add(e.qid)
    return out


def prepare_data(args: argparse.Namespace) -> tuple[list[Example], list[Example], dict[str, Any]]:
    """(train examples with negatives, eval examples, counts for metrics.json)."""
    train = _load_examples(args.train)
    if args.eval is not None:
        evals = load_squad(args.eval)
        eval_source = str(args.eval)
    else:
        train, held = split_by_title(train, args.eval_fraction, args.seed)
        evals = [e for e in held if not e.is_impossible]
        evals += make_negatives(held, args.eval_negatives_ratio, args.seed + 1, real_factor=1)
        eval_source = f"{args.eval_fraction:g} of train articles: {sorted({e.title for e in held})}"
    raw_train = len(train)
    if args.negatives_ratio > 0:
        train = with_negatives(train, args.negatives_ratio, args.seed, args.real_negatives_factor,
                               args.other_paragraph_share)

    def counts(xs: list[Example]) -> dict[str, int]:
        n_neg = sum(e.is_impossible for e in xs)
        return {"examples": len(xs), "answerable": len(xs) - n_neg, "unanswerable": n_neg}

    info = {"train": {**counts(train), "source_questions": raw_train, "files": [str(p) for p in args.train]},
            "eval": {**counts(evals), "source": eval_source}}
    return train, evals, info


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def finetune(args: argparse.Namespace) -> dict[str, Any]:
    """Run fine-tuning as configured by the parsed CLI `args`; returns the metrics.json content."""
    t_start = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch < 1 or args.grad_accum < 1:
        raise ValueError("--batch and --grad-accum must be >= 1")
    out: Path = args.out
    ckpt_root = out / "checkpoints"
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise FileExistsError(f"{out} is not empty; pass --resume to continue that run or choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    src = load_checkpoint(args.model)
    settings = WindowSettings(args.max_seq_length, args.doc_stride, args.max_query_length)
    settings.validate(src.cfg.architecture, src.cfg.max_position_embeddings)
    maker = WindowMaker(load_tokenizer(args.model), src.cfg.architecture, settings)
    train, evals, data_info = prepare_data(args)
    features = train_features(train, maker)
    per_step = args.batch * args.grad_accum
    steps_per_epoch = len(features) // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{len(features)} training windows are fewer than one step's {per_step} "
                         f"(--batch x --grad-accum)")
    epochs = args.epochs if args.epochs is not None else (None if args.max_steps else 2.0)
    total = args.max_steps if args.max_steps else max(1, round(epochs * steps_per_epoch))
    warmup_steps = round(args.warmup * total)
    data_info["train"]["windows"] = len(features)
    _write_json(out / "eval-set.json", examples_to_squad(evals))

    torch.manual_seed(args.seed)
    model = RaggedQAModel(src.cfg, dropout=DROPOUT)
    model.load_state_dict(src.state)
    model.train()
    opt = adamw(model, args.lr, args.weight_decay)
    step, meta = 0, {"elapsed_s": 0.0, "history": [], "best": None, "losses": []}
    last = latest_checkpoint(ckpt_root) if args.resume else None
    if last is not None:
        step, meta = load_training_state(last, model, opt)
        print(f"resumed from {last} at step {step}", file=sys.stderr)
    tokenizer = None

    def save_best(result: dict[str, Any]) -> None:
        nonlocal tokenizer
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(args.model))
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        save_checkpoint(out, src.cfg, state, src.hf_config, tokenizer=tokenizer,
                        null_threshold=result["null_threshold"])
        _write_json(out / "eval-predictions.json", result["predictions"])
        _write_json(out / "eval-null-score-diff.json", result["null_score_diff"])

    def run_eval() -> None:
        result = evaluate_model(model, evals, maker, progress=not args.no_progress)
        row = {"step": step, "f1": result["at_zero"]["f1"], "best_f1": result["at_zero"]["best_f1"],
               "HasAns_f1": result["at_best"].get("HasAns_f1"), "NoAns_f1": result["at_best"].get("NoAns_f1"),
               "null_threshold": result["null_threshold"], "auc": result["auc"]}
        meta["history"].append(row)
        print(f"eval @ step {step}: {json.dumps(row)}", file=sys.stderr)
        if meta["best"] is None or row["best_f1"] > meta["best"]["eval_at_zero"]["best_f1"]:
            meta["best"] = {"step": step, "eval_at_zero": result["at_zero"], "eval_at_best": result["at_best"],
                            "null_threshold": result["null_threshold"], "auc": result["auc"]}
            save_best(result)

    budget_s = args.time_budget_min * 60 if args.time_budget_min else None
    t_train, elapsed_before = time.monotonic(), float(meta["elapsed_s"])
    stopped_by, loss_sum, loss_n, t_log = "steps", 0.0, 0, time.monotonic()
    order_epoch, order = -1, None
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=args.no_progress, mininterval=10)
    while step < total:
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order_epoch, order = epoch, epoch_order(len(features), args.seed, epoch)
        idx = order[pos * per_step: (pos + 1) * per_step]
        lr = lr_at(step, total, warmup_steps, args.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for m in range(args.grad_accum):
            micro = [features[k] for k in idx[m * args.batch: (m + 1) * args.batch]]
            loss = model_loss(model, micro)
            check_finite(loss, step + 1)
            (loss / args.grad_accum).backward()
            step_loss += loss.item() / args.grad_accum
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        step += 1
        loss_sum, loss_n = loss_sum + step_loss, loss_n + 1
        meta["losses"].append(round(step_loss, 5))
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", refresh=False)
        elapsed = elapsed_before + time.monotonic() - t_train
        meta["elapsed_s"] = elapsed
        if args.log_every and step % args.log_every == 0:
            rate = loss_n / (time.monotonic() - t_log)
            print(f"step {step}/{total} epoch {step / steps_per_epoch:.3f} loss {loss_sum / loss_n:.4f} lr {lr:.3e} "
                  f"{rate:.3f} steps/s elapsed {elapsed / 60:.1f} min eta {(total - step) / rate / 60:.1f} min",
                  file=sys.stderr, flush=True)
            loss_sum, loss_n, t_log = 0.0, 0, time.monotonic()
        over_budget = budget_s is not None and elapsed > budget_s
        if over_budget:
            stopped_by = "time_budget"
        periodic = bool(args.eval_every) and step % args.eval_every == 0
        if step % steps_per_epoch == 0 or step == total or over_budget or periodic:
            run_eval()
        if (args.checkpoint_every and step % args.checkpoint_every == 0) or step == total or over_budget:
            save_training_state(ckpt_root, model, opt, step, meta, keep=args.keep_checkpoints)
        if over_budget:
            print(f"time budget of {args.time_budget_min} min reached at step {step}/{total}; stopping",
                  file=sys.stderr)
            break
    bar.close()
    if meta["best"] is None or not meta["history"] or meta["history"][-1]["step"] != step:
        run_eval()  # e.g. resumed a finished run whose last eval was lost
    best = meta["best"]
    metrics = {**best, "steps": step, "total_steps": total, "steps_per_epoch": steps_per_epoch,
               "epochs_done": step / steps_per_epoch, "stopped_by": stopped_by, "train_time_s": meta["elapsed_s"],
               "wall_time_s": time.monotonic() - t_start, "history": meta["history"],
               "loss": {"first": meta["losses"][:10], "last": meta["losses"][-10:]}, "data": data_info,
               "args": {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
                        for k, v in vars(args).items()}}
    _write_json(out / "metrics.json", metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = build_parser().parse_args(argv)
    if args.eval_fraction is not None and not 0 < args.eval_fraction < 1:
        build_parser().error("--eval-fraction must lie in (0, 1)")
    metrics = finetune(args)
    summary = {"step": metrics["step"], "eval_at_best": metrics["eval_at_best"], "auc": metrics["auc"]}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
