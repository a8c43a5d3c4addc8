"""The `torch` backend: engine.model.RaggedQAModel in plain PyTorch.

Compute by artifact dtype (docs/PRECISION.md):
  float32            fp32 everywhere; on CPU the encoder Linears go through oneDNN with prepacked weights.
  bfloat16           CPU: encoder Linears in bf16 (fp32 accumulation), the rest fp32 (engine.quant.bf16_model).
                     CUDA: the whole model in bf16, as stored.
  float16            CPU: upcast to fp32 (no fast fp16 GEMMs there). CUDA: fp16 as stored.
  int8               CPU only: encoder Linears through oneDNN's int8 GEMM (engine.quant.int8_model).
"""

from __future__ import annotations

import torch

from engine.artifact import Artifact
from engine.manifest import KNOWN_KERNELS
from engine.model import RaggedQAModel
from engine.quant import bf16_model, int8_kernels_available, int8_model
from engine.runtime.onednn import onednn_available, onednn_model


def why_unavailable(device: torch.device) -> str | None:
    """Always available."""
    return None


def supported_kernels(device: torch.device) -> frozenset[str]:
    """The artifact kernels (engine.manifest.KERNELS) this backend runs on `device`."""
    return KNOWN_KERNELS if int8_kernels_available(device) else frozenset()


class TorchBackend:
    """Packed forward through the plain-PyTorch ragged encoder (or its bf16 / int8 surgery)."""

    name = "torch"

    def __init__(self, artifact: Artifact, device: torch.device, threads: int | None = None):
        if threads is not None:
            torch.set_num_threads(threads)
        if artifact.quantization is not None:
            self.model = int8_model(artifact.cfg, artifact.state, artifact.quantization)
        elif artifact.dtype == "bfloat16" and device.type == "cpu":
            self.model = bf16_model(artifact.cfg, artifact.state)
        else:
            # fp16 is upcast on CPU (no fast half GEMMs there); on CUDA half artifacts run as stored.
            compute = torch.float32 if device.type == "cpu" else artifact.state["qa.weight"].dtype
            self.model = RaggedQAModel(artifact.cfg).to(device=device, dtype=compute)
            self.model.load_state_dict({k: v.to(compute) for k, v in artifact.state.items()})
            if device.type == "cpu" and onednn_available():
                self.model = onednn_model(self.model)
        self.model.eval()
        self.device = device

    def forward_packed(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Start/end logits `[T]` in fp32."""
        with torch.inference_mode():
            start, end = self.model(input_ids.to(self.device), token_type_ids.to(self.device), cu_seqlens, max_seqlen)
        return start.float(), end.float()


def create(artifact: Artifact, device: torch.device, threads: int | None) -> TorchBackend:
    """Registry hook."""
    return TorchBackend(artifact, device, threads)
