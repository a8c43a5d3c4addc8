"""`python -m engine.build_model`: turn a dense HF checkpoint (+ optional pruning spec) or a ragged
checkpoint into an engine artifact."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from engine.artifact import DTYPES, ArtifactError, save_artifact
from engine.checkpoint import load_checkpoint
from engine.features import WindowSettings
from engine.flops import encoder_flops
from engine.spec import SpecError, apply_spec, parse_spec


def build(model: str | Path, out: str | Path, spec: str | Path | None = None, dtype: str = "float32",
          settings: WindowSettings = WindowSettings(), force: bool = False,
          null_threshold: float | None = None) -> Path:
    """Build an artifact in `out`; returns its path. Raises ValueError/FileNotFoundError on bad input."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"--out {out} is not empty; pass --force to overwrite it")
        shutil.rmtree(out)
    ck = load_checkpoint(model)
    cfg, state = ck.cfg, ck.state
    if spec is not None:
        cfg, state = apply_spec(state, cfg, parse_spec(spec, cfg))
    threshold = null_threshold if null_threshold is not None else (ck.null_threshold or 0.0)
    source = {"model": str(Path(model).resolve()), "spec": str(Path(spec).resolve()) if spec else None,
              "ragged_checkpoint": ck.is_ragged, "qa_head_initialised": ck.qa_head_initialised}
    return save_artifact(out, cfg, state, Path(model), settings, dtype, threshold, source)


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
    mask[1, seq // 2:] = 0
    types = torch.zeros(batch, seq, dtype=torch.long)
    if cfg.type_vocab_size > 1:
        types[:, seq // 3:] = 1
    ck = load_checkpoint(model)
    with torch.no_grad():
        if ck.is_ragged:
            from engine.model import RaggedQAModel
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


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m engine.build_model", description=__doc__)
    p.add_argument("--model", required=True, help="HF checkpoint dir (BERT/RoBERTa QA or bare encoder) or ragged checkpoint")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--spec", help="pruning spec JSON (kept head/unit indices per layer)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight storage dtype (default float32)")
    p.add_argument("--max-seq-length", type=int, default=384, help="tokens per window (default 384)")
    p.add_argument("--doc-stride", type=int, default=128, help="tokens shared by consecutive windows (default 128)")
    p.add_argument("--max-query-length", type=int, default=64, help="question tokens kept (default 64)")
    p.add_argument("--null-threshold", type=float, help="override the null threshold stored with the source")
    p.add_argument("--verify", action="store_true", help="compare the engine against the source model")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    a = p.parse_args(argv)
    settings = WindowSettings(a.max_seq_length, a.doc_stride, a.max_query_length)
    try:
        out = build(a.model, a.out, a.spec, a.dtype, settings, a.force, a.null_threshold)
        from engine.artifact import load_artifact

        art = load_artifact(out)
        flops = encoder_flops(art.cfg, 1, settings.max_seq_length)
        print(f"wrote {out}: {art.cfg.architecture.value}, heads {list(art.cfg.heads)}, ffn {list(art.cfg.ffn)}, "
              f"{art.dtype}, {flops / 1e9:.2f} GFLOP per {settings.max_seq_length}-token window")
        if art.source.get("qa_head_initialised"):
            print("note: the source has no QA head; a random one was initialised, so answers are meaningless")
        if a.verify:
            diff = verify(a.model, out, a.spec)
            tol = 1e-3 if a.dtype == "float32" else 0.25
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
