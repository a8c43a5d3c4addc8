"""`python -m engine.build_model`: turn a dense HF checkpoint (+ optional pruning spec) or a ragged
checkpoint into an engine artifact (float32, bfloat16, float16, or int8; see docs/PRECISION.md)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from engine.artifact import save_artifact
from engine.checkpoint import load_checkpoint
from engine.config import EncoderConfig
from engine.features import WindowSettings
from engine.flops import encoder_flops
from engine.manifest import ARTIFACT_DTYPES, EMBEDDINGS, INT8, ActivationQuant, ArtifactError, Quantization
from engine.model import RaggedQAModel
from engine.spec import SpecError, apply_spec, parse_spec

DEFAULT_CALIB_SAMPLES = 256


def build(
    model: str | Path,
    out: str | Path,
    spec: str | Path | None = None,
    dtype: str = "float32",
    settings: WindowSettings = WindowSettings(),
    force: bool = False,
    null_threshold: float | None = None,
    calibrate: str | Path | None = None,
    calib_samples: int | None = None,
    embeddings: str = "same",
) -> Path:
    """Build an artifact in `out`; returns its path. Raises ValueError/FileNotFoundError on bad input.

    `dtype="int8"` quantizes the encoder Linears: dynamic per-token activation scales, or static per-input-channel
    scales calibrated by running the fp32 model over `calib_samples` examples of the SQuAD file `calibrate`.
    `embeddings="int8"` stores the word embeddings int8 with per-row scales (any dtype; docs/ARTIFACT.md).
    """
    if dtype not in ARTIFACT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {sorted(ARTIFACT_DTYPES)}")
    if embeddings not in EMBEDDINGS:
        raise ValueError(f"embeddings {embeddings!r} is not supported; choose one of {list(EMBEDDINGS)}")
    if calibrate is not None and dtype != INT8:
        raise ValueError(f"--calibrate applies to --dtype int8 only (got --dtype {dtype})")
    if calib_samples is not None and calibrate is None:
        raise ValueError("--calib-samples needs --calibrate FILE")
    if calibrate is not None and not Path(calibrate).is_file():
        raise FileNotFoundError(f"calibration file {calibrate} does not exist")
    if calib_samples is not None and calib_samples < 1:
        raise ValueError(f"--calib-samples must be >= 1, got {calib_samples}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    replace = out.is_dir() and any(out.iterdir())
    if replace and not force:
        raise FileExistsError(f"--out {out} is not empty; pass --force to overwrite it")
    ck = load_checkpoint(model)
    cfg, state = ck.cfg, ck.state
    if spec is not None:
        cfg, state = apply_spec(state, cfg, parse_spec(spec, cfg))
    threshold = null_threshold if null_threshold is not None else (ck.null_threshold or 0.0)
    source = {
        "model": str(Path(model).resolve()),
        "spec": str(Path(spec).resolve()) if spec else None,
        "ragged_checkpoint": ck.is_ragged,
        "qa_head_initialised": ck.qa_head_initialised,
    }
    quant = None
    if dtype == INT8:  # before --out is cleared: bad calibration data must not cost the old artifact
        state, quant = _quantize(cfg, state, Path(model), settings, calibrate, calib_samples)
    if replace:
        shutil.rmtree(out)
    return save_artifact(out, cfg, state, Path(model), settings, dtype, threshold, source, quant, embeddings)


def _quantize(
    cfg: EncoderConfig,
    state: dict[str, torch.Tensor],
    model_dir: Path,
    settings: WindowSettings,
    calibrate: str | Path | None,
    calib_samples: int | None,
) -> tuple[dict[str, torch.Tensor], Quantization]:
    """The int8 state and its manifest block; static scales come from the fp32 model run over real examples."""
    from engine import quant

    settings.validate(cfg.architecture, cfg.max_position_embeddings)
    if calibrate is None:
        return quant.quantize_state(cfg, state), Quantization(ActivationQuant.DYNAMIC)
    samples = calib_samples or DEFAULT_CALIB_SAMPLES
    batches, counts = quant.calibration_batches(calibrate, model_dir, cfg, settings, samples)
    ref = RaggedQAModel(cfg).eval()
    ref.load_state_dict({k: v.float() for k, v in state.items()})
    absmax = quant.calibrate(ref, batches)
    info = {
        "file": str(Path(calibrate).resolve()),
        "samples_requested": samples,
        **counts,
        "statistic": "absmax_per_input_channel",
        "smoothing_alpha": quant.SMOOTHING_ALPHA,
    }
    return quant.quantize_state(cfg, state, absmax), Quantization(ActivationQuant.STATIC, info)


def verify(model: str | Path, out: str | Path, spec: str | Path | None, seed: int = 0) -> float:
    """Max |logit difference| of the built engine against the source model on random inputs.

    Dense sources (with or without a spec) are compared with stock `transformers` (masked by the spec);
    ragged checkpoints, which transformers cannot load, with our fp32 reference model of the source.
    """
    from engine.qa import QAEngine

    eng = QAEngine.load(out, backend="torch")
    cfg = eng.cfg
    gen = torch.Generator().manual_seed(seed)
    batch, seq = 2, min(64, eng.artifact.tokenizer.settings.max_seq_length)
    ids = torch.randint(5, cfg.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq // 2 :] = 0
    types = torch.zeros(batch, seq, dtype=torch.long)
    if cfg.type_vocab_size > 1:
        types[:, seq // 3 :] = 1
    ck = load_checkpoint(model)
    with torch.no_grad():
        if ck.is_ragged:
            from engine.packing import cu_seqlens_from_lengths, pack, unpack

            ref_model = RaggedQAModel(ck.cfg).eval()
            ref_model.load_state_dict(ck.state)
            lengths = mask.sum(1)
            cu = cu_seqlens_from_lengths(lengths)
            s, e = ref_model(pack(ids, lengths), pack(types, lengths), cu, seq)
            ref_s, ref_e = unpack(s, cu, seq), unpack(e, cu, seq)
        else:
            from engine.reference import masked_hf_model

            parsed = parse_spec(spec, ck.cfg) if spec else None
            hf = masked_hf_model(model, parsed)
            o = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
            ref_s, ref_e = o.start_logits, o.end_logits
        s, e = eng.forward(ids, mask, types)
    keep = mask.bool()
    return max((s - ref_s)[keep].abs().max().item(), (e - ref_e)[keep].abs().max().item())


# --verify: max |logit difference| allowed against the source. Float tolerances as before; int8's follows the
# measured MiniLM figures of docs/PRECISION.md (max 0.7-1.2 on real text, random inputs alike) with headroom.
VERIFY_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.25, "int8": 2.0}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m engine.build_model", description=__doc__)
    p.add_argument(
        "--model", required=True, help="HF checkpoint dir (BERT/RoBERTa QA or bare encoder) or ragged checkpoint"
    )
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--spec", help="pruning spec JSON (kept head/unit indices per layer)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=list(ARTIFACT_DTYPES),
        help="weight dtype (default float32); int8 quantizes the encoder Linears (docs/PRECISION.md)",
    )
    p.add_argument(
        "--calibrate",
        metavar="FILE",
        help="int8: SQuAD json/json.gz of real examples for static "
        "activation scales (default: dynamic per-token scales)",
    )
    p.add_argument(
        "--calib-samples",
        type=int,
        metavar="N",
        help=f"int8: examples of --calibrate to run (default {DEFAULT_CALIB_SAMPLES})",
    )
    p.add_argument(
        "--embeddings",
        default="same",
        choices=list(EMBEDDINGS),
        help="word-embedding storage: same (default) as --dtype (fp32 for int8), or int8 with a per-row scale "
        "(4x smaller than fp32; dequantized at load)",
    )
    p.add_argument("--max-seq-length", type=int, default=384, help="tokens per window (default 384)")
    p.add_argument("--doc-stride", type=int, default=128, help="tokens shared by consecutive windows (default 128)")
    p.add_argument("--max-query-length", type=int, default=64, help="question tokens kept (default 64)")
    p.add_argument("--null-threshold", type=float, help="override the null threshold stored with the source")
    p.add_argument("--verify", action="store_true", help="compare the engine against the source model")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    a = p.parse_args(argv)
    settings = WindowSettings(a.max_seq_length, a.doc_stride, a.max_query_length)
    try:
        out = build(
            a.model,
            a.out,
            a.spec,
            a.dtype,
            settings,
            a.force,
            a.null_threshold,
            a.calibrate,
            a.calib_samples,
            a.embeddings,
        )
        from engine.artifact import load_artifact

        art = load_artifact(out)
        flops = encoder_flops(art.cfg, 1, settings.max_seq_length)
        precision = art.dtype + (f" ({art.quantization.activations.value} activations)" if art.quantization else "")
        precision += ", int8 word embeddings" if art.embeddings == INT8 else ""
        print(
            f"wrote {out}: {art.cfg.architecture.value}, heads {list(art.cfg.heads)}, ffn {list(art.cfg.ffn)}, "
            f"{precision}, {flops / 1e9:.2f} GFLOP per {settings.max_seq_length}-token window"
        )
        if art.source.get("qa_head_initialised"):
            print("note: the source has no QA head; a random one was initialised, so answers are meaningless")
        if a.verify:
            diff = verify(a.model, out, a.spec)
            tol = VERIFY_TOLERANCE[a.dtype]
            print(f"verify: max |logit difference| vs source = {diff:.3g} (tolerance {tol:g})")
            if not diff <= tol:
                print("error: verification failed", file=sys.stderr)
                return 1
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, SpecError, ArtifactError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
