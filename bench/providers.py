"""Providers: callables running one padded `[B, S]` forward of a model under test, all on the same weights."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bench.common import ModelUnderTest
from engine.checkpoint import load_checkpoint
from engine.qa import QAEngine
from engine.spec import parse_spec

Forward = Callable[[dict[str, torch.Tensor]], object]


def engine_provider(m: ModelUnderTest, backend: str) -> Forward:
    """SparseQA's QAEngine.forward on backend `backend`."""
    eng = QAEngine.load(m.artifact, backend=backend)
    return lambda x: eng.forward(x["input_ids"], x["attention_mask"], x["token_type_ids"])


def hf_masked_provider(m: ModelUnderTest, attn: str) -> Forward:
    """Stock transformers (`eager` or `sdpa`); ragged models as the masked-HF reference at dense cost."""
    from engine.reference import masked_hf_model

    spec = parse_spec(m.spec, load_checkpoint(m.src).cfg) if m.spec else None
    model = masked_hf_model(m.src, spec, attn)
    return lambda x: model(**x)


def hf_sliced_provider(m: ModelUnderTest) -> Forward:
    """Stock transformers sdpa with pruned layers physically sliced (smaller nn.Linear, as nn_pruning/CoFi do)."""
    from bench.hf_slicing import sliced_hf_model

    spec = parse_spec(m.spec, load_checkpoint(m.src).cfg) if m.spec else None
    model = sliced_hf_model(m.src, spec, "sdpa")
    return lambda x: model(**x)


PROVIDERS: dict[str, Callable[[ModelUnderTest], Forward]] = {
    "engine-torch": lambda m: engine_provider(m, "torch"),
    "engine-cpp": lambda m: engine_provider(m, "cpp"),
    "hf-eager": lambda m: hf_masked_provider(m, "eager"),
    "hf-sdpa": lambda m: hf_masked_provider(m, "sdpa"),
    "hf-sliced-sdpa": hf_sliced_provider,
}


def _merge_peer_providers() -> None:
    from bench.ort_providers import ORT_PROVIDERS

    PROVIDERS.update(ORT_PROVIDERS)


_merge_peer_providers()


def available(name: str) -> str | None:
    """None if provider `name` can run here, else why not."""
    from bench.ort_providers import ORT_PROVIDERS, ort_available

    if name in ORT_PROVIDERS:
        return ort_available(name)
    if name.startswith("engine-"):
        from engine.runtime import available_backends

        backend = name.split("-", 1)[1]
        return None if backend in available_backends("cpu") else f"backend {backend} not available"
    return None
