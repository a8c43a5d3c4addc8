"""The `cpp` backend: libqaengine through the pybind11 module `engine._C` (CPU, and CUDA in a -DQAENGINE_CUDA=ON
build).

The C++ engine reads the artifact directory itself (engine.json, weights.safetensors, tokenizer.json) and validates
it with the same rules as engine.artifact. Its CPU path runs padding-free packed batches with fused kernels:
varlen attention with an online softmax, bias + GELU, residual + bias + LayerNorm; fp32 GEMMs call oneDNN's library
(libdnnl) directly when the build found it, else torch's oneDNN ops. Threads: the engine's own pool (csrc/src/cpu/
pool.h), as many as torch.get_num_threads(), each running its items single-threaded; it leaves torch's OpenMP team
alone, and engine.openmp keeps that team from spinning on the pool's cores (docs/CPP.md "Threads").

Compute by artifact dtype (docs/PRECISION.md, docs/CPP.md); attention, LayerNorm, GELU, embeddings and the QA head
are fp32 in every mode:
  float32            fp32.
  bfloat16           CPU: encoder Linears in bf16 through oneDNN (bf16 input, weight and output, fp32
                     accumulation; the output widened to fp32), as engine.quant.BF16Linear. Loading fails when
                     oneDNN cannot run bf16 GEMMs on this CPU. CUDA: upcast to fp32.
  float16            upcast to fp32.
  int8               CPU only: encoder Linears through oneDNN's u8 x s8 GEMM (onednn::qlinear_pointwise) with
                     vectorised per-token / static quantization and a fused rescale + bias + activation epilogue,
                     the numerics of engine.quant.Int8LinearDynamic / Int8LinearStatic. Kernels:
                     `supported_kernels(device)`; none on CUDA, so engine.runtime refuses int8 artifacts there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine import openmp
from engine.artifact import Artifact

try:
    from engine import _C
except ImportError as e:  # the native build is optional (setup.py prints why it was skipped)
    _C = None
    _IMPORT_ERROR: str | None = str(e)
else:
    _IMPORT_ERROR = None


def is_available() -> bool:
    """True when the native module engine._C imports."""
    return _C is not None


def why_unavailable(device: torch.device) -> str | None:
    """None when the backend can run on `device`, else the reason (registry hook)."""
    if _C is None:
        return f"engine._C is not built ({_IMPORT_ERROR}); reinstall with the C++ toolchain (make install)"
    if device.type == "cuda" and not _C.cuda_built:
        return "engine._C was built without CUDA (configure with -DQAENGINE_CUDA=ON)"
    if device.type not in ("cpu", "cuda"):
        return f"runs on cpu/cuda, not {device.type}"
    return None


def supported_kernels(device: torch.device) -> frozenset[str]:
    """The artifact kernels (engine.manifest.KERNELS) this build runs on `device`: the int8 GEMMs on the CPU when
    torch's oneDNN int8 linear works there, none on CUDA (registry hook)."""
    if _C is None or device.type != "cpu" or not hasattr(_C, "supported_kernels"):
        return frozenset()
    return frozenset(_C.supported_kernels("cpu"))


class CppBackend:
    """Packed forward through libqaengine."""

    name = "cpp"

    def __init__(self, artifact_dir: Path, device: str = "cpu", threads: int | None = None):
        if _C is None:
            raise RuntimeError(why_unavailable(torch.device("cpu")))
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)  # the engine's pool takes its size from ATen's thread count
        # libgomp started with its long default spin (torch imported before engine): release the caller's team
        _C.set_release_caller_team(openmp.STATE == "late")
        self.device = torch.device(device)
        self.engine = _C.Engine.load(str(artifact_dir), str(self.device))

    def forward_packed(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed int64 ids/types `[T]`, int32 `cu_seqlens` `[B+1]` -> fp32 start and end logits `[T]` each."""
        ids = input_ids.to(self.device, torch.long).contiguous()
        types = None if token_type_ids is None else token_type_ids.to(self.device, torch.long).contiguous()
        cu = cu_seqlens.to(torch.int32).contiguous()
        return self.engine.forward_packed(ids, types, cu, int(max_seqlen))


def create(artifact: Artifact, device: torch.device, threads: int | None) -> CppBackend:
    """Registry hook: the C++ engine re-reads the artifact from its directory."""
    return CppBackend(artifact.path, str(device), threads)
