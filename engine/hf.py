"""HF <-> ours weight mapping for BERT and RoBERTa, both directions, in one place.

HF keeps separate query/key/value Linears; ours fuses them into `layers.{i}.qkv` with rows ordered
(q | k | v), each block `[h_l * d_h, d]`. HF key names are used with the sliced (ragged) shapes in
ragged checkpoints, so the same mapping serves dense and ragged directories.
"""

from __future__ import annotations

import torch

from engine.config import EncoderConfig
from engine.model import expected_shapes

_EMB = {
    "embeddings.word.weight": "embeddings.word_embeddings.weight",
    "embeddings.position.weight": "embeddings.position_embeddings.weight",
    "embeddings.token_type.weight": "embeddings.token_type_embeddings.weight",
    "embeddings.ln.weight": "embeddings.LayerNorm.weight",
    "embeddings.ln.bias": "embeddings.LayerNorm.bias",
}
_LAYER = {
    "o": "attention.output.dense",
    "ln1": "attention.output.LayerNorm",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
    "ln2": "output.LayerNorm",
}
_QKV = ("query", "key", "value")
# Keys HF checkpoints may carry that the QA model does not use.
_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")
_IGNORED_PREFIXES = ("pooler.", "lm_head.", "cls.")


def _strip_prefix(hf_state: dict[str, torch.Tensor], arch: str) -> tuple[dict[str, torch.Tensor], bool]:
    """Drop the `bert.`/`roberta.` prefix; returns (encoder-relative state, whether a QA head is present)."""
    prefix = arch + "."
    out: dict[str, torch.Tensor] = {}
    for k, v in hf_state.items():
        key = k[len(prefix) :] if k.startswith(prefix) else k
        if key.endswith(_IGNORED_SUFFIXES) or key.startswith(_IGNORED_PREFIXES):
            continue
        out[key] = v
    return out, "qa_outputs.weight" in out


def hf_to_ours(
    hf_state: dict[str, torch.Tensor], cfg: EncoderConfig, init_qa_head_seed: int | None = 0
) -> tuple[dict[str, torch.Tensor], bool]:
    """Map an HF state dict (QA model or bare encoder) to ours; returns (state, qa_head_was_initialised).

    Key and shape parity is checked against `cfg`; a missing QA head is initialised N(0, 0.02) with a fixed seed.
    """
    src, has_head = _strip_prefix(hf_state, cfg.architecture.value)
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in src:
            raise KeyError(f"checkpoint is missing tensor {key!r}")
        used.add(key)
        return src[key]

    ours: dict[str, torch.Tensor] = {k: take(v) for k, v in _EMB.items()}
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}."
        ours[f"layers.{i}.qkv.weight"] = torch.cat([take(p + f"attention.self.{n}.weight") for n in _QKV], 0)
        ours[f"layers.{i}.qkv.bias"] = torch.cat([take(p + f"attention.self.{n}.bias") for n in _QKV], 0)
        for mine, theirs in _LAYER.items():
            ours[f"layers.{i}.{mine}.weight"] = take(p + theirs + ".weight")
            ours[f"layers.{i}.{mine}.bias"] = take(p + theirs + ".bias")
    if has_head:
        ours["qa.weight"], ours["qa.bias"] = take("qa_outputs.weight"), take("qa_outputs.bias")
    else:
        gen = torch.Generator().manual_seed(init_qa_head_seed or 0)
        ours["qa.weight"] = torch.randn(2, cfg.hidden, generator=gen) * 0.02
        ours["qa.bias"] = torch.zeros(2)
    extra = sorted(k for k in src if k not in used and k.startswith(("encoder.layer.", "embeddings.")))
    if extra:
        raise KeyError(
            f"checkpoint has tensors the config does not account for, e.g. {extra[:3]} "
            f"(config has {cfg.num_layers} layers)"
        )
    check_shapes(ours, cfg, source="checkpoint")
    return {k: v.contiguous() for k, v in ours.items()}, not has_head


def ours_to_hf(state: dict[str, torch.Tensor], cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    """Map our state dict to HF `*ForQuestionAnswering` key names (sliced shapes if the model is ragged)."""
    check_shapes(state, cfg, source="model")
    arch = cfg.architecture.value
    hf: dict[str, torch.Tensor] = {f"{arch}.{v}": state[k] for k, v in _EMB.items()}
    for i in range(cfg.num_layers):
        p = f"{arch}.encoder.layer.{i}."
        for n, w, b in zip(
            _QKV, state[f"layers.{i}.qkv.weight"].chunk(3, 0), state[f"layers.{i}.qkv.bias"].chunk(3, 0)
        ):
            hf[p + f"attention.self.{n}.weight"] = w.contiguous()
            hf[p + f"attention.self.{n}.bias"] = b.contiguous()
        for mine, theirs in _LAYER.items():
            hf[p + theirs + ".weight"] = state[f"layers.{i}.{mine}.weight"]
            hf[p + theirs + ".bias"] = state[f"layers.{i}.{mine}.bias"]
    hf["qa_outputs.weight"], hf["qa_outputs.bias"] = state["qa.weight"], state["qa.bias"]
    return hf


def check_shapes(state: dict[str, torch.Tensor], cfg: EncoderConfig, source: str) -> None:
    """Raise ValueError naming the first tensor whose presence or shape disagrees with `cfg`."""
    want = expected_shapes(cfg)
    missing = [k for k in want if k not in state]
    if missing:
        raise ValueError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    unknown = [k for k in state if k not in want]
    if unknown:
        raise ValueError(f"{source}: unexpected tensor {unknown[0]!r}")
    for k, shape in want.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(
                f"{source}: tensor {k!r} has shape {tuple(state[k].shape)}, expected {shape} "
                f"from the config (heads={list(cfg.heads)}, ffn={list(cfg.ffn)})"
            )
