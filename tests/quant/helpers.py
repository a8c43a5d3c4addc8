"""Shared by the precision tests (tests/quant/, tests/cpp/test_cpp_precision.py): the tiny ragged models in
every artifact precision, a synthetic SQuAD file, packed batches, and the per-scheme error bounds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engine.artifact import load_artifact
from engine.build_model import build
from engine.features import WindowSettings
from engine.model import RaggedQAModel
from engine.packing import cu_seqlens_from_lengths
from engine.quant import QMAX, BF16Linear, Int8LinearDynamic, Int8LinearStatic, int8_kernels_available, int8_model

SMALL = WindowSettings(96, 16, 24)
U_BF16 = 2.0**-9  # unit roundoff of bf16 (8 significant bits, round to nearest) = 2^-8 / 2
NEEDS_INT8 = pytest.mark.skipif(
    not int8_kernels_available(torch.device("cpu")), reason="this torch build has no oneDNN int8 linear"
)

# Layer 0 keeps 2 of 4 heads, layer 1 is empty (0 heads, 0 FFN units), layer 2 keeps 1 FFN unit.
RAGGED = {"layers": [{"heads": [3, 1]}, {"heads": [], "ffn": []}, {"ffn": [0]}]}


def synthetic_squad(n_paragraphs: int = 4) -> dict:
    """A tiny SQuAD 2.0 file in the words of the tiny tokenizers: answerable and unanswerable questions."""
    paragraphs = []
    for i in range(n_paragraphs):
        context = (
            f"the normans conquered england in {1066 + i} after the battle of hastings. "
            f"william was born in paris and died in london. the river of the city is water number {i}."
        )
        start = context.index(str(1066 + i))
        paragraphs.append(
            {
                "context": context,
                "qas": [
                    {
                        "id": f"q{i}a",
                        "question": "when was england conquered by the normans?",
                        "is_impossible": False,
                        "answers": [{"text": str(1066 + i), "answer_start": start}],
                    },
                    {"id": f"q{i}b", "question": "who was the queen of france?", "is_impossible": True, "answers": []},
                ],
            }
        )
    return {"version": "v2.0", "data": [{"title": "Normans", "paragraphs": paragraphs}]}


def precision_artifacts(tiny_bert: Path, tiny_roberta: Path, spec: Path, squad: Path, root: Path) -> dict:
    """(arch, kind) -> artifact dir of both tiny models cut to `spec`, in float32, bfloat16, int8 (dynamic scales)
    and "int8s" (static scales calibrated on `squad`)."""
    out = {}
    for arch, src in (("bert", tiny_bert), ("roberta", tiny_roberta)):
        for kind, dtype, cal in (
            ("float32", "float32", None),
            ("bfloat16", "bfloat16", None),
            ("int8", "int8", None),
            ("int8s", "int8", squad),
        ):
            out[arch, kind] = build(src, root / f"{arch}-{kind}", spec=spec, dtype=dtype, settings=SMALL, calibrate=cal)
    return out


def packed(cfg, lengths: list[int], seed: int = 0):
    """Random ids (type 0) of sequences of `lengths`, packed: (ids, types, cu_seqlens, max_seqlen)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (sum(lengths),), generator=g)
    types = torch.zeros_like(ids)
    return ids, types, cu_seqlens_from_lengths(lengths), max(lengths)


def fp32_model(path) -> RaggedQAModel:
    """The artifact at `path` as an fp32 reference model, in eval mode."""
    art = load_artifact(path)
    model = RaggedQAModel(art.cfg).eval()
    model.load_state_dict({k: v.float() for k, v in art.state.items()})
    return model


def capture_inputs(model: torch.nn.Module, run) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """name -> (module, its input) for every quantized / bf16 Linear the forward `run()` calls."""
    seen: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {}

    def hook(name: str, mod: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:  # None: inputs unchanged
        seen.setdefault(name, (mod, args[0].detach().clone()))

    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=n: hook(n, mod, args))
        for n, m in model.named_modules()
        if isinstance(m, (Int8LinearDynamic, Int8LinearStatic, BF16Linear))
    ]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def int8_linear_inputs(int8_path, fp32_path):
    """(int8 artifact, fp32 reference model, int8 model, {linear name: (module, input)}) from one forward of the int8
    model on a ragged packed batch."""
    art = load_artifact(int8_path)
    ref = fp32_model(fp32_path)
    model = int8_model(art.cfg, art.state, art.quantization)
    ids, types, cu, ms = packed(art.cfg, [37, 5, 60, 1, 23])
    with torch.no_grad():
        seen = capture_inputs(model, lambda: model(ids, types, cu, ms))
    return art, ref, model, seen


def layer_errors(ref: RaggedQAModel, model: RaggedQAModel, cfg) -> tuple[list[float], float]:
    """Teacher-forced relative error of each layer's output (same fp32 input to both), and of the logits."""
    ids, types, cu, ms = packed(cfg, [37, 5, 60, 1, 23], seed=3)
    errs = []
    with torch.no_grad():
        h = ref.embeddings(ids, types, cu)
        for l in range(cfg.num_layers):
            want, got = ref.layers[l](h, cu, ms), model.layers[l](h, cu, ms)
            errs.append(((got - want).norm() / want.norm()).item())
            h = want
        s0, e0 = ref(ids, types, cu, ms)
        s1, e1 = model(ids, types, cu, ms)
    want, got = torch.cat([s0, e0]), torch.cat([s1, e1])
    return errs, ((got - want).norm() / want.norm()).item()


def int8_layer_bound(cfg, layer: int) -> float:
    """Worst-case first-order relative error of one layer under per-token / per-channel int8.

    Each element of an operand row is off by at most half its step, max|row| / 254, so a row of k elements is off by
    at most sqrt(k) max|row| / 254 <= sqrt(k) ||row|| / 254 in norm. A GEMM has two operands (activation row, weight
    row): relative <= 2 sqrt(k) / 254 = sqrt(k) / 127. A layer sums its GEMMs (unit gains, as for bf16).
    """
    w, f, d = cfg.heads[layer] * cfg.head_dim, cfg.ffn[layer], cfg.hidden
    gemms = ([d, w] if w else []) + ([d, f] if f else [])  # inner dimension of qkv, o, ffn_in, ffn_out
    return sum(math.sqrt(k) / QMAX for k in gemms)
