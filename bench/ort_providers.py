"""More CPU providers: ONNX Runtime (unfused and BERT-fused graphs) and torch.compile of the engine's model.

`ORT_PROVIDERS` has the factory signature of `bench.providers.PROVIDERS` (ModelUnderTest -> forward(x)), where
`x` holds padded `[B, S]` input_ids / attention_mask / token_type_ids. Exported graphs are cached under
build/bench-artifacts/onnx/, keyed by the artifact's manifest and weights and by the exporter's source, so a
rebuilt artifact or a changed exporter never reuses a stale graph.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import CACHE, THREADS, ModelUnderTest
from engine import export_onnx

Forward = Callable[[dict[str, torch.Tensor]], object]
ONNX_CACHE = CACHE / "onnx"
FULL = os.environ.get("SPARSEQA_BENCH_FULL", "") not in ("", "0")
FULL_ONLY = frozenset({"torch-compile"})  # minutes of compilation per shape on 2 cores


def _cache_key(artifact: Path) -> str:
    h = hashlib.sha1()
    h.update((artifact / "engine.json").read_bytes())
    st = (artifact / "weights.safetensors").stat()
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(Path(export_onnx.__file__).read_bytes())
    return h.hexdigest()[:12]


def onnx_file(m: ModelUnderTest, fused: bool) -> Path:
    """The model's exported ONNX graph (BERT-fused when `fused`), exported on first use and cached."""
    ONNX_CACHE.mkdir(parents=True, exist_ok=True)
    plain = ONNX_CACHE / f"{m.name}-{_cache_key(m.artifact)}.onnx"
    if not plain.is_file():
        tmp = plain.with_name(f"tmp-{os.getpid()}-{plain.name}")
        export_onnx.export(m.artifact, tmp)
        os.replace(tmp, plain)  # a concurrent or interrupted run never sees a half-written graph
    if not fused:
        return plain
    out = export_onnx.fused_path(plain)
    if not out.is_file():
        tmp = out.with_name(f"tmp-{os.getpid()}-{out.name}")
        export_onnx.optimize(plain, tmp)
        os.replace(tmp, out)
    return out


def ort_provider(m: ModelUnderTest, fused: bool) -> Forward:
    """ORT CPU session over the exported graph: SPARSEQA_THREADS intra-op threads, sequential, ORT_ENABLE_ALL."""
    sess = export_onnx.ort_session(onnx_file(m, fused), threads=THREADS)
    names = list(export_onnx.OUTPUTS)
    return lambda x: sess.run(names, {k: v.numpy() for k, v in x.items()})


def torch_compile_provider(m: ModelUnderTest) -> Forward:
    """QAEngine.forward with the torch backend's RaggedQAModel under torch.compile (static shapes).

    The first call per shape compiles (the benchmark's warmup round). Token positions come from
    `int(cu_seqlens[-1])`; capturing scalar outputs keeps that inside the graph, so a full-length batch (the
    model's batched-attention branch) compiles as one graph. Padded batches still run, split at graph breaks.
    """
    from engine.qa import QAEngine

    eng = QAEngine.load(m.artifact, backend="torch", threads=THREADS)
    compiled = torch.compile(eng.backend.model, dynamic=False)

    def model(*args):
        with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
            return compiled(*args)

    eng.backend.model = model
    return lambda x: eng.forward(x["input_ids"], x["attention_mask"], x["token_type_ids"])


ORT_PROVIDERS: dict[str, Callable[[ModelUnderTest], Forward]] = {
    "ort": lambda m: ort_provider(m, fused=False),
    "ort-fused": lambda m: ort_provider(m, fused=True),
    "torch-compile": torch_compile_provider,
}


def ort_available(name: str) -> str | None:
    """None if provider `name` of ORT_PROVIDERS can run here (and now), else why not."""
    if name.startswith("ort"):
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as e:
            return f"onnxruntime/onnx not installed ({e}); pip install 'sparseqa[bench]'"
    if name in FULL_ONLY and not FULL:
        return f"{name} is slow (compiles per shape): run with SPARSEQA_BENCH_FULL=1 (make bench-full)"
    return None
