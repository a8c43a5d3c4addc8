"""Engine artifacts: `engine.json` (manifest) + `weights.safetensors` + tokenizer files. See docs/ARTIFACT.md.

Loading validates every field, file and tensor against the manifest; each error names what is wrong
and what was expected. The artifact is backend-neutral: backends pad or re-lay weights when they load.
"""

from __future__ import annotations

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
FORMAT_VERSION = 1
MANIFEST = "engine.json"
WEIGHTS = "weights.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_TOP_KEYS = {"format", "format_version", "config", "dtype", "weights", "tokenizer", "null_threshold", "source"}
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


@dataclass
class Artifact:
    """A validated artifact in memory."""

    path: Path
    cfg: EncoderConfig
    dtype: str
    tokenizer: TokenizerSpec
    null_threshold: float
    source: dict[str, Any]
    state: dict[str, torch.Tensor] = field(repr=False)


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


def save_artifact(out: Path, cfg: EncoderConfig, state: dict[str, torch.Tensor], tokenizer_dir: Path,
                  settings: WindowSettings, dtype: str = "float32", null_threshold: float = 0.0,
                  source: dict[str, Any] | None = None) -> Path:
    """Write an artifact directory from our state dict and a directory holding the source tokenizer."""
    if dtype not in DTYPES:
        raise ArtifactError(f"dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    settings.validate(cfg.architecture, cfg.max_position_embeddings)
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if not getattr(tok, "is_fast", False):
        raise ArtifactError(f"{tokenizer_dir}: a fast (tokenizers) tokenizer is required")
    files = sorted(Path(f).name for f in tok.save_pretrained(str(out)))
    lower, strip = normalizer_flags(json.loads((out / "tokenizer.json").read_text(encoding="utf-8")))
    tensors = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in state.items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": FORMAT})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "dtype": dtype,
        "weights": WEIGHTS,
        "tokenizer": {"max_seq_length": settings.max_seq_length, "doc_stride": settings.doc_stride,
                      "max_query_length": settings.max_query_length, "do_lower_case": lower, "strip_accents": strip,
                      "files": files},
        "null_threshold": float(null_threshold),
        "source": source or {},
    }
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
    _require(mpath.is_file(), f"{mpath} is missing: not an engine artifact (build one with python -m engine.build_model)")
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e})") from None
    _require(isinstance(m, dict), f"{mpath} must hold a JSON object")
    _require(m.get("format") == FORMAT, f"{MANIFEST}: field 'format' must be {FORMAT!r}, got {m.get('format')!r}")
    ver = m.get("format_version")
    _require(_is_int(ver), f"{MANIFEST}: field 'format_version' must be an integer")
    _require(ver <= FORMAT_VERSION, f"{MANIFEST}: format_version {ver} was written by a newer SparseQA "
                                    f"(this one reads up to {FORMAT_VERSION}); upgrade SparseQA")
    _require(ver == FORMAT_VERSION, f"{MANIFEST}: format_version {ver} is not supported")
    missing, unknown = _TOP_KEYS - set(m), set(m) - _TOP_KEYS
    _require(not missing, f"{MANIFEST}: missing field(s) {sorted(missing)}")
    _require(not unknown, f"{MANIFEST}: unknown field(s) {sorted(unknown)}")
    _require(isinstance(m["dtype"], str) and m["dtype"] in DTYPES, f"{MANIFEST}: field 'dtype' is {m['dtype']!r}, expected one of {sorted(DTYPES)}")
    _require(m["weights"] == WEIGHTS, f"{MANIFEST}: field 'weights' must be {WEIGHTS!r}")
    t = m["tokenizer"]
    _require(isinstance(t, dict) and set(t) == _TOK_KEYS, f"{MANIFEST}: field 'tokenizer' must have keys {sorted(_TOK_KEYS)}")
    for k in ("max_seq_length", "doc_stride", "max_query_length"):
        _require(_is_int(t[k]), f"{MANIFEST}: tokenizer.{k} must be an integer, got {t[k]!r}")
    _require(isinstance(t["files"], list) and "tokenizer.json" in t["files"],
             f"{MANIFEST}: tokenizer.files must list the tokenizer files, including tokenizer.json")
    nt = m["null_threshold"]
    _require(isinstance(nt, (int, float)) and not isinstance(nt, bool) and math.isfinite(nt),
             f"{MANIFEST}: null_threshold must be a finite number, got {nt!r}")
    _require(isinstance(m["source"], dict), f"{MANIFEST}: field 'source' must be an object")
    return m


def load_artifact(path: str | Path) -> Artifact:
    """Load and fully validate an artifact: manifest, tokenizer files, tensor names, shapes and dtypes."""
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
    state = _load_weights(root / WEIGHTS, cfg, m["dtype"])
    tok = TokenizerSpec(settings, bool(t["do_lower_case"]), bool(t["strip_accents"]), list(t["files"]))
    return Artifact(root, cfg, m["dtype"], tok, float(m["null_threshold"]), m["source"], state)


def _load_weights(path: Path, cfg: EncoderConfig, dtype: str) -> dict[str, torch.Tensor]:
    _require(path.is_file(), f"weights file {path} is missing")
    want = expected_shapes(cfg)
    try:
        with safe_open(str(path), "pt") as f:
            names = set(f.keys())
            missing = [k for k in want if k not in names]
            if missing:
                raise ArtifactError(f"{WEIGHTS}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
            extra = sorted(names - set(want))
            if extra:
                raise ArtifactError(f"{WEIGHTS}: unexpected tensor {extra[0]!r} (not in the manifest's config)")
            state = {}
            for k, shape in want.items():
                sl = f.get_slice(k)
                got_shape, got_dtype = tuple(sl.get_shape()), sl.get_dtype()
                _require(got_shape == shape, f"{WEIGHTS}: tensor {k!r} has shape {got_shape}, expected {shape} "
                                             f"from {MANIFEST} (heads={list(cfg.heads)}, ffn={list(cfg.ffn)})")
                _require(got_dtype == _SAFETENSORS_DTYPES[dtype],
                         f"{WEIGHTS}: tensor {k!r} has dtype {got_dtype}, expected {_SAFETENSORS_DTYPES[dtype]} "
                         f"(manifest dtype {dtype})")
                state[k] = f.get_tensor(k)
    except ArtifactError:
        raise
    except Exception as e:  # safetensors raises several types on truncated or corrupt files
        raise ArtifactError(f"{path} is not a readable safetensors file ({e})") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ArtifactError(f"{WEIGHTS}: tensor {bad[0]!r} contains NaN or inf")
    return state
