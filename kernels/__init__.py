"""Triton kernels for the encoder: packed varlen attention, GEMM with fused epilogues, add + LayerNorm.

Each op lives in its own module (kernel, launcher with argument checks, thin public wrapper); the module
docstrings state the limits. On a machine without a GPU, set ``TRITON_INTERPRET=1`` before importing this
package to run the kernels on CPU tensors (slowly; for tests only).
"""

from kernels._utils import default_device
from kernels.attention import varlen_attention
from kernels.layernorm import add_layernorm
from kernels.linear import linear, linear_tuning_log

__all__ = ["add_layernorm", "default_device", "linear", "linear_tuning_log", "varlen_attention"]
