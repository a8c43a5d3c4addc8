"""The one `(dtype, atol, rtol)` table of the kernel tests, and interpreter mode on machines without CUDA.

fp32: atol and rtol relative to max|ref|. fp16/bf16: a kernel's max error may be at most HALF_RATIO x that of
PyTorch's own path in the same dtype, plus atol + rtol * max|ref| as a floor.
"""

import os

import torch

if not torch.cuda.is_available():
    # Must happen before `kernels` is imported: triton.jit picks the interpreter when it decorates a kernel.
    os.environ.setdefault("TRITON_INTERPRET", "1")

TOLERANCES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 1e-6, 2.0**-11),  # floor: half an ulp of max|ref|, the rounding of the output itself
    (torch.bfloat16, 1e-6, 2.0**-8),
]
HALF_RATIO = 3.0
DTYPE_IDS = [str(dtype).removeprefix("torch.") for dtype, _, _ in TOLERANCES]
