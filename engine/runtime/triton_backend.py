"""The `triton` backend: the whole ragged encoder through the Triton kernels of `kernels/`, with CUDA graphs.

One layer l (d = hidden, w = h_l * d_h, f = f_l, T packed tokens), each line one kernel:

    qkv = linear(x, W_qkv, b_qkv)                        [T, 3w]  viewed as [T, 3, h_l, d_h]
    ctx = varlen_attention(qkv, cu_seqlens, max_seqlen)  [T, w]   never crosses a sequence boundary
    a   = linear(ctx, W_o, b_o)                          [T, d]
    x   = add_layernorm(a, residual=x, LN1)              [T, d]   0 heads: add_layernorm(x, bias=b_o, LN1)
    u   = linear(x, W_in, b_in, activation)              [T, f]
    y   = linear(u, W_out, b_out)                        [T, d]
    x   = add_layernorm(y, residual=x, LN2)              [T, d]   0 FFN:   add_layernorm(x, bias=b_out, LN2)

The residual is added inside the LayerNorm kernel rather than in the GEMM epilogue: the kernel count and the
bytes moved are the same, but `x + a` is then formed in fp32, so half-precision runs round `a` once and never
round the sum. Embeddings are torch gathers + one add, then the LayerNorm kernel; the QA head is a `linear`.

Weights move to the device once, at load, in the artifact's dtype: fp16/bf16 artifacts run in that dtype
(fp32 accumulation inside every kernel), fp32 artifacts in fp32 with IEEE products (never TF32). FFN widths
are zero-padded at load to a multiple of `ffn_align` (default 16). The kernels mask any width, so padding is
not needed for correctness; it makes every weight row stride a multiple of 16 elements, which Triton
specialises on (aligned, vectorised loads). The padded units have zero weights and bias, and act(0) = 0 for
gelu, gelu_new and relu, so the result is unchanged. The cost is at most 15 units per layer.

CUDA graphs (CUDA only): a packed batch of T tokens in B sequences is copied into static input buffers and
replayed through a graph captured for the key (token bucket, sequence bucket):
- T is rounded up to `token_bucket(T)`, a multiple of max(64, next_pow2(T) / 16): under 64 padding tokens up
  to 1024 tokens and under ~12.5% beyond. The padding rows belong to no sequence (cu_seqlens[B] = T), so
  attention skips them entirely; the GEMMs and LayerNorms do compute them (row-wise, so they never touch a
  real row). That round-up is the only wasted work, traded for a bounded number of graphs.
- B is rounded up to a power of two; the extra cu_seqlens entries repeat T, giving zero-length sequences
  whose attention programs exit at once.
- max_seqlen is fixed per graph at min(token bucket, position-table size). It only sizes the attention
  grid; programs past a sequence's end exit at once.
Graphs are captured lazily on first use of a key (after one eager warm-up run, which JIT-compiles and
autotunes outside the capture) and share one memory pool. Batches above `graph_max_tokens` tokens or
`graph_max_seqs` sequences run eagerly. Replays are serialised by a lock; outputs are copied out before the
lock is released. On CPU (interpreter) `cuda_graphs=True` runs the same bucketed static-buffer path eagerly,
so tests can check the padding logic there.

Devices: CUDA with triton importable. CPU tensors only in Triton's interpreter (`TRITON_INTERPRET=1` set
before `kernels` is first imported), which is for tests: thousands of times slower than torch.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch

from engine.artifact import Artifact
from engine.config import EncoderConfig
from engine.manifest import DTYPES
from engine.packing import positions

_BUCKET_FLOOR = 64  # token-bucket granularity for small batches (one attention / GEMM row tile)


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def why_unavailable(device: torch.device) -> str | None:
    """None when the backend can run on `device`, else the reason (CUDA + triton; CPU only when interpreted)."""
    if device.type not in ("cuda", "cpu"):
        return f"runs on cuda (or cpu in Triton's interpreter), not {device.type}"
    if device.type == "cpu" and not _interpreter_requested():
        return "needs a CUDA device; on CPU it runs only in Triton's interpreter (set TRITON_INTERPRET=1), for tests"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "torch sees no CUDA device"
    # `kernels` is imported here, not at module level: triton.jit fixes interpreter mode at import, and merely
    # listing backends must not freeze that choice for the rest of the process.
    try:
        from kernels._utils import interpreting
    except ImportError as e:
        return f"triton is not importable ({e})"
    if device.type == "cpu" and not interpreting():
        return "TRITON_INTERPRET=1 was set after `kernels` was imported; set it before the first import"
    return None


def token_bucket(total: int) -> int:
    """Graph bucket of a packed batch of `total` tokens: round up to a multiple of max(64, next_pow2(total)/16)."""
    pow2 = 1 << max(total - 1, 0).bit_length()
    step = max(_BUCKET_FLOOR, pow2 // 16)
    return max(step, -(-total // step) * step)


def seq_bucket(batch: int) -> int:
    """Graph bucket of a batch of `batch` sequences: the next power of two."""
    return 1 << max(batch - 1, 0).bit_length()


@dataclass(frozen=True)
class _LayerWeights:
    """One layer's device tensors. `heads`/`ffn` are the sizes the GEMMs see (ffn after alignment padding)."""

    heads: int
    ffn: int
    qkv_w: torch.Tensor  # [3w, d]
    qkv_b: torch.Tensor  # [3w]
    o_w: torch.Tensor  # [d, w]
    o_b: torch.Tensor  # [d]
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    in_w: torch.Tensor  # [f, d]
    in_b: torch.Tensor  # [f]
    out_w: torch.Tensor  # [d, f]
    out_b: torch.Tensor  # [d]
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor


def pad_ffn(
    in_w: torch.Tensor, in_b: torch.Tensor, out_w: torch.Tensor, multiple: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-pad an FFN of width f (`in_w` [f, d], `in_b` [f], `out_w` [d, f]) to a multiple of `multiple`."""
    f = in_w.shape[0]
    extra = -f % multiple if f else 0  # an empty FFN stays empty: it is skipped, not computed
    if not extra:
        return in_w, in_b, out_w
    pad_rows = in_w.new_zeros(extra, in_w.shape[1])
    return (
        torch.cat([in_w, pad_rows]),
        torch.cat([in_b, in_b.new_zeros(extra)]),
        torch.cat([out_w, out_w.new_zeros(out_w.shape[0], extra)], dim=1),
    )


def load_weights(
    artifact: Artifact, device: torch.device, ffn_align: int
) -> tuple[dict[str, torch.Tensor], list[_LayerWeights]]:
    """Move the artifact's tensors to `device` once, in its dtype; returns (embeddings + QA head, layers)."""
    st = artifact.state
    dtype = DTYPES[artifact.dtype]

    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    top = {k: dev(v) for k, v in st.items() if not k.startswith("layers.")}
    layers = []
    for i, heads in enumerate(artifact.cfg.heads):
        p = f"layers.{i}."
        in_w, in_b, out_w = pad_ffn(st[p + "ffn_in.weight"], st[p + "ffn_in.bias"], st[p + "ffn_out.weight"], ffn_align)
        layers.append(
            _LayerWeights(
                heads=heads,
                ffn=in_w.shape[0],
                qkv_w=dev(st[p + "qkv.weight"]),
                qkv_b=dev(st[p + "qkv.bias"]),
                o_w=dev(st[p + "o.weight"]),
                o_b=dev(st[p + "o.bias"]),
                ln1_w=dev(st[p + "ln1.weight"]),
                ln1_b=dev(st[p + "ln1.bias"]),
                in_w=dev(in_w),
                in_b=dev(in_b),
                out_w=dev(out_w),
                out_b=dev(st[p + "ffn_out.bias"]),
                ln2_w=dev(st[p + "ln2.weight"]),
                ln2_b=dev(st[p + "ln2.bias"]),
            )
        )
    return top, layers


class _Encoder:
    """The forward pass over device tensors: `[T, 3]` (ids, types, positions) -> logits `[T, 2]`."""

    def __init__(self, cfg: EncoderConfig, top: dict[str, torch.Tensor], layers: list[_LayerWeights]):
        import kernels

        self.k = kernels
        self.cfg, self.top, self.layers = cfg, top, layers
        self.dtype = top["qa.weight"].dtype
        self.eps = cfg.layer_norm_eps
        self.act = cfg.activation  # fused into the FFN-in GEMM's epilogue

    @property
    def max_attn_width(self) -> int:
        """Widest concatenated-heads activation, max_l h_l * d_h."""
        return max(self.cfg.heads) * self.cfg.head_dim

    def __call__(
        self, tok: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, attn_scratch: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`tok` [T, 3] int64 (id, token type, position id), `cu_seqlens` [B+1] int32 on the device -> [T, 2].

        `attn_scratch` (flat, >= T * max_attn_width elements) receives the attention outputs; the bucketed
        runner passes a zero-initialised one so rows outside every sequence, which attention never writes,
        hold finite values instead of uninitialised memory.
        """
        k, t, eps = self.k, self.top, self.eps
        total, dh = tok.shape[0], self.cfg.head_dim
        words = t["embeddings.word.weight"].index_select(0, tok[:, 0])  # [T, d]
        rest = t["embeddings.token_type.weight"].index_select(0, tok[:, 1])
        rest += t["embeddings.position.weight"].index_select(0, tok[:, 2])
        x = k.add_layernorm(words, rest, weight=t["embeddings.ln.weight"], ln_bias=t["embeddings.ln.bias"], eps=eps)
        for lw in self.layers:
            if lw.heads:
                qkv = k.linear(x, lw.qkv_w, lw.qkv_b).view(total, 3, lw.heads, dh)
                out = None if attn_scratch is None else attn_scratch[: total * lw.heads * dh].view(total, -1)
                ctx = k.varlen_attention(qkv, cu_seqlens, max_seqlen, out=out)  # [T, h*dh]
                a = k.linear(ctx, lw.o_w, lw.o_b)
                x = k.add_layernorm(a, x, weight=lw.ln1_w, ln_bias=lw.ln1_b, eps=eps)
            else:
                x = k.add_layernorm(x, bias=lw.o_b, weight=lw.ln1_w, ln_bias=lw.ln1_b, eps=eps)
            if lw.ffn:
                u = k.linear(x, lw.in_w, lw.in_b, activation=self.act)  # [T, f]
                y = k.linear(u, lw.out_w, lw.out_b)
                x = k.add_layernorm(y, x, weight=lw.ln2_w, ln_bias=lw.ln2_b, eps=eps)
            else:
                x = k.add_layernorm(x, bias=lw.out_b, weight=lw.ln2_w, ln_bias=lw.ln2_b, eps=eps)
        return k.linear(x, t["qa.weight"], t["qa.bias"])  # [T, 2]


class _BucketedRunner:
    """Runs the encoder on static, bucket-padded input buffers; on CUDA each (token, seq) bucket is a graph."""

    def __init__(self, encode: _Encoder, device: torch.device, max_tokens: int, max_seqs: int, max_seqlen_cap: int):
        self.encode, self.device, self.cap = encode, device, max_seqlen_cap
        self.max_tokens, self.max_seqs = token_bucket(max_tokens), seq_bucket(max_seqs)
        # Padding rows keep whatever valid ids an earlier batch left there; zeros are valid to start with.
        self.tok = torch.zeros(self.max_tokens, 3, dtype=torch.long, device=device)  # [T_max, 3]
        self.cu = torch.zeros(self.max_seqs + 1, dtype=torch.int32, device=device)  # [B_max + 1]
        self.scratch = torch.zeros(self.max_tokens * encode.max_attn_width, dtype=encode.dtype, device=device)
        self.capture = device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.lock = threading.Lock()

    def fits(self, total: int, batch: int) -> bool:
        """Whether a batch of `total` tokens in `batch` sequences has a bucket."""
        return token_bucket(total) <= self.max_tokens and seq_bucket(batch) <= self.max_seqs

    def __call__(self, tok: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """`tok` [T, 3] int64 and `cu_seqlens` [B+1] int32, both on the CPU -> fp32 logits `[2, T]` on the device."""
        total, batch = tok.shape[0], cu_seqlens.numel() - 1
        tb, sb = token_bucket(total), seq_bucket(batch)
        cu = torch.full((sb + 1,), total, dtype=torch.int32)  # trailing zero-length sequences: attention skips them
        cu[: batch + 1] = cu_seqlens
        with self.lock:
            self.tok[:total].copy_(tok)
            self.cu[: sb + 1].copy_(cu)
            args = (self.tok[:tb], self.cu[: sb + 1], min(tb, self.cap), self.scratch)
            if not self.capture:
                logits = self.encode(*args)
            else:
                graph, logits = self.graphs.get((tb, sb)) or self._capture(tb, sb, args)
                graph.replay()
            # Copy out before the lock is released: the next replay (of any graph in the pool) overwrites it.
            return torch.empty(2, total, dtype=torch.float32, device=self.device).copy_(logits[:total].t())

    def _capture(self, tb: int, sb: int, args: tuple) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: Triton compiles and autotunes here, never inside the capture
            self.encode(*args)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.encode(*args)
        self.graphs[(tb, sb)] = (graph, logits)
        return graph, logits


class TritonBackend:
    """Packed forward through the Triton kernels (see the module docstring for the layer recipe and graphs)."""

    name = "triton"

    def __init__(
        self,
        artifact: Artifact,
        device: torch.device,
        threads: int | None = None,
        *,
        ffn_align: int = 16,
        cuda_graphs: bool | None = None,
        graph_max_tokens: int = 16384,
        graph_max_seqs: int = 512,
    ):
        """`threads` is ignored (GPU); `cuda_graphs` defaults to True on CUDA (on CPU, True = bucketed eager)."""
        why = why_unavailable(device)
        if why is not None:
            raise RuntimeError(f"triton backend unavailable on {device}: {why}")
        if ffn_align < 1:
            raise ValueError(f"ffn_align must be >= 1, got {ffn_align}")
        self.device, self.cfg = device, artifact.cfg
        self.dtype = DTYPES[artifact.dtype]
        top, layers = load_weights(artifact, device, ffn_align)
        self.ffn_widths = tuple(lw.ffn for lw in layers)  # as run, after alignment padding
        self.encoder = _Encoder(artifact.cfg, top, layers)
        self.max_seqlen_cap = artifact.cfg.max_position_embeddings - artifact.cfg.position_offset
        use_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.runner = (
            _BucketedRunner(self.encoder, device, graph_max_tokens, graph_max_seqs, self.max_seqlen_cap)
            if use_graphs
            else None
        )

    def forward_packed(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end logits `[T]` (fp32, on the backend's device) of packed tokens; `cu_seqlens` on the CPU."""
        cu_seqlens = cu_seqlens.to("cpu", torch.int32)
        if max_seqlen > self.max_seqlen_cap:
            raise ValueError(f"max_seqlen {max_seqlen} exceeds the model's {self.max_seqlen_cap} positions")
        pos = positions(cu_seqlens, self.cfg.position_offset)
        tok = torch.stack([input_ids.cpu().long(), token_type_ids.cpu().long(), pos], dim=1)  # [T, 3]
        total, batch = tok.shape[0], cu_seqlens.numel() - 1
        if total == 0:
            empty = torch.empty(0, device=self.device)
            return empty, empty.clone()
        with torch.inference_mode():
            if self.runner is not None and self.runner.fits(total, batch):
                logits = self.runner(tok, cu_seqlens)  # [2, T]
            else:
                out = self.encoder(tok.to(self.device), cu_seqlens.to(self.device), max_seqlen)
                logits = out.t().float().contiguous()
        return logits[0], logits[1]


def create(artifact: Artifact, device: torch.device, threads: int | None) -> TritonBackend:
    """Registry hook."""
    return TritonBackend(artifact, device, threads)
