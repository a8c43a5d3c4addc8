"""Engine artifacts: `engine.json` (manifest) + `weights.safetensors` + tokenizer files. See docs/ARTIFACT.md.

Loading validates every field, file and tensor against the manifest; each error names what is wrong
and what was expected. The artifact is backend-neutral: backends pad or re-lay weights when they load.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.config import EncoderConfig
from engine.features import WindowSettings
from engine.model import expected_shapes

FORMAT = "sparseqa-engine"
FORMAT_VERSION = 3  # the newest version this module reads and writes; float artifacts are still written as 1
FLOAT_FORMAT_VERSION = 1
INT8_FORMAT_VERSION = 2
EMB_FORMAT_VERSION = 3  # any dtype + an `embeddings` block (int8 word embeddings); written only when they are int8
MANIFEST = "engine.json"
WEIGHTS = "weights.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # float artifacts
INT8 = "int8"
ARTIFACT_DTYPES = (*DTYPES, INT8)
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int8": "I8"}
_TOP_KEYS = {"format", "format_version", "config", "dtype", "weights", "tokenizer", "null_threshold", "source"}
_QUANT_KEYS = {"weights", "activations", "linears", "float_dtype", "kernels", "calibration"}

# Int8 artifacts (format_version 2, docs/ARTIFACT.md "Int8 artifacts"): the encoder Linears below hold I8 weights
# with per-output-channel scales; every other tensor is fp32.
QUANTIZED_LINEARS = ("qkv", "o", "ffn_in", "ffn_out")
WEIGHT_SCHEME = "int8_symmetric_per_output_channel"

# Int8 word embeddings (format_version 3, docs/ARTIFACT.md "Int8 word embeddings"): `embeddings.word.weight` is I8
# [V, d] with an F32 per-row scale [V]; loaders dequantize it into the artifact's float dtype (fp32 for int8).
EMBEDDINGS = ("same", "int8")  # build_model --embeddings
WORD = "embeddings.word.weight"
WORD_SCALE = "embeddings.word.weight_scale"
EMB_SCHEME = "int8_symmetric_per_row"


class ActivationQuant(str, enum.Enum):
    """How an int8 artifact's Linear inputs are quantized."""

    DYNAMIC = "dynamic_per_token"  # scale max|x_t|/127 per token, computed at run time
    STATIC = "static_per_input_channel"  # calibrated scale per input channel, stored as `input_scale`


# The kernels an int8 artifact needs, by activation mode. Backends list what they provide
# (`supported_kernels(device)`); engine.runtime refuses a backend that lacks one.
KERNELS = {ActivationQuant.DYNAMIC: ("int8_gemm_per_token",), ActivationQuant.STATIC: ("int8_gemm_static",)}
KNOWN_KERNELS = frozenset(k for ks in KERNELS.values() for k in ks)
_TOK_KEYS = {"max_seq_length", "doc_stride", "max_query_length", "do_lower_case", "strip_accents", "files"}


class ArtifactError(ValueError):
    """An engine artifact that is malformed, incomplete or inconsistent with its manifest."""


@dataclass
class TokenizerSpec:
    """Tokenizer-side settings of the artifact."""

    settings: WindowSettings
    do_lower_case: bool
    strip_accents: bool
    files: list[str]


@dataclass(frozen=True)
class Quantization:
    """The `quantization` block of an int8 manifest."""

    activations: ActivationQuant
    calibration: dict[str, Any] | None = None  # static only: provenance of the input scales (file, samples, ...)

    @property
    def kernels(self) -> tuple[str, ...]:
        """Kernels a backend must provide to run this artifact."""
        return KERNELS[self.activations]

    def to_dict(self) -> dict[str, Any]:
        """The manifest block."""
        return {
            "weights": WEIGHT_SCHEME,
            "activations": self.activations.value,
            "linears": list(QUANTIZED_LINEARS),
            "float_dtype": "float32",
            "kernels": list(self.kernels),
            "calibration": self.calibration,
        }


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


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ArtifactError(msg)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Parse and structurally validate `engine.json` (not the weights)."""
    root = Path(path)
    _require(root.is_dir(), f"artifact directory {root} does not exist")
    mpath = root / MANIFEST
    _require(
        mpath.is_file(), f"{mpath} is missing: not an engine artifact (build one with python -m engine.build_model)"
    )
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e})") from None
    _require(isinstance(m, dict), f"{mpath} must hold a JSON object")
    _require(m.get("format") == FORMAT, f"{MANIFEST}: field 'format' must be {FORMAT!r}, got {m.get('format')!r}")
    ver = m.get("format_version")
    _require(_is_int(ver), f"{MANIFEST}: field 'format_version' must be an integer")
    _require(
        ver <= FORMAT_VERSION,
        f"{MANIFEST}: format_version {ver} was written by a newer SparseQA "
        f"(this one reads up to {FORMAT_VERSION}); upgrade SparseQA",
    )
    versions = (FLOAT_FORMAT_VERSION, INT8_FORMAT_VERSION, EMB_FORMAT_VERSION)
    _require(ver in versions, f"{MANIFEST}: format_version {ver} is not supported")
    # Version 1 holds float artifacts, version 2 int8 ones; version 3 adds an `embeddings` block to either.
    dtype = m.get("dtype")
    if ver == FLOAT_FORMAT_VERSION:
        _require(
            dtype != INT8,
            f"{MANIFEST}: dtype 'int8' needs format_version {INT8_FORMAT_VERSION} and a "
            f"'quantization' block, got format_version {ver}",
        )
    elif ver == INT8_FORMAT_VERSION and "dtype" in m:
        _require(
            dtype == INT8,
            f"{MANIFEST}: format_version {ver} is for int8 artifacts, but dtype is {dtype!r} "
            f"(float artifacts use format_version {FLOAT_FORMAT_VERSION})",
        )
    keys = set(_TOP_KEYS)
    if ver == INT8_FORMAT_VERSION or (ver == EMB_FORMAT_VERSION and dtype == INT8):
        keys.add("quantization")
    if ver == EMB_FORMAT_VERSION:
        keys.add("embeddings")
    missing, unknown = keys - set(m), set(m) - keys
    _require(not missing, f"{MANIFEST}: missing field(s) {sorted(missing)}")
    _require(not unknown, f"{MANIFEST}: unknown field(s) {sorted(unknown)}")
    _require(
        isinstance(dtype, str) and dtype in ARTIFACT_DTYPES,
        f"{MANIFEST}: field 'dtype' is {dtype!r}, expected one of {sorted(ARTIFACT_DTYPES)}",
    )
    if "quantization" in m:
        parse_quantization(m["quantization"])
    if ver == EMB_FORMAT_VERSION:
        parse_embeddings(m["embeddings"])
    _require(m["weights"] == WEIGHTS, f"{MANIFEST}: field 'weights' must be {WEIGHTS!r}")
    t = m["tokenizer"]
    _require(
        isinstance(t, dict) and set(t) == _TOK_KEYS, f"{MANIFEST}: field 'tokenizer' must have keys {sorted(_TOK_KEYS)}"
    )
    for k in ("max_seq_length", "doc_stride", "max_query_length"):
        _require(_is_int(t[k]), f"{MANIFEST}: tokenizer.{k} must be an integer, got {t[k]!r}")
    _require(
        isinstance(t["files"], list) and "tokenizer.json" in t["files"],
        f"{MANIFEST}: tokenizer.files must list the tokenizer files, including tokenizer.json",
    )
    nt = m["null_threshold"]
    _require(
        isinstance(nt, (int, float)) and not isinstance(nt, bool) and math.isfinite(nt),
        f"{MANIFEST}: null_threshold must be a finite number, got {nt!r}",
    )
    _require(isinstance(m["source"], dict), f"{MANIFEST}: field 'source' must be an object")
    return m


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
        _require((root / f).is_file(), f"tokenizer file {root / f} listed in {MANIFEST} is missing")
    quant = parse_quantization(m["quantization"]) if "quantization" in m else None
    emb = parse_embeddings(m["embeddings"]) if "embeddings" in m else "same"
    state = _load_weights(root / WEIGHTS, cfg, m["dtype"], quant, emb, read=weights)
    tok = TokenizerSpec(settings, bool(t["do_lower_case"]), bool(t["strip_accents"]), list(t["files"]))
    return Artifact(root, cfg, m["dtype"], tok, float(m["null_threshold"]), m["source"], state, quant, emb)


def parse_embeddings(e: Any) -> str:
    """Validate a version-3 manifest's `embeddings` block; returns how the word embeddings are stored ("int8")."""
    where = f"{MANIFEST}: field 'embeddings'"
    _require(isinstance(e, dict), f"{where} must be an object")
    missing, unknown = {"word"} - set(e), set(e) - {"word"}
    _require(not missing, f"{where}: missing field(s) {sorted(missing)}")
    _require(not unknown, f"{where}: unknown field(s) {sorted(unknown)}")
    _require(e["word"] == EMB_SCHEME, f"{where}: word is {e['word']!r}, this SparseQA reads only {EMB_SCHEME!r}")
    return INT8


def parse_quantization(q: Any) -> Quantization:
    """Validate an int8 manifest's `quantization` block."""
    where = f"{MANIFEST}: field 'quantization'"
    _require(isinstance(q, dict), f"{where} must be an object")
    missing, unknown = _QUANT_KEYS - set(q), set(q) - _QUANT_KEYS
    _require(not missing, f"{where}: missing key(s) {sorted(missing)}")
    _require(not unknown, f"{where}: unknown key(s) {sorted(unknown)}")
    _require(
        q["weights"] == WEIGHT_SCHEME,
        f"{where}: weights is {q['weights']!r}, this SparseQA reads only {WEIGHT_SCHEME!r}",
    )
    modes = [a.value for a in ActivationQuant]
    _require(q["activations"] in modes, f"{where}: activations is {q['activations']!r}, expected one of {modes}")
    act = ActivationQuant(q["activations"])
    _require(
        q["linears"] == list(QUANTIZED_LINEARS),
        f"{where}: linears must be {list(QUANTIZED_LINEARS)}, got {q['linears']!r}",
    )
    _require(q["float_dtype"] == "float32", f"{where}: float_dtype must be 'float32', got {q['float_dtype']!r}")
    kernels = q["kernels"]
    _require(
        isinstance(kernels, list) and all(isinstance(k, str) for k in kernels),
        f"{where}: kernels must be a list of kernel names",
    )
    unknown_k = sorted(set(kernels) - KNOWN_KERNELS)
    _require(
        not unknown_k,
        f"{where}: requires kernel(s) {unknown_k} that this SparseQA does not know "
        f"(known: {sorted(KNOWN_KERNELS)}); upgrade SparseQA",
    )
    _require(
        tuple(kernels) == KERNELS[act],
        f"{where}: activations {act.value!r} need kernels {list(KERNELS[act])}, but the manifest lists {kernels}",
    )
    cal = q["calibration"]
    if act is ActivationQuant.STATIC:
        _require(isinstance(cal, dict), f"{where}: static activation scales need a 'calibration' object")
    else:
        _require(cal is None, f"{where}: calibration must be null for {act.value!r} activations")
    return Quantization(act, cal)


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
        _require(tuple(v.shape) == shape, f"int8 state: tensor {k!r} has shape {tuple(v.shape)}, expected {shape}")
        expect = torch.int8 if tensor_dtype(k, INT8) == "I8" else torch.float32
        _require(v.dtype == expect, f"int8 state: tensor {k!r} has dtype {v.dtype}, expected {expect}")
    _check_int8_values(state, cfg)


def _check_int8_values(state: dict[str, torch.Tensor], cfg: EncoderConfig) -> None:
    """Symmetric int8 weights lie in [-127, 127]; scales are finite and positive."""
    for i in range(cfg.num_layers):
        for lin in QUANTIZED_LINEARS:
            p = f"layers.{i}.{lin}."
            w = state[p + "weight"]
            _require(
                not (w == -128).any(),
                f"{WEIGHTS}: tensor {p + 'weight'!r} holds -128; the symmetric int8 scheme uses [-127, 127]",
            )
            for s in ("weight_scale", "input_scale"):
                v = state.get(p + s)
                if v is not None and v.numel():
                    ok = bool((v > 0).all() and torch.isfinite(v).all())
                    _require(ok, f"{WEIGHTS}: tensor {p + s!r} must be positive and finite (min {v.min().item():g})")


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
    _require(path.is_file(), f"weights file {path} is missing")
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
                _require(
                    got_shape == shape,
                    f"{WEIGHTS}: tensor {k!r} has shape {got_shape}, expected {shape} "
                    f"from {MANIFEST} (heads={list(cfg.heads)}, ffn={list(cfg.ffn)})",
                )
                expect = tensor_dtype(k, dtype, embeddings)
                _require(
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
    _require(
        not (q == -128).any(), f"{WEIGHTS}: tensor {WORD!r} holds -128; the symmetric int8 scheme uses [-127, 127]"
    )
    _require(
        bool((scale > 0).all()), f"{WEIGHTS}: tensor {WORD_SCALE!r} must be positive and finite (min {scale.min():g})"
    )
    state[WORD] = dequantize_per_channel(q, scale).to(DTYPES.get(dtype, torch.float32))
