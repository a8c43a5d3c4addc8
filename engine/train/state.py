"""Resumable training state (pickle-free), the learning-rate schedule and the NaN guard.

A state directory `root/step-XXXXXXXX/` holds `model.safetensors` (the module's state dict),
`optimizer.safetensors` (AdamW moments as `state.{param_index}.{name}`, plus `rng.torch`, the torch CPU RNG
that drives dropout and gate noise) and `trainer.json` (step, param groups, scalar optimizer state, caller
metadata). It is written into a `.tmp` directory and renamed, so a kill never leaves a half-written state.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

_STEP_DIR = "step-{:08d}"


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss becomes NaN or infinite."""


def check_finite(loss: torch.Tensor, step: int) -> None:
    """Raise NonFiniteLossError naming the (1-based) optimizer step if `loss` is NaN or infinite."""
    if not bool(torch.isfinite(loss).all()):
        raise NonFiniteLossError(
            f"training loss became {loss.item()} at step {step}; lower the learning rate, "
            f"check the input data, or resume from an earlier checkpoint"
        )


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """LR for the update that produces step `step + 1`: linear warmup to `peak`, then linear decay to 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def save_training_state(
    root: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    meta: Mapping[str, Any],
    keep: int = 2,
) -> Path:
    """Write `root/step-XXXXXXXX/` (model, optimizer, RNG, trainer.json) atomically; keep the newest `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / _STEP_DIR.format(step)
    tmp = root / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout on a GPU draws from its own generator
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
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
    done = [
        p for p in root.glob("step-*") if p.is_dir() and (p / "trainer.json").is_file() and not p.name.endswith(".tmp")
    ]
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
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(info["step"]), info["meta"]
