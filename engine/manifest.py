"""The engine artifact's manifest, `engine.json`: its format constants and the schema every field is checked against.

`read_manifest` validates the JSON structure (not the weights: engine.artifact checks those against it); each error
names the field, what it holds and what was expected. See docs/ARTIFACT.md.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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


def require(cond: bool, msg: str) -> None:
    """Raise ArtifactError(msg) unless `cond`."""
    if not cond:
        raise ArtifactError(msg)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Parse and structurally validate `engine.json` (not the weights)."""
    root = Path(path)
    require(root.is_dir(), f"artifact directory {root} does not exist")
    mpath = root / MANIFEST
    require(
        mpath.is_file(), f"{mpath} is missing: not an engine artifact (build one with python -m engine.build_model)"
    )
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e})") from None
    require(isinstance(m, dict), f"{mpath} must hold a JSON object")
    require(m.get("format") == FORMAT, f"{MANIFEST}: field 'format' must be {FORMAT!r}, got {m.get('format')!r}")
    ver = m.get("format_version")
    require(_is_int(ver), f"{MANIFEST}: field 'format_version' must be an integer")
    require(
        ver <= FORMAT_VERSION,
        f"{MANIFEST}: format_version {ver} was written by a newer SparseQA "
        f"(this one reads up to {FORMAT_VERSION}); upgrade SparseQA",
    )
    versions = (FLOAT_FORMAT_VERSION, INT8_FORMAT_VERSION, EMB_FORMAT_VERSION)
    require(ver in versions, f"{MANIFEST}: format_version {ver} is not supported")
    # Version 1 holds float artifacts, version 2 int8 ones; version 3 adds an `embeddings` block to either.
    dtype = m.get("dtype")
    if ver == FLOAT_FORMAT_VERSION:
        require(
            dtype != INT8,
            f"{MANIFEST}: dtype 'int8' needs format_version {INT8_FORMAT_VERSION} and a "
            f"'quantization' block, got format_version {ver}",
        )
    elif ver == INT8_FORMAT_VERSION and "dtype" in m:
        require(
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
    require(not missing, f"{MANIFEST}: missing field(s) {sorted(missing)}")
    require(not unknown, f"{MANIFEST}: unknown field(s) {sorted(unknown)}")
    require(
        isinstance(dtype, str) and dtype in ARTIFACT_DTYPES,
        f"{MANIFEST}: field 'dtype' is {dtype!r}, expected one of {sorted(ARTIFACT_DTYPES)}",
    )
    if "quantization" in m:
        parse_quantization(m["quantization"])
    if ver == EMB_FORMAT_VERSION:
        parse_embeddings(m["embeddings"])
    require(m["weights"] == WEIGHTS, f"{MANIFEST}: field 'weights' must be {WEIGHTS!r}")
    t = m["tokenizer"]
    require(
        isinstance(t, dict) and set(t) == _TOK_KEYS, f"{MANIFEST}: field 'tokenizer' must have keys {sorted(_TOK_KEYS)}"
    )
    for k in ("max_seq_length", "doc_stride", "max_query_length"):
        require(_is_int(t[k]), f"{MANIFEST}: tokenizer.{k} must be an integer, got {t[k]!r}")
    require(
        isinstance(t["files"], list) and "tokenizer.json" in t["files"],
        f"{MANIFEST}: tokenizer.files must list the tokenizer files, including tokenizer.json",
    )
    nt = m["null_threshold"]
    require(
        isinstance(nt, (int, float)) and not isinstance(nt, bool) and math.isfinite(nt),
        f"{MANIFEST}: null_threshold must be a finite number, got {nt!r}",
    )
    require(isinstance(m["source"], dict), f"{MANIFEST}: field 'source' must be an object")
    return m


def parse_embeddings(e: Any) -> str:
    """Validate a version-3 manifest's `embeddings` block; returns how the word embeddings are stored ("int8")."""
    where = f"{MANIFEST}: field 'embeddings'"
    require(isinstance(e, dict), f"{where} must be an object")
    missing, unknown = {"word"} - set(e), set(e) - {"word"}
    require(not missing, f"{where}: missing field(s) {sorted(missing)}")
    require(not unknown, f"{where}: unknown field(s) {sorted(unknown)}")
    require(e["word"] == EMB_SCHEME, f"{where}: word is {e['word']!r}, this SparseQA reads only {EMB_SCHEME!r}")
    return INT8


def parse_quantization(q: Any) -> Quantization:
    """Validate an int8 manifest's `quantization` block."""
    where = f"{MANIFEST}: field 'quantization'"
    require(isinstance(q, dict), f"{where} must be an object")
    missing, unknown = _QUANT_KEYS - set(q), set(q) - _QUANT_KEYS
    require(not missing, f"{where}: missing key(s) {sorted(missing)}")
    require(not unknown, f"{where}: unknown key(s) {sorted(unknown)}")
    require(
        q["weights"] == WEIGHT_SCHEME,
        f"{where}: weights is {q['weights']!r}, this SparseQA reads only {WEIGHT_SCHEME!r}",
    )
    modes = [a.value for a in ActivationQuant]
    require(q["activations"] in modes, f"{where}: activations is {q['activations']!r}, expected one of {modes}")
    act = ActivationQuant(q["activations"])
    require(
        q["linears"] == list(QUANTIZED_LINEARS),
        f"{where}: linears must be {list(QUANTIZED_LINEARS)}, got {q['linears']!r}",
    )
    require(q["float_dtype"] == "float32", f"{where}: float_dtype must be 'float32', got {q['float_dtype']!r}")
    kernels = q["kernels"]
    require(
        isinstance(kernels, list) and all(isinstance(k, str) for k in kernels),
        f"{where}: kernels must be a list of kernel names",
    )
    unknown_k = sorted(set(kernels) - KNOWN_KERNELS)
    require(
        not unknown_k,
        f"{where}: requires kernel(s) {unknown_k} that this SparseQA does not know "
        f"(known: {sorted(KNOWN_KERNELS)}); upgrade SparseQA",
    )
    require(
        tuple(kernels) == KERNELS[act],
        f"{where}: activations {act.value!r} need kernels {list(KERNELS[act])}, but the manifest lists {kernels}",
    )
    cal = q["calibration"]
    if act is ActivationQuant.STATIC:
        require(isinstance(cal, dict), f"{where}: static activation scales need a 'calibration' object")
    else:
        require(cal is None, f"{where}: calibration must be null for {act.value!r} activations")
    return Quantization(act, cal)
