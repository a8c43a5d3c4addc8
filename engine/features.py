"""Question + context -> doc-stride windows with character offsets, built from the fast tokenizer's ids.

Windows are laid out as the standard SQuAD pipelines do:
  BERT:    [CLS] question [SEP] context-chunk [SEP]      token types 0...0 1...1
  RoBERTa: <s> question </s></s> context-chunk </s>      token types all 0
`doc_stride` follows HF's meaning: the number of context tokens two consecutive windows share.
The question is truncated to `max_query_length` tokens. Only the tokenizer's plain `encode` (no
truncation or padding state) is used, so one WindowMaker is safe to share between threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from engine.config import Architecture
from engine.packing import cu_seqlens_from_lengths


@dataclass(frozen=True)
class WindowSettings:
    """Tokenizer-side settings stored in the artifact."""

    max_seq_length: int = 384
    doc_stride: int = 128
    max_query_length: int = 64

    def validate(self, architecture: Architecture, max_positions: int) -> None:
        """Raise ValueError if windows could not make progress or would exceed the position table."""
        specials = 3 if architecture is Architecture.BERT else 4
        if self.max_seq_length > max_positions:
            raise ValueError(f"max_seq_length {self.max_seq_length} exceeds the model's {max_positions} positions")
        if self.max_query_length < 1 or self.doc_stride < 0:
            raise ValueError("max_query_length must be >= 1 and doc_stride >= 0")
        room = self.max_seq_length - self.max_query_length - specials
        if room <= self.doc_stride:
            raise ValueError(
                f"max_seq_length {self.max_seq_length} leaves {room} context tokens per window after a "
                f"{self.max_query_length}-token question, which must exceed doc_stride {self.doc_stride}"
            )


@dataclass(frozen=True)
class Window:
    """One model input: ids, token types, and each token's (start, end) char span in the context (or None)."""

    input_ids: list[int]
    token_type_ids: list[int]
    offsets: list[tuple[int, int] | None]
    context_start: int  # index of the first context token in input_ids


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The fast tokenizer of a checkpoint or artifact directory, with truncation and padding off."""
    root = Path(path)
    if (root / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    else:  # e.g. only vocab.txt / vocab.json+merges.txt: let transformers build the fast tokenizer
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(root)).backend_tokenizer
        except Exception as e:  # transformers raises many types here
            raise FileNotFoundError(f"no usable tokenizer files in {root} ({e})") from None
    tok.no_truncation()
    tok.no_padding()
    return tok


class WindowMaker:
    """Turns (question, context) into windows; stateless after construction."""

    def __init__(self, tokenizer: Tokenizer, architecture: Architecture, settings: WindowSettings):
        self.tok = tokenizer
        self.arch = Architecture(architecture)
        self.settings = settings
        names = ("[CLS]", "[SEP]") if self.arch is Architecture.BERT else ("<s>", "</s>")
        ids = [tokenizer.token_to_id(n) for n in names]
        if None in ids:
            raise ValueError(f"tokenizer lacks the special tokens {names} that {self.arch.value} windows need")
        self.cls_id, self.sep_id = ids
        self.specials = 3 if self.arch is Architecture.BERT else 4

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and char offsets of `text`, without special tokens."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def question_ids(self, question: str) -> list[int]:
        """Question token ids, truncated to max_query_length."""
        return self.encode(question)[0][: self.settings.max_query_length]

    def windows(self, question: str, context: str) -> list[Window]:
        """All doc-stride windows of one example (at least one)."""
        _check_text(question, "question")
        _check_text(context, "context")
        q = self.question_ids(question)
        if not q:
            raise ValueError("question has no tokens after tokenization")
        c_ids, c_offsets = self.encode(context)
        if not c_ids:
            raise ValueError("context has no tokens after tokenization")
        return self.windows_from_ids(q, c_ids, c_offsets)

    def windows_from_ids(self, q: list[int], c_ids: list[int], c_offsets: list[tuple[int, int]]) -> list[Window]:
        """Windows from pre-tokenized question ids and context ids/offsets."""
        room = self.settings.max_seq_length - len(q) - self.specials
        step = max(1, room - self.settings.doc_stride)
        if self.arch is Architecture.BERT:
            head, t_c = [self.cls_id, *q, self.sep_id], 1
        else:
            head, t_c = [self.cls_id, *q, self.sep_id, self.sep_id], 0
        tail = [self.sep_id]
        out = []
        start = 0
        while True:
            chunk = slice(start, min(start + room, len(c_ids)))
            ids = head + c_ids[chunk] + tail
            n_ctx = chunk.stop - chunk.start
            types = [0] * len(head) + [t_c] * (n_ctx + len(tail))
            offsets: list[tuple[int, int] | None] = [None] * len(head) + list(c_offsets[chunk]) + [None]
            out.append(Window(ids, types, offsets, len(head)))
            if chunk.stop >= len(c_ids):
                return out
            start += step


def _check_text(value: object, name: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{name} is empty")


def span_labels(window: Window, char_start: int, char_end: int) -> tuple[int, int]:
    """Token (start, end) of the answer chars [char_start, char_end) in this window, or (0, 0) if not inside it."""
    first, last = None, None
    for i, off in enumerate(window.offsets):
        if off is None:
            continue
        if first is None and off[1] > char_start:
            first = i
        if off[0] < char_end:
            last = i
    ctx = [o for o in window.offsets if o is not None]
    if first is None or last is None or last < first or ctx[0][0] > char_start or ctx[-1][1] < char_end:
        return 0, 0
    return first, last


@dataclass
class PackedBatch:
    """Windows packed padding-free: ids and types `[T]`, `cu_seqlens` `[B+1]`."""

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    def to(self, device: torch.device | str) -> PackedBatch:
        """The same batch on `device`."""
        return PackedBatch(
            self.input_ids.to(device), self.token_type_ids.to(device), self.cu_seqlens.to(device), self.max_seqlen
        )


def pack_windows(windows: Sequence[Window]) -> PackedBatch:
    """Concatenate windows (anything with `input_ids` and `token_type_ids`) into one padding-free batch."""
    ids = torch.tensor([t for w in windows for t in w.input_ids], dtype=torch.long)
    types = torch.tensor([t for w in windows for t in w.token_type_ids], dtype=torch.long)
    lengths = [len(w.input_ids) for w in windows]
    return PackedBatch(ids, types, cu_seqlens_from_lengths(lengths), max(lengths))
