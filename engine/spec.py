"""Pruning specs: `{"layers": [{"heads": [kept head indices], "ffn": [kept unit indices]}, ...]}`.

Indices refer to the source model's current heads/units, must be unique, may come in any order and are
stored sorted. A missing key keeps everything; an empty list keeps nothing. Applying a spec slices Q/K/V
output rows, O input columns and FFN rows/columns, and keeps every bias.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.config import EncoderConfig


class SpecError(ValueError):
    """A pruning spec that does not fit the model."""


@dataclass(frozen=True)
class LayerKeep:
    """Sorted kept head and FFN-unit indices of one layer."""

    heads: tuple[int, ...]
    ffn: tuple[int, ...]


@dataclass(frozen=True)
class PruneSpec:
    """Per-layer kept structure, validated against a model config."""

    layers: tuple[LayerKeep, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"layers": [{"heads": list(lk.heads), "ffn": list(lk.ffn)} for lk in self.layers]}

    def save(self, path: str | Path) -> None:
        """Write the spec as JSON."""
        Path(path).write_text(json.dumps(self.to_dict()) + "\n")


def _indices(value: Any, layer: int, key: str, limit: int, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise SpecError(f"spec layer {layer}: {key!r} must be a list of integers")
    seen: set[int] = set()
    for i in value:
        if not 0 <= i < limit:
            raise SpecError(f"spec layer {layer} keeps {what} {i}, but the model has {limit} {what}s (0-{limit - 1})")
        if i in seen:
            raise SpecError(f"spec layer {layer} lists {what} {i} twice in {key!r}")
        seen.add(i)
    return tuple(sorted(value))


def parse_spec(data: dict[str, Any] | str | Path, cfg: EncoderConfig) -> PruneSpec:
    """Validate a spec (dict or JSON path) against `cfg`, raising SpecError with the layer and index at fault."""
    if not isinstance(data, dict):
        path = Path(data)
        if not path.is_file():
            raise SpecError(f"spec file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SpecError(f"spec file {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or set(data) != {"layers"} or not isinstance(data["layers"], list):
        raise SpecError('spec must be an object with exactly one key, "layers", holding a list')
    if len(data["layers"]) != cfg.num_layers:
        raise SpecError(f"spec has {len(data['layers'])} layers but the model has {cfg.num_layers}")
    layers = []
    for i, entry in enumerate(data["layers"]):
        if not isinstance(entry, dict):
            raise SpecError(f"spec layer {i} must be an object")
        unknown = set(entry) - {"heads", "ffn"}
        if unknown:
            raise SpecError(f"spec layer {i} has unknown key(s) {sorted(unknown)}; allowed: heads, ffn")
        heads = _indices(entry.get("heads", list(range(cfg.heads[i]))), i, "heads", cfg.heads[i], "head")
        ffn = _indices(entry.get("ffn", list(range(cfg.ffn[i]))), i, "ffn", cfg.ffn[i], "FFN unit")
        layers.append(LayerKeep(heads, ffn))
    return PruneSpec(tuple(layers))


def apply_spec(
    state: dict[str, torch.Tensor], cfg: EncoderConfig, spec: PruneSpec
) -> tuple[EncoderConfig, dict[str, torch.Tensor]]:
    """Slice a state dict by `spec`; returns the ragged config and a new state dict (biases all kept)."""
    out = dict(state)
    dh = cfg.head_dim
    for i, keep in enumerate(spec.layers):
        p = f"layers.{i}."
        h = torch.tensor(keep.heads, dtype=torch.long)
        cols = (h[:, None] * dh + torch.arange(dh)[None, :]).reshape(-1)  # kept columns of the concatenated heads
        width = cfg.heads[i] * dh
        rows = torch.cat([cols + j * width for j in range(3)])  # the same heads in each of q, k, v
        f = torch.tensor(keep.ffn, dtype=torch.long)
        out[p + "qkv.weight"] = state[p + "qkv.weight"][rows].contiguous()
        out[p + "qkv.bias"] = state[p + "qkv.bias"][rows].contiguous()
        out[p + "o.weight"] = state[p + "o.weight"][:, cols].contiguous()
        out[p + "ffn_in.weight"] = state[p + "ffn_in.weight"][f].contiguous()
        out[p + "ffn_in.bias"] = state[p + "ffn_in.bias"][f].contiguous()
        out[p + "ffn_out.weight"] = state[p + "ffn_out.weight"][:, f].contiguous()
    new_cfg = cfg.with_shape(tuple(len(k.heads) for k in spec.layers), tuple(len(k.ffn) for k in spec.layers))
    return new_cfg, out


def spec_from_counts(cfg: EncoderConfig, heads: list[int], ffn: list[int]) -> PruneSpec:
    """A spec that keeps the first `heads[l]` heads and `ffn[l]` units of every layer."""
    return PruneSpec(tuple(LayerKeep(tuple(range(h)), tuple(range(f))) for h, f in zip(heads, ffn)))
