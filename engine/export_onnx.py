"""`python -m engine.export_onnx ARTIFACT OUT.onnx`: an engine artifact as a padded ONNX model for ONNX Runtime.

The graph takes padded `input_ids`, `attention_mask`, `token_type_ids` (int64 `[batch, seq]`, both axes dynamic,
right-padded masks) and returns `start_logits`, `end_logits` (fp32 `[batch, seq]`, -inf at padding, as
`QAEngine.forward`). It is traced from `PaddedQAModel`, a small export-only module that computes what the ragged
engine computes but in HF's padded, mask-based layout, because that layout is what ORT's BERT fusion recognises:
- separate Q, K, V projections and a reshape to each layer's *explicit* head count (never -1), so the fusion
  reads every layer's own head count from its graph (`optimize_model(..., num_heads=0, hidden_size=0)`);
- HF's extended additive mask `(1 - mask[:, None, None, :]) * finfo.min`, the pattern the fusion turns into a
  mask index;
- a position-id buffer sliced to `seq`, the BERT embedding pattern. RoBERTa's position offset is folded into the
  table (rows from `position_offset` on), so both architectures export the same embedding pattern;
- a layer with 0 heads is `LayerNorm(x + b_O)`, one with 0 FFN units `LayerNorm(h + b_out)`: bias and
  LayerNorm stay (docs/DESIGN.md), only the GEMMs and attention go.
The legacy TorchScript exporter is used (`dynamo=False`, opset 17): torch 2.13's dynamo exporter wrote invalid
models at opset 17, and at opset 18 ORT's optimizer did not fuse attention.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.artifact import Artifact, load_artifact
from engine.config import Activation, EncoderConfig
from engine.manifest import ArtifactError

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUTS = ("start_logits", "end_logits")
FUSED_OPS = (
    "EmbedLayerNormalization",
    "Attention",
    "SkipLayerNormalization",
    "LayerNormalization",
    "BiasGelu",
    "Gelu",
    "FastGelu",
)


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """An fp32 nn.Linear holding `weight` `[out, in]` and `bias` `[out]`."""
    lin = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        lin.weight.copy_(weight.float())
        lin.bias.copy_(bias.float())
    return lin


def _layer_norm(state: dict[str, torch.Tensor], prefix: str, eps: float) -> nn.LayerNorm:
    ln = nn.LayerNorm(state[prefix + ".weight"].shape[0], eps=eps)
    with torch.no_grad():
        ln.weight.copy_(state[prefix + ".weight"].float())
        ln.bias.copy_(state[prefix + ".bias"].float())
    return ln


class _PaddedLayer(nn.Module):
    """One post-LN layer over `[B, S, d]` with its own head count and FFN width (either may be 0)."""

    def __init__(self, cfg: EncoderConfig, state: dict[str, torch.Tensor], index: int):
        super().__init__()
        p, eps = f"layers.{index}.", cfg.layer_norm_eps
        self.heads, self.head_dim, self.ffn_width = cfg.heads[index], cfg.head_dim, cfg.ffn[index]
        self.scale = math.sqrt(self.head_dim)
        w = self.heads * self.head_dim
        qkv_w, qkv_b = state[p + "qkv.weight"], state[p + "qkv.bias"]  # rows (q|k|v, head, dh)
        if self.heads:
            # Three projections, not one fused [3w, d] GEMM: ORT's attention fusion matches three MatMuls.
            self.q = _linear(qkv_w[:w], qkv_b[:w])
            self.k = _linear(qkv_w[w : 2 * w], qkv_b[w : 2 * w])
            self.v = _linear(qkv_w[2 * w :], qkv_b[2 * w :])
            self.o = _linear(state[p + "o.weight"], state[p + "o.bias"])
        else:
            self.register_buffer("o_bias", state[p + "o.bias"].float().clone())
        if self.ffn_width:
            self.ffn_in = _linear(state[p + "ffn_in.weight"], state[p + "ffn_in.bias"])
            self.ffn_out = _linear(state[p + "ffn_out.weight"], state[p + "ffn_out.bias"])
        else:
            self.register_buffer("ffn_out_bias", state[p + "ffn_out.bias"].float().clone())
        self.ln1 = _layer_norm(state, p + "ln1", eps)
        self.ln2 = _layer_norm(state, p + "ln2", eps)
        self.activation = cfg.activation

    def _split(self, t: torch.Tensor, batch: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        # (B, S, h*dh) -> (B, h, S, dh), reshaped with this layer's explicit head count.
        return t.view(batch, seq, self.heads, self.head_dim).transpose(1, 2)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation is Activation.GELU:
            return F.gelu(x)
        if self.activation is Activation.GELU_TANH:
            return F.gelu(x, approximate="tanh")
        return F.relu(x)

    def forward(self, x: torch.Tensor, ext_mask: torch.Tensor) -> torch.Tensor:
        """`x` `[B, S, d]`, `ext_mask` `[B, 1, 1, S]` additive -> `[B, S, d]`."""
        if self.heads:
            batch, seq = x.shape[0], x.shape[1]
            q = self._split(self.q(x), batch, seq)  # (B, h, S, dh)
            k = self._split(self.k(x), batch, seq)
            v = self._split(self.v(x), batch, seq)
            scores = torch.matmul(q, k.transpose(-1, -2)) / self.scale + ext_mask  # (B, h, S, S)
            ctx = torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, h, S, dh)
            ctx = ctx.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim)  # (B, S, h*dh)
            x = self.ln1(self.o(ctx) + x)
        else:
            x = self.ln1(x + self.o_bias)
        if self.ffn_width:
            x = self.ln2(self.ffn_out(self._act(self.ffn_in(x))) + x)
        else:
            x = self.ln2(x + self.ffn_out_bias)
        return x


class PaddedQAModel(nn.Module):
    """The artifact's ragged encoder + QA head over padded `[B, S]` inputs (export-only; fp32)."""

    def __init__(self, cfg: EncoderConfig, state: dict[str, torch.Tensor]):
        super().__init__()
        self.cfg = cfg
        eps = cfg.layer_norm_eps
        self.word = nn.Embedding.from_pretrained(state["embeddings.word.weight"].float(), freeze=True)
        # Rows from position_offset on: position i of every sequence reads row i (RoBERTa's offset folded in).
        table = state["embeddings.position.weight"][cfg.position_offset :].float()
        self.position = nn.Embedding.from_pretrained(table.clone(), freeze=True)
        self.register_buffer("position_ids", torch.arange(table.shape[0])[None, :], persistent=False)  # (1, P)
        self.token_type = nn.Embedding.from_pretrained(state["embeddings.token_type.weight"].float(), freeze=True)
        self.emb_ln = _layer_norm(state, "embeddings.ln", eps)
        with warnings.catch_warnings():  # 0-width sublayers hold zero-element weights
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self.layers = nn.ModuleList(_PaddedLayer(cfg, state, i) for i in range(cfg.num_layers))
        self.qa = _linear(state["qa.weight"], state["qa.bias"])
        self.eval()

    @classmethod
    def from_artifact(cls, artifact: Artifact) -> PaddedQAModel:
        """Build from a loaded artifact (any storage dtype; computes in fp32)."""
        return cls(artifact.cfg, artifact.state)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded `[B, S]` ids, 0/1 mask, token types -> start and end logits `[B, S]`, -inf at padding."""
        seq = input_ids.shape[1]
        pos = self.position_ids[:, :seq]  # (1, S)
        x = self.emb_ln(self.word(input_ids) + self.token_type(token_type_ids) + self.position(pos))  # (B, S, d)
        # HF's extended mask: 0 for tokens, the most negative float for padding keys.
        ext = (1.0 - attention_mask.unsqueeze(1).unsqueeze(2).to(torch.float32)) * torch.finfo(torch.float32).min
        for layer in self.layers:
            x = layer(x, ext)
        logits = self.qa(x)  # (B, S, 2)
        keep = attention_mask.to(torch.bool)
        neg_inf = torch.tensor(float("-inf"))
        return torch.where(keep, logits[..., 0], neg_inf), torch.where(keep, logits[..., 1], neg_inf)


def _dummy_inputs(cfg: EncoderConfig, batch: int = 2, seq: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2 :] = 0
    return ids, mask, torch.zeros_like(ids)


def export(artifact: str | Path | Artifact, out: str | Path, opset: int = 17) -> Path:
    """Write the artifact's model to `out` as ONNX (legacy exporter, dynamic batch and seq axes)."""
    art = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = PaddedQAModel.from_artifact(art)
    axes = {name: {0: "batch", 1: "seq"} for name in INPUTS + OUTPUTS}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about shape-derived Python ints and deprecation notices
        torch.onnx.export(
            model,
            _dummy_inputs(art.cfg),
            str(out),
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    return out


def fused_path(onnx_path: str | Path) -> Path:
    """`OUT.onnx` -> `OUT.fused.onnx`."""
    p = Path(onnx_path)
    return p.with_name(p.stem + ".fused" + p.suffix)


def op_counts(onnx_path: str | Path) -> dict[str, int]:
    """Node count per op type of an ONNX file."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


class _PrunedWidthFilter:
    """Drops ORT's spurious hidden-size warning for attention with fewer heads than d / d_h."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("Input hidden size")


def optimize(onnx_path: str | Path, out: str | Path | None = None) -> tuple[Path, dict[str, int]]:
    """Run ORT's BERT fusion (per-layer head counts detected from the graph); returns the path and fused op counts."""
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    out = Path(out) if out is not None else fused_path(onnx_path)
    # ORT's fusion modules log under their bare names. Its "Input hidden size (w) is not same as weight matrix
    # dimension" warning fires for every pruned layer (it compares h_l*d_h with d) but the node it builds is right.
    attn_log = logging.getLogger("fusion_attention")
    if not any(isinstance(f, _PrunedWidthFilter) for f in attn_log.filters):
        attn_log.addFilter(_PrunedWidthFilter())
    opt = optimize_model(str(onnx_path), model_type="bert", num_heads=0, hidden_size=0)
    opt.save_model_to_file(str(out))
    counts = op_counts(out)
    return out, {op: counts.get(op, 0) for op in FUSED_OPS}


def ort_session(onnx_path: str | Path, threads: int | None = None):
    """An ORT CPU session: sequential execution, all graph optimizations, `threads` intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads is not None:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


def check(
    artifact: str | Path | Artifact, onnx_paths: list[Path], seed: int = 0, batch: int = 3, seq: int = 48
) -> dict[Path, float]:
    """Max |logit difference| of each ONNX file (run in ORT) against QAEngine's torch backend, on padded input."""
    from engine.qa import QAEngine
    from engine.runtime import create_backend

    art = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
    cfg = art.cfg
    seq = min(seq, cfg.max_position_embeddings - cfg.position_offset)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    lengths = torch.tensor([seq] + [max(1, seq * (batch - i) // (batch + 1)) for i in range(1, batch)])
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    types = torch.zeros_like(ids)
    if cfg.type_vocab_size > 1:
        types[:, seq // 3 :] = 1
    eng = QAEngine(art, create_backend("torch", art))
    want = eng.forward(ids, mask, types)
    keep = mask.bool().numpy()
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": types.numpy()}
    diffs = {}
    for path in onnx_paths:
        got = ort_session(path).run(list(OUTPUTS), feed)
        diff = 0.0
        for g_out, w_out in zip(got, want):
            w_np = w_out.numpy()
            if not (g_out[~keep] == float("-inf")).all():
                diff = float("inf")  # padding must be -inf, as in QAEngine.forward
            diff = max(diff, float(abs(g_out[keep] - w_np[keep]).max()))
        diffs[Path(path)] = diff
    return diffs


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m engine.export_onnx", description=__doc__.split("\n")[0])
    p.add_argument("artifact", help="engine artifact directory (python -m engine.build_model)")
    p.add_argument("out", help="ONNX file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17; ORT's fusion needs <= 17)")
    p.add_argument("--optimize", action="store_true", help="also write OUT.fused.onnx with ORT's BERT fusion")
    p.add_argument("--check", action="store_true", help="compare ORT's logits with the engine's on random input")
    p.add_argument("--tolerance", type=float, default=1e-4, help="--check fails above this max |diff| (default 1e-4)")
    a = p.parse_args(argv)
    if not a.out.endswith(".onnx"):
        print(f"error: OUT must end in .onnx, got {a.out!r}", file=sys.stderr)
        return 2
    try:
        art = load_artifact(a.artifact)
        out = export(art, a.out, a.opset)
        cfg = art.cfg
        print(f"wrote {out}: {cfg.architecture.value}, heads {list(cfg.heads)}, ffn {list(cfg.ffn)}, opset {a.opset}")
        paths = [out]
        if a.optimize:
            fused, counts = optimize(out)
            want = sum(1 for h in cfg.heads if h)
            print(
                f"wrote {fused}: "
                + ", ".join(f"{op} {n}" for op, n in counts.items() if n)
                + f" (layers with heads: {want})"
            )
            if counts["Attention"] < want:
                print(
                    f"warning: ORT fused attention in {counts['Attention']} of {want} layers with heads",
                    file=sys.stderr,
                )
            paths.append(fused)
        if a.check:
            failed = False
            for path, diff in check(art, paths).items():
                ok = diff <= a.tolerance
                failed |= not ok
                print(
                    f"check {path.name}: max |logit difference| vs engine = {diff:.3g} "
                    f"({'ok' if ok else 'FAILED'}, tolerance {a.tolerance:g})"
                )
            if failed:
                return 1
    except (ArtifactError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(
            f"error: {e}; install the bench extra (pip install 'sparseqa[bench]') for onnx and onnxruntime",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
