"""Training utilities shared by fine-tuning and pruning: batching, loss, LR schedule, resumable state, evaluation.

Shapes: B windows per batch, T packed tokens (sum of window lengths), `cu_seqlens` int32 `[B+1]`.
Resumable state is pickle-free: tensors (model, optimizer moments, torch RNG) go to safetensors files and
scalars (step, param groups, caller metadata) to `trainer.json`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from engine.data.squad import EvalFeature, Example, TrainFeature, eval_features, gold_of
from engine.data.squad_metric import auc, evaluate_gold
from engine.decode import decode
from engine.features import PackedBatch, WindowMaker, pack_windows
from engine.packing import cu_seqlens_from_lengths, unpack
from engine.prune.distill import qa_ce_loss

MAX_ANSWER_TOKENS = 30
_STEP_DIR = "step-{:08d}"


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss becomes NaN or infinite."""


# ----------------------------------------------------------------------------------------------- batching, loss


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(n) that depends only on (seed, epoch), so a resumed run sees the same order."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def collate(features: Sequence[TrainFeature]) -> tuple[PackedBatch, torch.Tensor, torch.Tensor]:
    """Pack labelled windows padding-free; returns (batch, start positions `[B]`, end positions `[B]`)."""
    ids = torch.tensor([t for f in features for t in f.input_ids], dtype=torch.long)
    types = torch.tensor([t for f in features for t in f.token_type_ids], dtype=torch.long)
    lengths = [len(f.input_ids) for f in features]
    batch = PackedBatch(ids, types, cu_seqlens_from_lengths(lengths), max(lengths))
    return batch, torch.tensor([f.start for f in features]), torch.tensor([f.end for f in features])


def span_loss(start: torch.Tensor, end: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
              start_pos: torch.Tensor, end_pos: torch.Tensor) -> torch.Tensor:
    """Mean start/end cross-entropy of packed logits `[T]`, each window normalised over its own tokens only."""
    # Padding gets -inf, so it has probability 0 and no gradient.
    s = unpack(start.float(), cu_seqlens, max_seqlen, fill=float("-inf"))  # (B, S)
    e = unpack(end.float(), cu_seqlens, max_seqlen, fill=float("-inf"))
    return qa_ce_loss(s, e, start_pos, end_pos)


def model_loss(model: nn.Module, features: Sequence[TrainFeature]) -> torch.Tensor:
    """Span loss of `model` (a RaggedQAModel) on one micro-batch of labelled windows."""
    batch, sp, ep = collate(features)
    start, end = model(batch.input_ids, batch.token_type_ids, batch.cu_seqlens, batch.max_seqlen)
    return span_loss(start, end, batch.cu_seqlens, batch.max_seqlen, sp, ep)


def check_finite(loss: torch.Tensor, step: int) -> None:
    """Raise NonFiniteLossError naming the (1-based) optimizer step if `loss` is NaN or infinite."""
    if not bool(torch.isfinite(loss).all()):
        raise NonFiniteLossError(f"training loss became {loss.item()} at step {step}; lower the learning rate, "
                                 f"check the input data, or resume from an earlier checkpoint")


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """LR for the update that produces step `step + 1`: linear warmup to `peak`, then linear decay to 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases and LayerNorm/embedding-norm weights (1-D tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


# ------------------------------------------------------------------------------------------ resumable state


def save_training_state(root: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                        meta: Mapping[str, Any], keep: int = 2) -> Path:
    """Write `root/step-XXXXXXXX/` (model, optimizer, RNG, trainer.json) atomically; keep the newest `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / _STEP_DIR.format(step)
    tmp = root / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    info = {"step": step, "param_groups": opt["param_groups"], "state_scalars": scalars, "meta": dict(meta)}
    (tmp / "trainer.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete `step-*` directory under `root`, or None."""
    root = Path(root)
    done = [p for p in root.glob("step-*") if p.is_dir() and (p / "trainer.json").is_file()
            and not p.name.endswith(".tmp")]
    return max(done, key=lambda p: p.name) if done else None


def load_training_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Restore model, optimizer and torch RNG from a `step-*` dir; returns (step, meta)."""
    path = Path(path)
    info = json.loads((path / "trainer.json").read_text())
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    tensors = load_file(str(path / "optimizer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in info["state_scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return int(info["step"]), info["meta"]


# ---------------------------------------------------------------------------------------------- evaluation


def _eval_batches(features: Sequence[EvalFeature], tokens_per_batch: int) -> Iterator[list[int]]:
    """Feature indices sorted by length, grouped into batches of at most `tokens_per_batch` tokens."""
    order = sorted(range(len(features)), key=lambda k: len(features[k].window.input_ids))
    batch: list[int] = []
    for k in order:
        n = len(features[k].window.input_ids)
        if batch and (len(batch) + 1) * n > tokens_per_batch:
            yield batch
            batch = []
        batch.append(k)
    if batch:
        yield batch


@torch.inference_mode()
def predict(model: nn.Module, examples: Sequence[Example], maker: WindowMaker, tokens_per_batch: int = 8192,
            max_answer_length: int = MAX_ANSWER_TOKENS, progress: bool = True
            ) -> tuple[dict[str, str], dict[str, float]]:
    """(best non-null answer text, null_score_diff) per qid, decoded by `engine.decode.decode` (QAEngine's rules)."""
    was_training = model.training
    model.eval()
    features = eval_features(examples, maker)
    logits: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(features)
    bar = tqdm(total=len(features), desc="eval", unit="win", disable=not progress, mininterval=5)
    for idx in _eval_batches(features, tokens_per_batch):
        packed = pack_windows([features[k].window for k in idx])
        start, end = model(packed.input_ids, packed.token_type_ids, packed.cu_seqlens, packed.max_seqlen)
        start, end = start.float().numpy(), end.float().numpy()  # (T,)
        bounds = packed.cu_seqlens.tolist()
        for b, k in enumerate(idx):
            logits[k] = (start[bounds[b]: bounds[b + 1]], end[bounds[b]: bounds[b + 1]])
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    per_example: list[list[int]] = [[] for _ in examples]
    for k, f in enumerate(features):
        per_example[f.example_index].append(k)
    preds, diffs = {}, {}
    for n, e in enumerate(examples):
        ks = per_example[n]
        spans, null = decode([features[k].window for k in ks], [logits[k][0] for k in ks],
                             [logits[k][1] for k in ks], max_answer_length)
        best = spans[0] if spans else None
        preds[e.qid] = e.context[best.start: best.end] if best else ""
        diffs[e.qid] = null - (best.score if best else -np.inf)
    return preds, diffs


def predictions_at(best_text: Mapping[str, str], null_score_diff: Mapping[str, float], threshold: float
                   ) -> dict[str, str]:
    """Final SQuAD 2.0 answers: "" where null_score_diff > threshold, else the best span's text."""
    return {q: "" if null_score_diff[q] > threshold else t for q, t in best_text.items()}


def evaluate_model(model: nn.Module, examples: Sequence[Example], maker: WindowMaker, tokens_per_batch: int = 8192,
                   progress: bool = True) -> dict[str, Any]:
    """Official metrics at threshold 0 and at the tuned best-F1 threshold, plus the null-score AUC (or None)."""
    best_text, diffs = predict(model, examples, maker, tokens_per_batch, progress=progress)
    gold = gold_of(examples)
    at_zero = evaluate_gold(gold, best_text, diffs, na_prob_thresh=0.0)
    threshold = float(at_zero["best_f1_thresh"])
    at_best = evaluate_gold(gold, best_text, diffs, na_prob_thresh=threshold)
    has_both = any(gold.values()) and not all(gold.values())
    return {"at_zero": at_zero, "at_best": at_best, "null_threshold": threshold,
            "auc": auc(diffs, gold) if has_both else None, "predictions": best_text, "null_score_diff": diffs}
