"""The `torch` backend: engine.model.RaggedQAModel in plain PyTorch (fp32 compute on CPU)."""

from __future__ import annotations

import torch

from engine.artifact import Artifact
from engine.model import RaggedQAModel


def why_unavailable(device: torch.device) -> str | None:
    """Always available."""
    return None


class TorchBackend:
    """Packed forward through the plain-PyTorch ragged encoder."""

    name = "torch"

    def __init__(self, artifact: Artifact, device: torch.device, threads: int | None = None):
        if threads is not None:
            torch.set_num_threads(threads)
        # Half-precision artifacts are upcast on CPU (no fast half GEMMs there); on CUDA they run as stored.
        compute = torch.float32 if device.type == "cpu" else artifact.state["qa.weight"].dtype
        self.model = RaggedQAModel(artifact.cfg).to(device=device, dtype=compute)
        self.model.load_state_dict({k: v.to(compute) for k, v in artifact.state.items()})
        self.model.eval()
        self.device = device

    def forward_packed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                       max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Start/end logits `[T]` in fp32."""
        with torch.inference_mode():
            start, end = self.model(input_ids.to(self.device), token_type_ids.to(self.device), cu_seqlens, max_seqlen)
        return start.float(), end.float()


def create(artifact: Artifact, device: torch.device, threads: int | None) -> TorchBackend:
    """Registry hook."""
    return TorchBackend(artifact, device, threads)
