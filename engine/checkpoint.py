"""Checkpoint directories: dense HF QA/encoder checkpoints and SparseQA's ragged checkpoint format.

Ragged checkpoint = an HF-style directory whose `config.json` carries a `sparseqa_ragged` block
(`{"format_version": 1, "heads": [...], "ffn": [...]}`), whose `model.safetensors` uses HF key names with
the sliced shapes, plus the tokenizer files. A dense HF directory has no such block. Both may carry a
tuned SQuAD 2.0 null threshold as `sparseqa_null_threshold` in `config.json`. Weights load from
safetensors only: pickled `.bin` files are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.config import EncoderConfig
from engine.hf import hf_to_ours, ours_to_hf

RAGGED_KEY = "sparseqa_ragged"
THRESHOLD_KEY = "sparseqa_null_threshold"
RAGGED_FORMAT_VERSION = 1
_HF_CLASSES = {"bert": "BertForQuestionAnswering", "roberta": "RobertaForQuestionAnswering"}


@dataclass
class Checkpoint:
    """A loaded source model: our config and state dict, plus where its tokenizer lives."""

    cfg: EncoderConfig
    state: dict[str, torch.Tensor]
    path: Path
    hf_config: dict[str, Any]
    is_ragged: bool
    qa_head_initialised: bool
    null_threshold: float | None


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Parse a JSON object file, raising ValueError that names the file on any problem."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path} must hold a JSON object")
    return data


def load_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning low-level errors into one that names the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{what}: {path} is not a readable safetensors file ({e})") from None


def is_hf_dense(cfg: EncoderConfig, hf_config: dict[str, Any]) -> bool:
    """True when `cfg` keeps every head and one FFN width, so stock HF can load it."""
    full_heads = int(hf_config["num_attention_heads"])
    return all(h == full_heads for h in cfg.heads) and len(set(cfg.ffn)) == 1


def ragged_shape(hf_config: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The per-layer (heads, ffn) of a ragged checkpoint's config, or None for a dense HF config."""
    block = hf_config.get(RAGGED_KEY)
    if block is None:
        return None
    if not isinstance(block, dict) or set(block) != {"format_version", "heads", "ffn"}:
        raise ValueError(f"config.json: {RAGGED_KEY!r} must be an object with keys format_version, heads, ffn")
    if block["format_version"] != RAGGED_FORMAT_VERSION:
        raise ValueError(
            f"config.json: ragged format_version {block['format_version']} is not supported "
            f"(this SparseQA reads {RAGGED_FORMAT_VERSION})"
        )
    heads, ffn = block["heads"], block["ffn"]
    n = int(hf_config["num_hidden_layers"])
    if len(heads) != n or len(ffn) != n:
        raise ValueError(
            f"config.json: {RAGGED_KEY} lists {len(heads)} head counts and {len(ffn)} FFN widths "
            f"but num_hidden_layers is {n}"
        )
    return tuple(heads), tuple(ffn)


def _read_config(root: Path) -> tuple[dict[str, Any], tuple[tuple[int, ...], tuple[int, ...]] | None, EncoderConfig]:
    """config.json of a checkpoint dir: the HF config, its ragged shape (None when dense) and our config."""
    if not root.is_dir():
        raise FileNotFoundError(f"model directory {root} does not exist")
    hf_config = read_json(root / "config.json", "model config")
    shape = ragged_shape(hf_config)
    return hf_config, shape, EncoderConfig.from_hf(hf_config, *(shape or (None, None)))


def load_config(path: str | Path) -> EncoderConfig:
    """The config of a checkpoint dir, without reading its weights."""
    return _read_config(Path(path))[2]


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a dense HF checkpoint dir (QA model or bare encoder) or a ragged checkpoint dir."""
    root = Path(path)
    hf_config, shape, cfg = _read_config(root)
    weights = root / "model.safetensors"
    if not weights.is_file():
        pickled = [p.name for p in root.glob("*.bin")]
        hint = f" (found {pickled}: SparseQA never unpickles weights; re-save with safetensors)" if pickled else ""
        raise FileNotFoundError(f"{weights} does not exist{hint}")
    state, initialised = hf_to_ours(load_safetensors(weights, "model weights"), cfg)
    threshold = hf_config.get(THRESHOLD_KEY)
    return Checkpoint(
        cfg, state, root, hf_config, shape is not None, initialised, float(threshold) if threshold is not None else None
    )


def save_checkpoint(
    out: str | Path,
    cfg: EncoderConfig,
    state: dict[str, torch.Tensor],
    base_hf_config: dict[str, Any],
    tokenizer: Any = None,
    null_threshold: float | None = None,
) -> Path:
    """Write a dense HF checkpoint when `cfg` is dense, else a ragged checkpoint; returns the directory."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    hf_config = {k: v for k, v in base_hf_config.items() if k not in (RAGGED_KEY, THRESHOLD_KEY)}
    arch = cfg.architecture.value
    hf_config.update(model_type=arch, architectures=[_HF_CLASSES[arch]], num_hidden_layers=cfg.num_layers)
    if not is_hf_dense(cfg, hf_config):
        hf_config[RAGGED_KEY] = {
            "format_version": RAGGED_FORMAT_VERSION,
            "heads": list(cfg.heads),
            "ffn": list(cfg.ffn),
        }
    else:
        hf_config["intermediate_size"] = cfg.ffn[0]
    if null_threshold is not None:
        hf_config[THRESHOLD_KEY] = float(null_threshold)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in ours_to_hf(state, cfg).items()}
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(root))
    return root
