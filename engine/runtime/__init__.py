"""One registry of inference backends behind a single interface.

A backend runs the ragged encoder on packed tokens:
`forward_packed(input_ids [T], token_type_ids [T], cu_seqlens [B+1] int32, max_seqlen) -> (start [T], end [T])`.
`"auto"` picks triton on CUDA, then cpp if built, then torch, skipping backends that lack a kernel the artifact
needs: an int8 artifact's manifest lists its kernels (docs/ARTIFACT.md), and a backend module declares the ones it
runs with `supported_kernels(device) -> frozenset[str]` (a module without it runs float artifacts only).
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

    def forward_packed(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end logits `[T]` (fp32, on CPU or the backend's device) for packed tokens."""
        ...


@dataclass(frozen=True)
class BackendEntry:
    """Where a backend lives and which devices it serves."""

    name: str
    # `module` exposes `why_unavailable(device) -> str | None` (None = available), `create(artifact, device, threads)`
    # and, if it runs int8 artifacts, `supported_kernels(device) -> frozenset[str]`.
    module: str
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


def _missing_kernels(entry: BackendEntry, device: torch.device, artifact: Artifact) -> list[str]:
    """Kernels `artifact` needs that backend `entry` does not provide on `device` (call only when it is available)."""
    if not artifact.kernels:
        return []
    mod = importlib.import_module(entry.module)
    provided = mod.supported_kernels(device) if hasattr(mod, "supported_kernels") else frozenset()
    return [k for k in artifact.kernels if k not in provided]


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Names of the backends that can run on `device`, in `auto` preference order."""
    dev = torch.device(device)
    return [e.name for e in REGISTRY if _why_unavailable(e, dev) is None]


def create_backend(
    name: str, artifact: Artifact, device: str | torch.device = "cpu", threads: int | None = None
) -> Backend:
    """Instantiate backend `name` (or the best available for `"auto"`) for a loaded artifact."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    names = [e.name for e in REGISTRY]
    entries = {e.name: e for e in REGISTRY}
    if name == "auto":
        avail = [n for n in available_backends(dev) if dev.type in entries[n].auto_devices]
        if not avail:
            raise RuntimeError(f"no backend can run on {dev}")
        capable = [n for n in avail if not _missing_kernels(entries[n], dev, artifact)]
        if not capable:
            raise RuntimeError(
                f"no backend available on {dev} ({avail}) provides the kernels {list(artifact.kernels)} "
                f"that this {artifact.dtype} artifact needs"
            )
        name = capable[0]
    if name not in names:
        raise ValueError(f"unknown backend {name!r}; backends: {names} (available on {dev}: {available_backends(dev)})")
    entry = entries[name]
    why = _why_unavailable(entry, dev)
    if why is not None:
        raise RuntimeError(f"backend {name!r} is unavailable on {dev}: {why}. Available: {available_backends(dev)}")
    missing = _missing_kernels(entry, dev, artifact)
    if missing:
        others = [n for n in available_backends(dev) if not _missing_kernels(entries[n], dev, artifact)]
        raise RuntimeError(
            f"backend {name!r} cannot run this {artifact.dtype} artifact on {dev}: it needs kernel(s) "
            f"{missing}, which this build of {name!r} does not provide. Backends that can: {others}"
        )
    return importlib.import_module(entry.module).create(artifact, dev, threads)
