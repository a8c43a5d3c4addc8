"""Reduced-precision model surgery for the torch backend: int8 encoder Linears, bf16 Linears, calibration.

engine.model stays the fp32 reference. Everything here takes an fp32 state dict (or model) and returns a new
state dict or a new module; no precision flag runs through `forward`. Schemes, tolerances and measurements
are in docs/PRECISION.md; the tensors an int8 artifact stores are in docs/ARTIFACT.md.

Int8 (every encoder Linear: qkv, o, ffn_in, ffn_out; LayerNorm, softmax, embeddings and the QA head stay fp32):
    weights  Q[j, k] = round(W'[j, k] / s_w[j]) in [-127, 127],   s_w[j] = max_k |W'[j, k]| / 127
    dynamic  W' = W;  q[t, k] = round(x[t, k] / s_x[t]),           s_x[t] = max_k |x[t, k]| / 127   (per token)
             y[t, j] = (q Qᵀ)[t, j] · s_x[t] · s_w[j] + b[j]
    static   W' = W · diag(c);  q[t, k] = clamp(round(x[t, k] / c[k]), -127, 127),  c = calibrated `input_scale`
             y[t, j] = (q Qᵀ)[t, j] · s_w[j] + b[j]
The product q Qᵀ is exact (int32 accumulation). The GEMM is oneDNN's int8 linear through ATen
(`torch.ops.onednn.qlinear_pointwise`), which wants uint8 activations: we pass q + 128 with zero point 128.
(Signed int8 activations dropped to a reference loop in torch 2.13: about 3000x slower.)

Bf16: encoder Linears hold bf16 weights and take bf16 activations (oneDNN accumulates in fp32 and rounds the
output to bf16, which is then widened to fp32). Attention, GELU, residual adds, LayerNorms, embeddings and the QA
head stay fp32: SDPA on bf16 q/k/v was no faster than fp32 on this CPU (Zen 4, no AMX), so it would only add error.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import EncoderConfig
from engine.features import PackedBatch, WindowSettings
from engine.manifest import QUANTIZED_LINEARS, ActivationQuant, Quantization
from engine.model import RaggedQAModel

QMAX = 127  # symmetric int8: [-127, 127]; -128 is never produced
_ZERO_POINT = 128  # uint8 activation = int8 value + 128
_TINY = 1e-30  # floor for an all-zero row's max, so its scale stays finite (its values quantize to 0)
SMOOTHING_ALPHA = 1.0  # static scales: share of each input channel's range moved into the weights (docs/PRECISION.md)


# ---- quantize / dequantize ----------------------------------------------------------------------------------------


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[out, in]` float -> (int8 `[out, in]`, fp32 scale `[out]`), symmetric per output row; |w - deq| <= scale/2."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))  # an all-zero row quantizes to 0 with scale 1
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 `[out, in]` and scale `[out]` -> fp32 `[out, in]`."""
    return q.float() * scale[:, None]


def _to_u8(q: torch.Tensor) -> torch.Tensor:
    """Rounded fp32 values in [-127, 127] -> uint8 q + 128 (the GEMM's input). Through int8 and a flipped sign bit:
    ATen's float -> uint8 cast is not vectorised (about 20x slower than float -> int8)."""
    return q.to(torch.int8).view(torch.uint8).bitwise_xor_(_ZERO_POINT)


def _per_token_u8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 `[T, k]` -> (uint8 `[T, k]` = q + 128, row max `[T, 1]`): the dynamic int8 kernel's input stage."""
    amax = x.abs().amax(dim=1, keepdim=True).clamp_min_(_TINY)  # (T, 1)
    return _to_u8((x * (QMAX / amax)).round_()), amax  # |x · 127 / amax| <= 127: no clamp needed


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[T, k]` float -> (int8 `[T, k]`, fp32 scale `[T]`), symmetric per row (token); |x - deq| <= scale/2.

    Bit-identical to what Int8LinearDynamic feeds its GEMM.
    """
    u8, amax = _per_token_u8(x.detach().float().contiguous())
    return u8.bitwise_xor_(_ZERO_POINT).view(torch.int8), amax[:, 0] / QMAX


def dequantize_per_token(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 `[T, k]` and scale `[T]` -> fp32 `[T, k]`."""
    return q.float() * scale[:, None]


# ---- static scales and the quantized state dict ---------------------------------------------------------------------


def static_input_scale(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = SMOOTHING_ALPHA) -> torch.Tensor:
    """Per-input-channel activation scale `[in]` from calibrated `max |x[:, k]|` `[in]` and `weight` `[out, in]`.

    SmoothQuant: divide channel k by m[k] = a[k]^alpha / w[k]^(1-alpha) (w[k] = max_j |W[j, k]|), which evens out
    the activation channels (outliers) at the weights' expense, then use one step t = max_k(a[k] / m[k]) / 127 for
    the smoothed activations. The scale is c[k] = m[k] · t, so |x[:, k]| <= a[k] never clips on calibration data.
    """
    a = act_absmax.float()
    w = weight.detach().float().abs().amax(dim=0)
    floor_a, floor_w = a.max().clamp_min(_TINY) * 1e-5, w.max().clamp_min(_TINY) * 1e-5  # dead channels
    m = a.clamp_min(floor_a).pow(alpha) / w.clamp_min(floor_w).pow(1 - alpha)
    return m * (a / m).max() / QMAX


def quantize_state(
    cfg: EncoderConfig,
    state: dict[str, torch.Tensor],
    input_absmax: dict[str, torch.Tensor] | None = None,
    alpha: float = SMOOTHING_ALPHA,
) -> dict[str, torch.Tensor]:
    """A new int8 artifact state from an fp32 one (docs/ARTIFACT.md): I8 encoder Linear weights + fp32 scales.

    `input_absmax` (from `calibrate`, keyed `layers.{l}.{linear}`) selects static scales; None means dynamic.
    Zero-width Linears (0 heads / 0 FFN units) get empty weights and, for static, unit input scales.
    """
    out = {k: v.detach().float().clone() for k, v in state.items()}
    for i in range(cfg.num_layers):
        for lin in QUANTIZED_LINEARS:
            p = f"layers.{i}.{lin}"
            w = out[p + ".weight"]
            if input_absmax is not None:
                c = static_input_scale(input_absmax[p], w, alpha) if w.numel() else torch.ones(w.shape[1])
                out[p + ".input_scale"] = c
                w = w * c[None, :]
            out[p + ".weight"], out[p + ".weight_scale"] = quantize_per_channel(w)
    return out


# ---- runtime modules ----------------------------------------------------------------------------------------------


def int8_kernels_available(device: torch.device) -> bool:
    """Whether this torch build can run the int8 Linears on `device` (oneDNN, CPU only)."""
    return (
        device.type == "cpu" and torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")
    )


class _Int8Linear(nn.Module):
    """Shared storage: the prepacked int8 weight, its per-row scale, and an fp32 bias (`.bias`, as nn.Linear)."""

    def __init__(self, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.packed = torch.ops.onednn.qlinear_prepack(qweight.contiguous(), None)  # opaque oneDNN layout
        self.register_buffer("weight_scale", weight_scale.float().contiguous())
        self.register_buffer("bias", bias.float().contiguous())
        self.register_buffer("zero_points", torch.zeros(self.out_features, dtype=torch.long))

    def _gemm(self, xu8: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """uint8 `[T, in]` (value + 128) -> fp32 `[T, out]` = (q Qᵀ) · s_w (+ bias)."""
        return torch.ops.onednn.qlinear_pointwise(
            xu8,
            1.0,
            _ZERO_POINT,
            self.packed,
            self.weight_scale,
            self.zero_points,
            bias,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8LinearDynamic(_Int8Linear):
    """y = (q Qᵀ) · s_x[t] · s_w + b with per-token scales computed from each input row."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 `[T, in]` -> fp32 `[T, out]`."""
        xu8, amax = _per_token_u8(x.float().contiguous())
        y = self._gemm(xu8, None)  # (T, out) fp32, a fresh tensor: scale it in place
        return torch.addcmul(self.bias, y, amax, value=1.0 / QMAX, out=y)


class Int8LinearStatic(_Int8Linear):
    """y = (q Qᵀ) · s_w + b with calibrated per-input-channel scales (folded into the weight at build time)."""

    def __init__(
        self, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor, input_scale: torch.Tensor
    ):
        super().__init__(qweight, weight_scale, bias)
        self.register_buffer("inv_input_scale", (1.0 / input_scale.float()).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 `[T, in]` -> fp32 `[T, out]`; values beyond the calibrated range saturate at ±127."""
        q = (x.float() * self.inv_input_scale).round_().clamp_(-QMAX, QMAX)
        return self._gemm(_to_u8(q), self.bias)


class BF16Linear(nn.Module):
    """A Linear with bf16 weight and bias: the input is cast to bf16, the bf16 output widened to fp32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous())
        self.register_buffer("bias", bias.detach().to(torch.bfloat16).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[T, in]` -> fp32 `[T, out]`."""
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).float()


# ---- model surgery --------------------------------------------------------------------------------------------------


def _float_model(cfg: EncoderConfig, state: dict[str, torch.Tensor]) -> RaggedQAModel:
    model = RaggedQAModel(cfg).eval()
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model


def int8_model(cfg: EncoderConfig, state: dict[str, torch.Tensor], quant: Quantization) -> RaggedQAModel:
    """A new CPU model from an int8 artifact state: every non-empty encoder Linear becomes an int8 module."""
    if not int8_kernels_available(torch.device("cpu")):
        raise RuntimeError(
            "this torch build has no oneDNN int8 linear (torch.ops.onednn.qlinear_pointwise); "
            "int8 artifacts need a torch with mkldnn enabled"
        )
    # fp32 parts as stored; int8 weights get placeholders, replaced by int8 modules below.
    fp = {
        k: (torch.zeros(v.shape) if v.dtype == torch.int8 else v)
        for k, v in state.items()
        if not k.endswith((".weight_scale", ".input_scale"))
    }
    model = _float_model(cfg, fp)
    for i, layer in enumerate(model.layers):
        for lin in QUANTIZED_LINEARS:
            p = f"layers.{i}.{lin}."
            q, scale, bias = state[p + "weight"], state[p + "weight_scale"], state[p + "bias"]
            if q.numel() == 0:
                continue  # a pruned-away sublayer: only its bias is used (docs/ARTIFACT.md semantics)
            if quant.activations is ActivationQuant.STATIC:
                module: nn.Module = Int8LinearStatic(q, scale, bias, state[p + "input_scale"])
            else:
                module = Int8LinearDynamic(q, scale, bias)
            setattr(layer, lin, module)
    return model.eval()


def bf16_model(cfg: EncoderConfig, state: dict[str, torch.Tensor]) -> RaggedQAModel:
    """A new model whose non-empty encoder Linears run in bf16; everything else fp32 (upcast exactly from bf16)."""
    model = _float_model(cfg, state)
    for layer in model.layers:
        for lin in QUANTIZED_LINEARS:
            old = getattr(layer, lin)
            if old.weight.numel():
                setattr(layer, lin, BF16Linear(old.weight, old.bias))
    return model.eval()


# ---- calibration ----------------------------------------------------------------------------------------------------


def calibrate(model: RaggedQAModel, batches: Iterable[PackedBatch]) -> dict[str, torch.Tensor]:
    """Run the fp32 `model` over `batches`; returns `max |input|` per input channel `[in]` of every encoder Linear,
    keyed `layers.{l}.{linear}` (zero-width Linears, which never run, are absent)."""
    absmax: dict[str, torch.Tensor] = {}
    hooks = []

    def record(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            m = args[0].detach().abs().amax(dim=0).float()
            absmax[name] = torch.maximum(absmax[name], m) if name in absmax else m

        return hook

    for i, layer in enumerate(model.layers):
        for lin in QUANTIZED_LINEARS:
            hooks.append(getattr(layer, lin).register_forward_pre_hook(record(f"layers.{i}.{lin}")))
    try:
        with torch.inference_mode():
            for b in batches:
                model(b.input_ids, b.token_type_ids, b.cu_seqlens, b.max_seqlen)
    finally:
        for h in hooks:
            h.remove()
    return absmax


def calibration_batches(
    path: str | Path,
    tokenizer_dir: str | Path,
    cfg: EncoderConfig,
    settings: WindowSettings,
    samples: int,
    batch_size: int = 16,
) -> tuple[list[PackedBatch], dict[str, int]]:
    """Windows of `samples` real SQuAD examples (evenly spread over the file), packed `batch_size` windows a batch.

    Raises ValueError naming the problem for a file that is not SQuAD JSON, holds no usable examples, or for
    `samples` < 1. Returns the batches and counts (examples, windows, tokens) for the manifest.
    """
    from engine.data.squad import load_squad, read_squad_json
    from engine.features import WindowMaker, load_tokenizer, pack_windows

    if samples < 1:
        raise ValueError(f"--calib-samples must be >= 1, got {samples}")
    try:
        examples = load_squad(read_squad_json(path))
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"calibration file {path} does not follow the SQuAD schema "
            f"(data[].paragraphs[].context/qas[].question): missing or bad {e}"
        ) from None
    examples = [
        e
        for e in examples
        if isinstance(e.question, str) and isinstance(e.context, str) and e.question.strip() and e.context.strip()
    ]
    if not examples:
        raise ValueError(f"calibration file {path} holds no examples (no question with a non-empty context)")
    picked = [examples[i * len(examples) // min(samples, len(examples))] for i in range(min(samples, len(examples)))]
    maker = WindowMaker(load_tokenizer(tokenizer_dir), cfg.architecture, settings)
    windows = []
    for e in picked:
        try:
            windows += maker.windows(e.question, e.context)
        except ValueError:  # text the tokenizer maps to no tokens at all: nothing to calibrate on
            continue
    if not windows:
        raise ValueError(f"calibration file {path}: none of its {len(picked)} examples tokenizes to a window")
    batches = [pack_windows(windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)]
    counts = {"examples": len(picked), "windows": len(windows), "tokens": sum(len(w.input_ids) for w in windows)}
    return batches, counts
