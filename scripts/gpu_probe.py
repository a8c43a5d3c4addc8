"""How many training steps per second one device sustains: MiniLM, 32 packed windows per step, the trainer's
optimizer, bf16 autocast where native. scripts/gpu_v3.sh sizes its step budgets with it (windows of 160-256 tokens),
scripts/cpu_session.sh with --lengths squad (steps like the trainer's length-grouped ones over SQuAD windows).

    python scripts/gpu_probe.py MODEL_DIR [--device cuda] [--steps 30] [--lengths uniform|squad]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from engine.checkpoint import load_checkpoint
from engine.model import RaggedQAModel
from engine.packing import cu_seqlens_from_lengths
from engine.train import Precision, resolve_device, resolve_precision, weight_groups
from engine.train.config import make_optimizer
from engine.train.losses import task_and_distill

# Window lengths at --max-seq-length 256 / --doc-stride 128 over the SQuAD train files: the middle of each tenth
# (3,331 windows of 3,000 sampled questions; mean 169 tokens, against 208 for "uniform")
SQUAD_DECILES = (88, 120, 134, 145, 157, 169, 184, 202, 233, 256)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--lengths",
        choices=("uniform", "squad"),
        default="uniform",
        help="uniform: every step 160-256 tokens per window (what scripts/gpu_v3.sh was sized with); squad: like the "
        "trainer's length-grouped steps over SQuAD windows at 256 (each step near one decile of their lengths)",
    )
    a = ap.parse_args()
    device = resolve_device(a.device)
    bf16 = resolve_precision(Precision.AUTO, device) is Precision.BF16
    ck = load_checkpoint(a.model)
    model = RaggedQAModel(ck.cfg, dropout=0.1).to(device).train()
    opt = make_optimizer(weight_groups(model, 1e-4, 0.01))
    g = torch.Generator().manual_seed(0)
    longest = ck.cfg.max_position_embeddings - ck.cfg.position_offset
    if a.lengths == "squad":
        centers = [min(c, longest) for c in SQUAD_DECILES]
        draws = [torch.randint(max(c - 6, 8), c + 1, (a.batch,), generator=g).tolist() for c in centers]
    else:
        draws = [torch.randint(min(160, longest - 1), min(257, longest + 1), (a.batch,), generator=g).tolist()]
    batches = []
    for lengths in draws:
        cu = cu_seqlens_from_lengths(lengths).to(device)
        ids = torch.randint(min(1000, ck.cfg.vocab_size - 1), ck.cfg.vocab_size, (sum(lengths),), generator=g).to(
            device
        )
        sp = torch.stack([torch.randint(0, n, (), generator=g) for n in lengths]).to(device)
        batches.append((ids, cu, max(lengths), sp, torch.minimum(sp + 3, torch.tensor(lengths).to(device) - 1)))

    def step(i: int) -> float:
        ids, cu, longest_here, sp, ep = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            start, end = model(ids, torch.zeros_like(ids), cu, longest_here)[:2]
        loss = task_and_distill(start.float(), end.float(), cu, longest_here, sp, ep)
        loss.backward()
        opt.step()
        return loss.item()

    for i in range(5):
        step(i)
    t0 = time.perf_counter()
    for i in range(a.steps):
        step(i)
    rate = a.steps / (time.perf_counter() - t0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    info = {"device": name, "bf16": bf16, "batch": a.batch, "lengths": a.lengths, "steps_per_s": round(rate, 3)}
    print(json.dumps(info))


if __name__ == "__main__":
    main()
