"""Shared helpers for the Triton launchers: device choice, interpreter detection, argument checks.

Nothing here launches a kernel. The checks raise ``TypeError`` when an argument is not a tensor at all and
``ValueError`` for any wrong property of a tensor (dtype, shape, rank, device, layout), and every message
names the argument, what was expected and what was passed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def default_device() -> str:
    """Return ``"cuda"`` when a GPU is visible, else ``"cpu"`` (Triton then needs ``TRITON_INTERPRET=1``)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# triton.jit picks the interpreter when it decorates a function, so what counts is the setting at import time.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def interpreting() -> bool:
    """Whether this package's kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRETED


def check_device(name: str, t: torch.Tensor) -> None:
    """Reject tensors that no Triton backend can run on in this process."""
    if t.device.type == "cuda" or interpreting():
        return
    raise ValueError(
        f"`{name}` is on device {t.device}, but Triton kernels need CUDA tensors; to run them on CPU tensors set "
        "TRITON_INTERPRET=1 before `kernels` is imported"
    )


def check_tensor(name: str, t: object) -> torch.Tensor:
    """Check that ``t`` is a tensor and return it (narrowed for type checkers)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float_dtype(name: str, t: torch.Tensor) -> None:
    """Require one of the dtypes every kernel supports (fp16, bf16, fp32)."""
    if t.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise ValueError(f"`{name}` must have dtype in ({names}), got {t.dtype}")


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Require ``t`` to share dtype and device with ``ref``."""
    if t.dtype != ref.dtype:
        raise ValueError(f"`{name}` must have the dtype of `{ref_name}` ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"`{name}` must be on the device of `{ref_name}` ({ref.device}), got {t.device}")


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Require an exact shape."""
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"`{name}` must have shape {tuple(expected)}, got {tuple(t.shape)}")


def check_input(inputs: dict[str, torch.Tensor], name: str, t: object, shape: tuple[int, ...]) -> torch.Tensor:
    """Check tensor argument ``name`` (exact ``shape``, dtype and device of ``inputs["x"]``); add it to ``inputs``."""
    t = check_tensor(name, t)
    check_same(name, t, "x", inputs["x"])
    check_shape(name, t, shape)
    inputs[name] = t
    return t


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of two tensors intersect (conservative: compares byte ranges, not elements)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if stride > 0)
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    a0, a1 = span(a)
    b0, b1 = span(b)
    return a0 < b1 and b0 < a1


def check_out(
    out: object, expected_shape: tuple[int, ...], like: torch.Tensor, like_name: str, inputs: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Validate a caller-provided output buffer: shape, dtype, device, contiguity, no overlap with inputs."""
    out = check_tensor("out", out)
    check_shape("out", out, expected_shape)
    check_same("out", out, like_name, like)
    if not out.is_contiguous():
        raise ValueError(f"`out` must be contiguous, got strides {tuple(out.stride())}")
    for name, t in inputs.items():
        if overlaps(out, t):
            raise ValueError(f"`out` must not share memory with `{name}`; pass a separate buffer")
    return out


def interpreter_bf16(dtype: torch.dtype) -> bool:
    """Whether kernels must work around the interpreter's bf16 handling (see ``dot_acc`` and ``cast_to``).

    Triton's CPU interpreter multiplies raw bf16 bit patterns in ``tl.dot`` and truncates instead of rounding
    when it casts fp32 to bf16. Compiled kernels do neither, so the flag is always False on a GPU.
    """
    return dtype == torch.bfloat16 and interpreting()


@triton.jit
def dot_acc(a, b, acc, INTERPRET_BF16: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation and IEEE fp32 products (never TF32).

    With INTERPRET_BF16, bf16 operands are widened to fp32 first. That is exact (a bf16 x bf16 product fits in
    fp32), so the result matches a native bf16 MMA with fp32 accumulation.
    """
    if INTERPRET_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def cast_to(x, dtype: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """Round fp32 ``x`` to ``dtype`` to nearest even (the GPU default; INTERPRET_BF16 rounds by hand first)."""
    if INTERPRET_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
