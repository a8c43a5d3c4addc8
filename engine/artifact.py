"""Engine artifacts: `engine.json` (manifest) + `weights.safetensors` + tokenizer files. See docs/ARTIFACT.md.

Loading validates every field, file and tensor against the manifest; each error names what is wrong
and what was expected. The artifact is backend-neutral: backends pad or re-lay weights when they load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.config import EncoderConfig
from engine.features import WindowSettings
from engine.manifest import (
    ARTIFACT_DTYPES,
    DTYPES,
    EMB_FORMAT_VERSION,
    EMB_SCHEME,
    EMBEDDINGS,
    FLOAT_FORMAT_VERSION,
    FORMAT,
    INT8,
    INT8_FORMAT_VERSION,
    MANIFEST,
    QUANTIZED_LINEARS,
    WEIGHTS,
    WORD,
    WORD_SCALE,
    ActivationQuant,
    ArtifactError,
    Quantization,
    parse_embeddings,
    parse_quantization,
    read_manifest,
    require,
)
from engine.model import expected_shapes

_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int8": "I8"}


@dataclass
class TokenizerSpec:
    """Tokenizer-side settings of the artifact."""

    settings: WindowSettings
    do_lower_case: bool
    strip_accents: bool
    files: list[str]


@dataclass
class Artifact:
    """A validated artifact in memory."""

    path: Path
    cfg: EncoderConfig
    dtype: str
    tokenizer: TokenizerSpec
    null_threshold: float
    source: dict[str, Any]
    _state: dict[str, torch.Tensor] | None = field(repr=False)  # None: not read yet (load_artifact(weights=False))
    quantization: Quantization | None = None  # int8 artifacts only
    embeddings: str = "same"  # "int8": the word embeddings are stored int8 (dequantized in `state`)

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The tensors by name; read and value-checked on first use when the artifact was loaded with weights=False.

        Int8 word embeddings come back dequantized (no scale tensor): `state` always matches the model's state dict."""
        if self._state is None:
            self._state = _load_weights(self.path / WEIGHTS, self.cfg, self.dtype, self.quantization, self.embeddings)
        return self._state

    @property
    def kernels(self) -> tuple[str, ...]:
        """Special kernels this artifact needs beyond float GEMMs (empty for float artifacts)."""
        return self.quantization.kernels if self.quantization else ()


def artifact_shapes(
    cfg: EncoderConfig, quantization: Quantization | None, embeddings: str = "same"
) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of an artifact: the model's state dict, plus int8 scales when quantized."""
    shapes = expected_shapes(cfg)
    for i in range(cfg.num_layers if quantization is not None else 0):
        for lin in QUANTIZED_LINEARS:
            out, inp = shapes[f"layers.{i}.{lin}.weight"]
            shapes[f"layers.{i}.{lin}.weight_scale"] = (out,)
            if quantization.activations is ActivationQuant.STATIC:
                shapes[f"layers.{i}.{lin}.input_scale"] = (inp,)
    if embeddings == INT8:
        shapes[WORD_SCALE] = (cfg.vocab_size,)
    return shapes


def tensor_dtype(name: str, dtype: str, embeddings: str = "same") -> str:
    """Safetensors dtype of tensor `name` in an artifact of manifest dtype `dtype` and word embeddings `embeddings`."""
    if embeddings == INT8 and name in (WORD, WORD_SCALE):
        return "I8" if name == WORD else "F32"
    if dtype != INT8:
        return _SAFETENSORS_DTYPES[dtype]
    parts = name.split(".")
    quantized = len(parts) == 4 and parts[0] == "layers" and parts[2] in QUANTIZED_LINEARS and parts[3] == "weight"
    return "I8" if quantized else "F32"


def normalizer_flags(tokenizer_json: dict[str, Any]) -> tuple[bool, bool]:
    """(lower-case, strip accents) from a fast tokenizer's `tokenizer.json` normalizer block."""
    norm = tokenizer_json.get("normalizer") or {}
    parts = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    lower = strip = False
    for p in parts:
        if p.get("type") == "BertNormalizer":
            lower = bool(p.get("lowercase"))
            strip = lower if p.get("strip_accents") is None else bool(p.get("strip_accents"))
        elif p.get("type") == "Lowercase":
            lower = True
        elif p.get("type") == "StripAccents":
            strip = True
    return lower, strip


def save_artifact(
    out: Path,
    cfg: EncoderConfig,
    state: dict[str, torch.Tensor],
    tokenizer_dir: Path,
    settings: WindowSettings,
    dtype: str = "float32",
    null_threshold: float = 0.0,
    source: dict[str, Any] | None = None,
    quantization: Quantization | None = None,
    embeddings: str = "same",
) -> Path:
    """Write an artifact directory from our state dict and a directory holding the source tokenizer.

    Float dtypes cast every tensor; `int8` takes an already quantized state (engine.quant.quantize_state) and
    its `quantization` block, and checks every tensor's name, shape and dtype before writing. `embeddings="int8"`
    stores the word embeddings int8 with a per-row scale, quantized from `state` as given (format_version 3).
    """
    if dtype not in ARTIFACT_DTYPES:
        raise ArtifactError(f"dtype {dtype!r} is not supported; choose one of {sorted(ARTIFACT_DTYPES)}")
    if embeddings not in EMBEDDINGS:
        raise ArtifactError(f"embeddings {embeddings!r} is not supported; choose one of {list(EMBEDDINGS)}")
    if (dtype == INT8) != (quantization is not None):
        raise ArtifactError("an int8 artifact needs a quantization block, and only an int8 artifact may have one")
    settings.validate(cfg.architecture, cfg.max_position_embeddings)
    if quantization is not None:
        _check_int8_state(state, cfg, quantization)
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if not getattr(tok, "is_fast", False):
        raise ArtifactError(f"{tokenizer_dir}: a fast (tokenizers) tokenizer is required")
    files = sorted(Path(f).name for f in tok.save_pretrained(str(out)))
    lower, strip = normalizer_flags(json.loads((out / "tokenizer.json").read_text(encoding="utf-8")))
    if quantization is None:
        tensors = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in state.items()}
    else:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if embeddings == INT8:
        from engine.quant import quantize_per_channel

        tensors[WORD], tensors[WORD_SCALE] = quantize_per_channel(state[WORD].detach().cpu())
    save_file(tensors, str(out / WEIGHTS), metadata={"format": FORMAT})
    version = FLOAT_FORMAT_VERSION if quantization is None else INT8_FORMAT_VERSION
    manifest = {
        "format": FORMAT,
        "format_version": EMB_FORMAT_VERSION if embeddings == INT8 else version,
        "config": cfg.to_dict(),
        "dtype": dtype,
        "weights": WEIGHTS,
        "tokenizer": {
            "max_seq_length": settings.max_seq_length,
            "doc_stride": settings.doc_stride,
            "max_query_length": settings.max_query_length,
            "do_lower_case": lower,
            "strip_accents": strip,
            "files": files,
        },
        "null_threshold": float(null_threshold),
        "source": source or {},
    }
    if quantization is not None:
        manifest["quantization"] = quantization.to_dict()
    if embeddings == INT8:
        manifest["embeddings"] = {"word": EMB_SCHEME}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def load_artifact(path: str | Path, weights: bool = True) -> Artifact:
    """Load and fully validate an artifact: manifest, tokenizer files, tensor names, shapes, dtypes and values.

    With `weights=False` the tensor values are neither read nor checked until `Artifact.state` is first used (names,
    shapes and dtypes still are): for backends that read the weights file themselves (the cpp backend)."""
    root = Path(path)
    m = read_manifest(root)
    try:
        cfg = EncoderConfig.from_dict(m["config"])
    except (ValueError, TypeError) as e:
        raise ArtifactError(f"{MANIFEST}: field 'config': {e}") from None
    t = m["tokenizer"]
    settings = WindowSettings(t["max_seq_length"], t["doc_stride"], t["max_query_length"])
    try:
        settings.validate(cfg.architecture, cfg.max_position_embeddings)
    except ValueError as e:
        raise ArtifactError(f"{MANIFEST}: tokenizer settings: {e}") from None
    for f in t["files"]:
        require((root / f).is_file(), f"tokenizer file {root / f} listed in {MANIFEST} is missing")
    quant = parse_quantization(m["quantization"]) if "quantization" in m else None
    emb = parse_embeddings(m["embeddings"]) if "embeddings" in m else "same"
    state = _load_weights(root / WEIGHTS, cfg, m["dtype"], quant, emb, read=weights)
    tok = TokenizerSpec(settings, bool(t["do_lower_case"]), bool(t["strip_accents"]), list(t["files"]))
    return Artifact(root, cfg, m["dtype"], tok, float(m["null_threshold"]), m["source"], state, quant, emb)


def _check_int8_state(state: dict[str, torch.Tensor], cfg: EncoderConfig, quant: Quantization) -> None:
    """Names, shapes and dtypes of a quantized state dict before it is written."""
    want = artifact_shapes(cfg, quant)
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing:
        raise ArtifactError(f"int8 state: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    if extra:
        raise ArtifactError(f"int8 state: unexpected tensor {extra[0]!r}")
    for k, shape in want.items():
        v = state[k]
        require(tuple(v.shape) == shape, f"int8 state: tensor {k!r} has shape {tuple(v.shape)}, expected {shape}")
        expect = torch.int8 if tensor_dtype(k, INT8) == "I8" else torch.float32
        require(v.dtype == expect, f"int8 state: tensor {k!r} has dtype {v.dtype}, expected {expect}")
    _check_int8_values(state, cfg)


def _check_int8_values(state: dict[str, torch.Tensor], cfg: EncoderConfig) -> None:
    """Symmetric int8 weights lie in [-127, 127]; scales are finite and positive."""
    for i in range(cfg.num_layers):
        for lin in QUANTIZED_LINEARS:
            p = f"layers.{i}.{lin}."
            w = state[p + "weight"]
            require(
                not (w == -128).any(),
                f"{WEIGHTS}: tensor {p + 'weight'!r} holds -128; the symmetric int8 scheme uses [-127, 127]",
            )
            for s in ("weight_scale", "input_scale"):
                v = state.get(p + s)
                if v is not None and v.numel():
                    ok = bool((v > 0).all() and torch.isfinite(v).all())
                    require(ok, f"{WEIGHTS}: tensor {p + s!r} must be positive and finite (min {v.min().item():g})")


def _load_weights(
    path: Path,
    cfg: EncoderConfig,
    dtype: str,
    quant: Quantization | None = None,
    embeddings: str = "same",
    read: bool = True,
) -> dict[str, torch.Tensor] | None:
    """Checks the tensor header (names, shapes, dtypes); with `read`, reads the tensors and checks their values.

    Int8 word embeddings are checked and dequantized (`dequantize_word_embeddings`)."""
    require(path.is_file(), f"weights file {path} is missing")
    want = artifact_shapes(cfg, quant, embeddings)
    try:
        with safe_open(str(path), "pt") as f:
            names = set(f.keys())
            missing = [k for k in want if k not in names]
            if missing:
                raise ArtifactError(f"{WEIGHTS}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
            extra = sorted(names - set(want))
            if extra:
                raise ArtifactError(
                    f"{WEIGHTS}: unexpected tensor {extra[0]!r} (not in the manifest's config"
                    f"{' and quantization' if quant or embeddings == INT8 else ''})"
                )
            state = {}
            for k, shape in want.items():
                sl = f.get_slice(k)
                got_shape, got_dtype = tuple(sl.get_shape()), sl.get_dtype()
                require(
                    got_shape == shape,
                    f"{WEIGHTS}: tensor {k!r} has shape {got_shape}, expected {shape} "
                    f"from {MANIFEST} (heads={list(cfg.heads)}, ffn={list(cfg.ffn)})",
                )
                expect = tensor_dtype(k, dtype, embeddings)
                require(
                    got_dtype == expect,
                    f"{WEIGHTS}: tensor {k!r} has dtype {got_dtype}, expected {expect} (manifest dtype {dtype})",
                )
                if read:
                    state[k] = f.get_tensor(k)
    except ArtifactError:
        raise
    except Exception as e:  # safetensors raises several types on truncated or corrupt files
        raise ArtifactError(f"{path} is not a readable safetensors file ({e})") from None
    if not read:
        return None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ArtifactError(f"{WEIGHTS}: tensor {bad[0]!r} contains NaN or inf")
    if quant is not None:
        _check_int8_values(state, cfg)
    if embeddings == INT8:
        dequantize_word_embeddings(state, dtype)
    return state


def dequantize_word_embeddings(state: dict[str, torch.Tensor], dtype: str) -> None:
    """In place: checks int8 word embeddings and their scale, then replaces them by fp32 `q * scale` rounded to the
    artifact's float dtype (fp32 for int8 artifacts); drops the scale. libqaengine computes the same bits."""
    from engine.quant import dequantize_per_channel

    q, scale = state[WORD], state.pop(WORD_SCALE)
    require(not (q == -128).any(), f"{WEIGHTS}: tensor {WORD!r} holds -128; the symmetric int8 scheme uses [-127, 127]")
    require(
        bool((scale > 0).all()), f"{WEIGHTS}: tensor {WORD_SCALE!r} must be positive and finite (min {scale.min():g})"
    )
    state[WORD] = dequantize_per_channel(q, scale).to(DTYPES.get(dtype, torch.float32))
