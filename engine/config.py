"""The ragged encoder's configuration: one frozen dataclass, per-layer head counts and FFN widths."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any


class Architecture(str, enum.Enum):
    """Which embedding and tokenizer conventions the encoder follows."""

    BERT = "bert"
    ROBERTA = "roberta"


class Activation(str, enum.Enum):
    """FFN activation; names follow HF's `hidden_act`."""

    GELU = "gelu"  # erf form
    GELU_TANH = "gelu_new"  # tanh approximation
    RELU = "relu"


_HF_ACT_ALIASES = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "relu": "relu"}


@dataclass(frozen=True)
class EncoderConfig:
    """A BERT/RoBERTa encoder whose layer l keeps `heads[l]` heads and `ffn[l]` FFN units (0 allowed)."""

    architecture: Architecture
    vocab_size: int
    hidden: int
    head_dim: int
    heads: tuple[int, ...]
    ffn: tuple[int, ...]
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    activation: Activation
    pad_token_id: int
    # RoBERTa numbers positions from pad_token_id + 1; BERT from 0.
    position_offset: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "architecture", Architecture(self.architecture))
        object.__setattr__(self, "activation", Activation(self.activation))
        object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
        object.__setattr__(self, "ffn", tuple(int(f) for f in self.ffn))
        if len(self.heads) != len(self.ffn):
            raise ValueError(f"config has {len(self.heads)} per-layer head counts but {len(self.ffn)} FFN widths")
        if not self.heads:
            raise ValueError("config has no layers")
        for name in ("vocab_size", "hidden", "head_dim", "max_position_embeddings", "type_vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"config field {name!r} must be >= 1, got {getattr(self, name)}")
        for i, (h, f) in enumerate(zip(self.heads, self.ffn)):
            if h < 0 or f < 0:
                raise ValueError(f"layer {i}: head count and FFN width must be >= 0, got heads={h} ffn={f}")

    @property
    def num_layers(self) -> int:
        """Number of transformer layers."""
        return len(self.heads)

    def attn_width(self, layer: int) -> int:
        """Width of layer `layer`'s concatenated heads (h_l * d_h)."""
        return self.heads[layer] * self.head_dim

    @property
    def is_dense_uniform(self) -> bool:
        """True when every layer keeps the same head count and FFN width (HF can represent it)."""
        return len(set(self.heads)) == 1 and len(set(self.ffn)) == 1

    def with_shape(self, heads: tuple[int, ...], ffn: tuple[int, ...]) -> EncoderConfig:
        """A copy with new per-layer head counts and FFN widths."""
        return dataclasses.replace(self, heads=tuple(heads), ffn=tuple(ffn))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (enums as strings, tuples as lists)."""
        d = dataclasses.asdict(self)
        d["architecture"] = self.architecture.value
        d["activation"] = self.activation.value
        d["heads"] = list(self.heads)
        d["ffn"] = list(self.ffn)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        """Inverse of `to_dict`; unknown or missing fields raise ValueError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        unknown = set(d) - names
        missing = required - set(d)
        if unknown:
            raise ValueError(f"unknown config field(s) {sorted(unknown)}; expected {sorted(names)}")
        if missing:
            raise ValueError(f"missing config field(s) {sorted(missing)}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid config: {e}") from None

    @classmethod
    def from_hf(
        cls, hf: dict[str, Any], heads: tuple[int, ...] | None = None, ffn: tuple[int, ...] | None = None
    ) -> EncoderConfig:
        """Build from an HF `config.json` dict; `heads`/`ffn` override the uniform per-layer shape."""
        model_type = hf.get("model_type")
        if model_type not in ("bert", "roberta"):
            raise ValueError(f"unknown architecture {model_type!r} in config.json: SparseQA supports bert and roberta")
        n_layers = int(hf["num_hidden_layers"])
        n_heads = int(hf["num_attention_heads"])
        if hf["hidden_size"] % n_heads:
            raise ValueError(f"hidden_size {hf['hidden_size']} is not divisible by num_attention_heads {n_heads}")
        act = hf.get("hidden_act", "gelu")
        if act not in _HF_ACT_ALIASES:
            raise ValueError(f"unsupported hidden_act {act!r}; supported: {sorted(_HF_ACT_ALIASES)}")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        arch = Architecture(model_type)
        pad = int(hf.get("pad_token_id", 1 if arch is Architecture.ROBERTA else 0) or 0)
        return cls(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden=int(hf["hidden_size"]),
            head_dim=int(hf["hidden_size"]) // n_heads,
            heads=tuple(heads) if heads is not None else (n_heads,) * n_layers,
            ffn=tuple(ffn) if ffn is not None else (int(hf["intermediate_size"]),) * n_layers,
            max_position_embeddings=int(hf["max_position_embeddings"]),
            type_vocab_size=int(hf.get("type_vocab_size", 2)),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            activation=Activation(_HF_ACT_ALIASES[act]),
            pad_token_id=pad,
            position_offset=pad + 1 if arch is Architecture.ROBERTA else 0,
        )
