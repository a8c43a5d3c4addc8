"""`python -m engine.make_spec`: the paper's baselines at equal FLOPs, as pruning specs (no gate training).

    python -m engine.make_spec --model DIR --target-sparsity 0.5 --by random|importance [--data FILE ...] --out SPEC

random:      heads, and separately FFN units, removed in a uniformly random order.
importance:  Michel et al. (2019), "Are Sixteen Heads Really Better than One?": the importance of a head
             (or FFN unit) is E |dL/dξ| for a mask variable ξ = 1 multiplying its output, with L the
             task loss on training batches; scores are L2-normalised per layer and type, as in the paper.
             The least important heads (ranked across layers) are removed, and separately the least important
             FFN units, until each kind has lost the target fraction of its FLOPs.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
from torch import nn

from engine.checkpoint import load_checkpoint
from engine.config import EncoderConfig
from engine.flops import flop_sparsity, unit_flops
from engine.model import RaggedQAModel
from engine.spec import LayerKeep, PruneSpec


class _Ones(nn.Module):
    """A fixed all-ones mask whose gradient is the importance signal."""

    def __init__(self, n: int):
        super().__init__()
        self.mask = nn.Parameter(torch.ones(max(n, 1)))

    def forward(self) -> torch.Tensor:
        return self.mask


def importance_scores(
    model_dir: Path,
    data: list[Path],
    max_windows: int = 2048,
    batch: int = 16,
    max_seq_length: int = 256,
    seed: int = 0,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer head and FFN-unit importance (Michel et al.), accumulated over up to `max_windows` train windows."""
    from engine.data.squad import load_squad, train_features
    from engine.features import WindowMaker, WindowSettings, load_tokenizer
    from engine.prune.gated import GatedQAModel
    from engine.train.batching import collate
    from engine.train.losses import span_loss

    ck = load_checkpoint(model_dir)
    model = RaggedQAModel(ck.cfg).eval()
    model.load_state_dict(ck.state)
    gated = GatedQAModel(model)
    gated.head_gates = nn.ModuleList(_Ones(h) for h in ck.cfg.heads)
    gated.ffn_gates = nn.ModuleList(_Ones(f) for f in ck.cfg.ffn)
    maker = WindowMaker(load_tokenizer(model_dir), ck.cfg.architecture, WindowSettings(max_seq_length, 128, 64))
    examples = [e for p in data for e in load_squad(p)]
    random.Random(seed).shuffle(examples)
    feats = train_features(examples[:max_windows], maker)[:max_windows]
    acc_h = [torch.zeros(h) for h in ck.cfg.heads]
    acc_f = [torch.zeros(f) for f in ck.cfg.ffn]
    from tqdm.auto import tqdm

    for i in tqdm(range(0, len(feats), batch), desc="importance", unit="batch"):
        b, sp, ep = collate(feats[i : i + batch])
        gated.zero_grad(set_to_none=True)
        s, e = gated(b.input_ids, b.token_type_ids, b.cu_seqlens, b.max_seqlen)
        span_loss(s, e, b.cu_seqlens, b.max_seqlen, sp, ep).backward()
        for l in range(ck.cfg.num_layers):
            if ck.cfg.heads[l]:
                acc_h[l] += gated.head_gates[l].mask.grad[: ck.cfg.heads[l]].abs()
            if ck.cfg.ffn[l]:
                acc_f[l] += gated.ffn_gates[l].mask.grad[: ck.cfg.ffn[l]].abs()
    norm = lambda t: t / t.norm().clamp_min(1e-20)  # noqa: E731  (per-layer L2 normalisation)
    return [norm(t) for t in acc_h], [norm(t) for t in acc_f]


def select(
    cfg: EncoderConfig,
    target: float,
    head_scores: list[torch.Tensor],
    ffn_scores: list[torch.Tensor],
    seq_len: int = 384,
) -> PruneSpec:
    """Remove the lowest-scoring heads (ranked across all layers) until the heads have lost `target` of their FLOPs,
    and likewise the FFN units, so the encoder loses `target` of its FLOPs with both kinds cut alike.

    Scores are compared only within a kind: per-layer L2-normalised head and unit scores live on different scales
    (12 heads against 1536 units per layer), so one ranking over both would empty every layer of heads first.
    """
    head_cost, unit_cost = unit_flops(cfg.hidden, cfg.head_dim, seq_len)
    keep_h = [set(range(h)) for h in cfg.heads]
    keep_f = [set(range(f)) for f in cfg.ffn]
    for scores, counts, cost, keep in (
        (head_scores, cfg.heads, head_cost, keep_h),
        (ffn_scores, cfg.ffn, unit_cost, keep_f),
    ):
        budget, removed = target * cost * sum(counts), 0.0
        for _, l, j in sorted((float(scores[i][j]), i, j) for i in range(cfg.num_layers) for j in range(counts[i])):
            if removed >= budget:
                break
            keep[l].discard(j)
            removed += cost
    return PruneSpec(tuple(LayerKeep(tuple(sorted(h)), tuple(sorted(f))) for h, f in zip(keep_h, keep_f)))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m engine.make_spec", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--target-sparsity", required=True, type=float, help="fraction of encoder FLOPs to remove")
    ap.add_argument("--by", required=True, choices=["random", "importance"])
    ap.add_argument("--data", nargs="+", type=Path, help="train file(s) for --by importance")
    ap.add_argument("--max-windows", type=int, default=2048, help="train windows used for importance scores")
    ap.add_argument("--seq-len", type=int, default=384, help="sequence length at which FLOPs are counted")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, type=Path, help="spec JSON to write")
    a = ap.parse_args(argv)
    if not 0 < a.target_sparsity < 1:
        ap.error("--target-sparsity must lie in (0, 1)")
    try:
        cfg = load_checkpoint(a.model).cfg
        if a.by == "random":
            g = torch.Generator().manual_seed(a.seed)
            hs = [torch.rand(h, generator=g) for h in cfg.heads]
            fs = [torch.rand(f, generator=g) for f in cfg.ffn]
            spec = select(cfg, a.target_sparsity, hs, fs, a.seq_len)
        else:
            if not a.data:
                ap.error("--by importance needs --data (train files)")
            hs, fs = importance_scores(a.model, a.data, a.max_windows, seed=a.seed)
            spec = select(cfg, a.target_sparsity, hs, fs, a.seq_len)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    spec.save(a.out)
    shape = cfg.with_shape(tuple(len(k.heads) for k in spec.layers), tuple(len(k.ffn) for k in spec.layers))
    print(
        f"wrote {a.out}: heads {list(shape.heads)}, ffn {list(shape.ffn)}, "
        f"FLOP sparsity {flop_sparsity(shape, cfg, a.seq_len):.3f} at seq {a.seq_len}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
