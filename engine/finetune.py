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

from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.data.negatives import make_negatives, with_negatives
from engine.data.predict import evaluate_model
from engine.data.squad import Example, examples_to_squad, load_squad, split_by_title, train_features
from engine.features import WindowMaker, WindowSettings, load_tokenizer
from engine.model import RaggedQAModel
from engine.prune.distributed import Dist
from engine.train import (
    Hooks,
    Precision,
    TrainConfig,
    default_threads,
    resolve_device,
    resolve_precision,
    train,
    weight_groups,
)

DROPOUT = 0.1


def add_negatives_args(ap: argparse.ArgumentParser) -> None:
    """The unanswerable-example flags shared by finetune, prune and prune_fast (engine/data/negatives.py)."""
    ap.add_argument(
        "--negatives-ratio",
        type=float,
        default=0.0,
        help="unanswerable train examples per answerable one (real ones first, then generated ones)",
    )
    ap.add_argument("--real-negatives-factor", type=int, default=2, help="how often each real unanswerable is used")
    ap.add_argument(
        "--swap-share",
        type=float,
        default=0.0,
        help="share of generated negatives made by swapping a name or number of the question for one the "
        "paragraph does not mention",
    )
    ap.add_argument(
        "--antonym-share",
        type=float,
        default=0.0,
        help="share of generated negatives made by replacing a word of the question that the paragraph uses "
        '("largest", "before") with its opposite, which the paragraph does not use',
    )
    ap.add_argument(
        "--negation-share",
        type=float,
        default=0.0,
        help='share of generated negatives made by negating the question\'s auxiliary ("did" -> "didn\'t") over a '
        "paragraph that negates nothing",
    )
    ap.add_argument(
        "--other-paragraph-share",
        type=float,
        default=0.0,
        help="share of generated negatives that pair the question with another paragraph",
    )
    ap.add_argument(
        "--eval-negatives-ratio",
        type=float,
        default=1.0,
        help="with --eval-fraction: negatives per answerable question added to the held-out slice",
    )


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    ap = argparse.ArgumentParser(prog="python -m engine.finetune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="HF checkpoint dir (QA model or bare encoder)")
    add_data_args(ap)
    ap.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    add_negatives_args(ap)
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
    ap.add_argument(
        "--time-budget-min",
        type=float,
        default=None,
        help="stop training (and save) once this many minutes of training have passed, resumes included",
    )
    ap.add_argument("--checkpoint-every", type=int, default=200, help="save resumable state every N steps (0: never)")
    ap.add_argument("--keep-checkpoints", type=int, default=2, help="how many resumable states to keep")
    ap.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: at epoch ends only)")
    ap.add_argument("--log-every", type=int, default=50, help="print a log line every N steps")
    ap.add_argument("--resume", action="store_true", help="continue from the newest state in OUT/checkpoints")
    add_speed_args(ap)
    ap.add_argument("--no-progress", action="store_true", help="disable progress bars")
    return ap


def add_data_args(ap: argparse.ArgumentParser) -> None:
    """--train and the held-out data (--eval | --eval-fraction | --eval-titles), shared by every trainer CLI."""
    ap.add_argument("--train", required=True, nargs="+", type=Path, help="SQuAD 1.1/2.0 train file(s), .json[.gz]")
    ev = ap.add_mutually_exclusive_group(required=True)
    ev.add_argument("--eval", type=Path, help="held-out SQuAD file for model selection and null-threshold tuning")
    ev.add_argument("--eval-fraction", type=float, help="hold out this fraction of train articles (by title) instead")
    ev.add_argument("--eval-titles", nargs="+", help="hold out these train articles (by title) instead")


def add_precision_arg(ap: argparse.ArgumentParser, what: str) -> None:
    """--precision (auto | fp32 | bf16) of WHAT, shared by every CLI that trains."""
    ap.add_argument(
        "--precision",
        choices=[p.value for p in Precision],
        default=Precision.AUTO.value,
        help=f"compute precision of {what}; weights and optimizer state stay fp32. auto: bf16 autocast on a GPU or "
        "a CPU with AVX512-BF16/AMX, else fp32",
    )


def add_speed_args(ap: argparse.ArgumentParser) -> None:
    """--device, --threads, --precision and --no-group-by-length, shared by engine.finetune and engine.prune."""
    ap.add_argument(
        "--device",
        default="auto",
        help="where to train: cpu, cuda, cuda:N, or auto (the first GPU torch sees, else the CPU)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    add_precision_arg(ap, "training")
    ap.add_argument(
        "--no-group-by-length",
        dest="group_by_length",
        action="store_false",
        help="draw batches uniformly instead of grouping windows of similar length (less padding)",
    )


def setup_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (default: all cores); returns the count."""
    n = threads or default_threads()
    torch.set_num_threads(n)
    return n


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
        if args.eval_titles:
            missing = sorted(set(args.eval_titles) - {e.title for e in train})
            if missing:
                raise ValueError(f"--eval-titles: no train article is titled {missing}")
            held = [e for e in train if e.title in set(args.eval_titles)]
            train = [e for e in train if e.title not in set(args.eval_titles)]
        else:
            train, held = split_by_title(train, args.eval_fraction, args.seed)
        evals = [e for e in held if not e.is_impossible]
        evals += make_negatives(held, args.eval_negatives_ratio, args.seed + 1, real_factor=1)
        how = "listed" if args.eval_titles else f"{args.eval_fraction:g} of"
        eval_source = f"{how} train articles: {sorted({e.title for e in held})}"
    raw_train = len(train)
    if args.negatives_ratio > 0:
        train = with_negatives(
            train,
            args.negatives_ratio,
            args.seed,
            real_factor=args.real_negatives_factor,
            other_paragraph_share=args.other_paragraph_share,
            swap_share=args.swap_share,
            antonym_share=args.antonym_share,
            negation_share=args.negation_share,
        )

    def counts(xs: list[Example]) -> dict[str, int]:
        n_neg = sum(e.is_impossible for e in xs)
        return {"examples": len(xs), "answerable": len(xs) - n_neg, "unanswerable": n_neg}

    info = {
        "train": {**counts(train), "source_questions": raw_train, "files": [str(p) for p in args.train]},
        "eval": {**counts(evals), "source": eval_source},
    }
    return train, evals, info


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def train_config(
    args: argparse.Namespace,
    name: str,
    epochs: float,
    max_steps: int | None,
    device: torch.device = torch.device("cpu"),
) -> TrainConfig:
    """The trainer's config for one phase from the shared CLI flags."""
    return TrainConfig(
        name=name,
        epochs=epochs,
        max_steps=max_steps,
        batch=args.batch,
        grad_accum=args.grad_accum,
        warmup=args.warmup,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        precision=resolve_precision(args.precision, device),
        group_by_length=args.group_by_length,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        log_every=args.log_every,
        eval_every=args.eval_every,
        time_budget_min=args.time_budget_min,
        resume=args.resume,
        progress=not args.no_progress,
    )


def cli_args(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags as JSON values (for metrics.json)."""
    return {
        k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
        for k, v in vars(args).items()
    }


def finetune(args: argparse.Namespace) -> dict[str, Any]:
    """Run fine-tuning as configured by the parsed CLI `args`; returns the metrics.json content."""
    t_start = time.monotonic()
    threads = setup_threads(args.threads)
    device = resolve_device(args.device)
    epochs = args.epochs if args.epochs is not None else (None if args.max_steps else 2.0)
    cfg = train_config(args, "train", epochs or 0.0, args.max_steps, device)
    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise FileExistsError(f"{out} is not empty; pass --resume to continue that run or choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    src = load_checkpoint(args.model)
    settings = WindowSettings(args.max_seq_length, args.doc_stride, args.max_query_length)
    settings.validate(src.cfg.architecture, src.cfg.max_position_embeddings)
    maker = WindowMaker(load_tokenizer(args.model), src.cfg.architecture, settings)
    train_set, evals, data_info = prepare_data(args)
    features = train_features(train_set, maker)
    data_info["train"]["windows"] = len(features)
    _write_json(out / "eval-set.json", examples_to_squad(evals))

    torch.manual_seed(args.seed)
    model = RaggedQAModel(src.cfg, dropout=DROPOUT)
    model.load_state_dict(src.state)
    model.to(device)
    tokenizer = None

    def evaluate(step: int, meta: dict[str, Any]) -> None:
        """Held-out metrics; the best step so far (by best-threshold F1) becomes OUT's checkpoint."""
        nonlocal tokenizer
        result = evaluate_model(model, evals, maker, progress=not args.no_progress)
        row = {
            "step": step,
            "f1": result["at_zero"]["f1"],
            "best_f1": result["at_zero"]["best_f1"],
            "HasAns_f1": result["at_best"].get("HasAns_f1"),
            "NoAns_f1": result["at_best"].get("NoAns_f1"),
            "null_threshold": result["null_threshold"],
            "auc": result["auc"],
        }
        meta["history"].append(row)
        print(f"eval @ step {step}: {json.dumps(row)}", file=sys.stderr)
        if meta["best"] is not None and row["best_f1"] <= meta["best"]["eval_at_zero"]["best_f1"]:
            return
        meta["best"] = {
            "step": step,
            "eval_at_zero": result["at_zero"],
            "eval_at_best": result["at_best"],
            "null_threshold": result["null_threshold"],
            "auc": result["auc"],
        }
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(args.model))
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        save_checkpoint(
            out, src.cfg, state, src.hf_config, tokenizer=tokenizer, null_threshold=result["null_threshold"]
        )
        _write_json(out / "eval-predictions.json", result["predictions"])
        _write_json(out / "eval-null-score-diff.json", result["null_score_diff"])

    meta = train(
        model,
        features,
        cfg,
        weight_groups(model, args.lr, args.weight_decay),
        out / "checkpoints",
        hooks=Hooks(evaluate=evaluate),
        dist=Dist(device=device),
    )
    step = meta["steps"]
    if meta["best"] is None or not meta["history"] or meta["history"][-1]["step"] != step:
        model.eval()
        evaluate(step, meta)  # e.g. resumed a finished run whose last eval was lost
    metrics = {
        **meta["best"],
        "steps": step,
        "total_steps": meta["total_steps"],
        "steps_per_epoch": meta["steps_per_epoch"],
        "epochs_done": step / meta["steps_per_epoch"],
        "stopped_by": meta["stopped_by"],
        "train_time_s": meta["elapsed_s"],
        "wall_time_s": time.monotonic() - t_start,
        "history": meta["history"],
        "throughput": {
            "windows": meta["windows"],
            "windows_per_s": meta["windows"] / max(meta["elapsed_s"], 1e-9),
            "precision": cfg.precision.value,
            "device": str(device),
            "threads": threads,
        },
        "loss": {"first": meta["losses"][:10], "last": meta["losses"][-10:]},
        "data": data_info,
        "args": cli_args(args),
    }
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
