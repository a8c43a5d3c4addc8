"""The one `(dtype, atol, rtol)` table of the kernel tests, and interpreter mode on machines without CUDA.

fp32: atol and rtol relative to max|ref|. fp16/bf16: a kernel's max error may be at most HALF_RATIO x that of
PyTorch's own path in the same dtype, plus atol + rtol * max|ref| as a floor.
"""

import os
from collections.abc import Callable

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


def assert_matches_reference(
    out: torch.Tensor,
    ref: torch.Tensor,
    torch_out: Callable[[], torch.Tensor],
    dtype: torch.dtype,
    atol: float,
    rtol: float,
) -> None:
    """`out` against the float64 `ref` by the rule above; `torch_out()` is PyTorch's own result in `dtype`."""
    scale = ref.abs().max().item() if ref.numel() else 0.0
    if dtype == torch.float32 or not ref.numel():
        torch.testing.assert_close(out.double(), ref, atol=atol * scale, rtol=rtol)
        return
    err = (out.double() - ref).abs().max().item()
    torch_err = (torch_out().double() - ref).abs().max().item()
    bound = HALF_RATIO * torch_err + atol + rtol * scale
    assert err <= bound, f"{dtype}: kernel error {err:.3g} > {bound:.3g} (torch's own error {torch_err:.3g})"
