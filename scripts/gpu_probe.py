"""How many training steps per second one device sustains: MiniLM, 32 packed windows of 160-256 tokens, the trainer's
optimizer, bf16 autocast where native. scripts/gpu_v3.sh sizes its step budgets with it.

    python scripts/gpu_probe.py MODEL_DIR [--device cuda] [--steps 30]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    device = resolve_device(a.device)
    bf16 = resolve_precision(Precision.AUTO, device) is Precision.BF16
    ck = load_checkpoint(a.model)
    model = RaggedQAModel(ck.cfg, dropout=0.1).to(device).train()
    opt = make_optimizer(weight_groups(model, 1e-4, 0.01))
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(160, 257, (a.batch,), generator=g).tolist()
    cu = cu_seqlens_from_lengths(lengths).to(device)
    ids = torch.randint(1000, ck.cfg.vocab_size, (sum(lengths),), generator=g).to(device)
    types = torch.zeros_like(ids)
    sp = torch.randint(0, 100, (a.batch,), generator=g).to(device)
    ep = sp + 3

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            start, end = model(ids, types, cu, max(lengths))[:2]
        loss = task_and_distill(start.float(), end.float(), cu, max(lengths), sp, ep)
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(5):
        step()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    rate = a.steps / (time.perf_counter() - t0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({"device": name, "bf16": bf16, "batch": a.batch, "steps_per_s": round(rate, 2)}))


if __name__ == "__main__":
    main()
