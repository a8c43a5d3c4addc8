"""One registry of inference backends behind a single interface.

A backend runs the ragged encoder on packed tokens:
`forward_packed(input_ids [T], token_type_ids [T], cu_seqlens [B+1] int32, max_seqlen) -> (start [T], end [T])`.
`"auto"` picks triton on CUDA, then cpp if built, then torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

import torch

from engine.artifact import Artifact


class Backend(Protocol):
    """What QAEngine needs from a backend."""

    name: str

    def forward_packed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                       max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end logits `[T]` (fp32, on CPU or the backend's device) for packed tokens."""
        ...


@dataclass(frozen=True)
class BackendEntry:
    """Where a backend lives and which devices it serves."""

    name: str
    module: str  # exposes `why_unavailable(device) -> str | None` (None = available) and `create(artifact, device, threads)`
    devices: tuple[str, ...]
    auto_devices: tuple[str, ...]  # devices on which "auto" may pick it


REGISTRY: tuple[BackendEntry, ...] = (
    # On CPU, triton only runs in the interpreter (TRITON_INTERPRET=1, for tests): never an "auto" choice there.
    BackendEntry("triton", "engine.runtime.triton_backend", ("cuda", "cpu"), ("cuda",)),
    BackendEntry("cpp", "engine.runtime.cpp_backend", ("cpu", "cuda"), ("cpu", "cuda")),
    BackendEntry("torch", "engine.runtime.torch_backend", ("cpu", "cuda"), ("cpu", "cuda")),
)


def _why_unavailable(entry: BackendEntry, device: torch.device) -> str | None:
    if device.type not in entry.devices:
        return f"runs on {'/'.join(entry.devices)}, not {device.type}"
    try:
        mod = importlib.import_module(entry.module)
    except ImportError as e:
        return f"not installed ({e})"
    return mod.why_unavailable(device)


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Names of the backends that can run on `device`, in `auto` preference order."""
    dev = torch.device(device)
    return [e.name for e in REGISTRY if _why_unavailable(e, dev) is None]


def create_backend(name: str, artifact: Artifact, device: str | torch.device = "cpu",
                   threads: int | None = None) -> Backend:
    """Instantiate backend `name` (or the best available for `"auto"`) for a loaded artifact."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    names = [e.name for e in REGISTRY]
    if name == "auto":
        avail = [n for n in available_backends(dev) if dev.type in next(e for e in REGISTRY if e.name == n).auto_devices]
        if not avail:
            raise RuntimeError(f"no backend can run on {dev}")
        name = avail[0]
    if name not in names:
        raise ValueError(f"unknown backend {name!r}; backends: {names} (available on {dev}: {available_backends(dev)})")
    entry = next(e for e in REGISTRY if e.name == name)
    why = _why_unavailable(entry, dev)
    if why is not None:
        raise RuntimeError(f"backend {name!r} is unavailable on {dev}: {why}. "
                           f"Available: {available_backends(dev)}")
    return importlib.import_module(entry.module).create(artifact, dev, threads)
