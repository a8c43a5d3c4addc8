"""The run of `python -m engine.prune_fast` (its command line and stages: engine/prune_fast/args.py): every stage in
order, each one's result saved under OUT/state/ for --resume, then the held-out scores, the stored threshold, the
checkpoint and metrics.json."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.config import EncoderConfig
from engine.features import WindowMaker, WindowSettings, load_tokenizer
from engine.flops import encoder_params, flop_sparsity
from engine.latency_target import latency_setting, latency_target_info
from engine.model import RaggedQAModel
from engine.prune_fast.args import RESUME_IRRELEVANT, build_parser, parse_args
from engine.prune_fast.distill import stage_distill
from engine.prune_fast.masked import fold_masks
from engine.prune_fast.stages import (
    StageStore,
    masks_from_indices,
    sample_features,
    stage_fisher,
    stage_obs,
    stage_rearrange,
    stage_refit,
    stage_scores,
    stage_search,
    stage_tune,
)
from engine.spec import PruneSpec, parse_spec


def _check_resume(store: StageStore, args: argparse.Namespace) -> None:
    """Refuse to resume a run started with different arguments."""
    fp = {
        k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
        for k, v in vars(args).items()
        if k not in RESUME_IRRELEVANT
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
    tokenizer = AutoTokenizer.from_pretrained(str(args.teacher))
    # checked before anything is read, computed or written
    source_ck = (
        None
        if args.distill_teacher is None
        else load_distill_teacher(args.distill_teacher, args.teacher, dense, tokenizer)
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

    source = model
    if source_ck is not None:
        source = RaggedQAModel(source_ck.cfg)
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
            "heads": list(source.cfg.heads),
            "ffn": list(source.cfg.ffn),
            "achieved_flop_sparsity": flop_sparsity(cfg, source.cfg, args.flops_seq_len),
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
        from engine.latency_timer import measure_speedup

        batch, seq, threads = latency_setting(args)
        metrics["latency"] = measure_speedup(out, args.teacher, batch, seq, args.backend, threads, args.latency_dtype)
    metrics["wall_time_s"] = time.monotonic() - t_start
    metrics["args"] = store.json("run.json")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def load_distill_teacher(path: Path, pruned: Path, pruned_cfg: EncoderConfig, pruned_tokenizer: Any) -> Any:
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
    if AutoTokenizer.from_pretrained(str(path)).get_vocab() != pruned_tokenizer.get_vocab():
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
    args = parse_args(argv)
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
