"""QAEngine: question + context in, answer out (SQuAD 2.0 semantics), over any registered backend."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

from engine.artifact import Artifact, load_artifact
from engine.decode import decode
from engine.features import Window, WindowMaker, load_tokenizer, pack_windows
from engine.packing import cu_seqlens_from_lengths, lengths_from_mask, pack, unpack
from engine.runtime import Backend, create_backend


@dataclass(frozen=True)
class Answer:
    """An answer: `context[start:end] == text`; no-answer results have text "", start == end == 0."""

    text: str
    start: int
    end: int
    score: float  # start + end logit of the span (the null score for a no-answer result)
    no_answer: bool
    null_score_diff: float  # null score - best span score; SQuAD 2.0's na_prob

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


class QAEngine:
    """Extractive QA over an engine artifact. Thread-safe: tokenization is stateless and inference has no state."""

    def __init__(self, artifact: Artifact, backend: Backend):
        self.artifact = artifact
        self.backend = backend
        self.cfg = artifact.cfg
        self.windows = WindowMaker(
            load_tokenizer(artifact.path), artifact.cfg.architecture, artifact.tokenizer.settings
        )

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", backend: str = "auto", threads: int | None = None) -> QAEngine:
        """Load and validate an artifact and start a backend (`auto`: triton on CUDA, else cpp if built, else torch)."""
        artifact = load_artifact(path, weights=False)  # read once: by the backend (the cpp one reads the file itself)
        return cls(artifact, create_backend(backend, artifact, device, threads))

    @property
    def backend_name(self) -> str:
        """Name of the running backend."""
        return self.backend.name

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded `[B, S]` in -> start and end logits `[B, S]` (fp32); padding positions hold -inf."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a [batch, seq] tensor")
        if attention_mask is None or tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}")
        if token_type_ids is not None and tuple(token_type_ids.shape) != tuple(input_ids.shape):
            raise ValueError(f"token_type_ids must have the shape of input_ids {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point:
            raise TypeError("input_ids must be an integer tensor")
        batch, seq = input_ids.shape
        max_pos = self.cfg.max_position_embeddings - self.cfg.position_offset
        if seq > max_pos:
            raise ValueError(f"sequence length {seq} exceeds the model's {max_pos} positions")
        # Without padding, packing and unpacking are reshapes: at batch 1, where a pruned forward takes 3-4 ms, the
        # general path's dozen small tensor ops cost several percent.
        mask = attention_mask.cpu()
        unpadded = bool(mask.all())
        lengths = torch.full((batch,), seq, dtype=torch.long) if unpadded else lengths_from_mask(mask)
        ids = input_ids.cpu().long().reshape(-1) if unpadded else pack(input_ids.cpu().long(), lengths)
        if ids.numel():
            lo, hi = torch.aminmax(ids)
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(f"input_ids must lie in [0, {self.cfg.vocab_size})")
        if token_type_ids is None:
            types = torch.zeros_like(ids)
        else:
            types = token_type_ids.cpu().long().reshape(-1) if unpadded else pack(token_type_ids.cpu().long(), lengths)
            if types.numel():
                lo, hi = torch.aminmax(types)
                if lo < 0 or hi >= self.cfg.type_vocab_size:
                    raise ValueError(f"token_type_ids must lie in [0, {self.cfg.type_vocab_size})")
        cu = cu_seqlens_from_lengths(lengths)
        longest = seq if unpadded else int(lengths.max()) if lengths.numel() else 0
        start, end = self.backend.forward_packed(ids, types, cu, longest)
        if unpadded:
            return start.cpu().reshape(batch, seq), end.cpu().reshape(batch, seq)
        fill = float("-inf")
        return unpack(start.cpu(), cu, seq, fill), unpack(end.cpu(), cu, seq, fill)

    def run_windows(
        self, windows: Sequence[Window], batch_size: int = 32, max_tokens: int | None = None
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Start and end logits `[len(window)]` of every window, in order; packed forwards of at most `batch_size`
        windows and (when given) `max_tokens` tokens (a single longer window runs alone)."""
        starts: list[np.ndarray] = []
        ends: list[np.ndarray] = []
        for chunk in _chunks(windows, batch_size, max_tokens):
            b = pack_windows(chunk)
            s, e = self.backend.forward_packed(b.input_ids, b.token_type_ids, b.cu_seqlens, b.max_seqlen)
            s, e = s.cpu().numpy(), e.cpu().numpy()
            bounds = b.cu_seqlens.tolist()
            starts += [s[a:z] for a, z in pairwise(bounds)]
            ends += [e[a:z] for a, z in pairwise(bounds)]
        return starts, ends

    def decode_answers(
        self,
        context: str,
        windows: Sequence[Window],
        starts: Sequence[np.ndarray],
        ends: Sequence[np.ndarray],
        top_k: int = 1,
        max_answer_length: int = 30,
        null_threshold: float | None = None,
    ) -> Answer | list[Answer]:
        """One example's answer (or `top_k` answers) from the logits of its windows (see `run_windows`)."""
        threshold = self.artifact.null_threshold if null_threshold is None else float(null_threshold)
        spans, null = decode(list(windows), list(starts), list(ends), max_answer_length, top_k)
        best = spans[0].score if spans else float("-inf")
        diff = null - best
        out = [Answer(context[sp.start : sp.end], sp.start, sp.end, sp.score, False, null - sp.score) for sp in spans]
        if diff > threshold:
            out = [Answer("", 0, 0, null, True, diff)] + out[: top_k - 1]
        return out[:top_k] if top_k > 1 else out[0]

    def answer_batch(
        self,
        pairs: Sequence[tuple[str, str]],
        batch_size: int = 32,
        top_k: int = 1,
        max_answer_length: int = 30,
        null_threshold: float | None = None,
    ) -> list:
        """Answer many (question, context) pairs, in input order; windows run `batch_size` at a time, packed."""
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
            raise TypeError("pairs must be a sequence of (question, context) tuples")
        if batch_size < 1 or top_k < 1 or max_answer_length < 1:
            raise ValueError("batch_size, top_k and max_answer_length must be >= 1")
        per_pair: list[list[Window]] = []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"pairs[{i}] must be a (question, context) tuple")
            per_pair.append(self.windows.windows(pair[0], pair[1]))
        starts, ends = self.run_windows([w for ws in per_pair for w in ws], batch_size)
        results, k = [], 0
        for (_, context), ws in zip(pairs, per_pair):
            n = len(ws)
            results.append(
                self.decode_answers(
                    context, ws, starts[k : k + n], ends[k : k + n], top_k, max_answer_length, null_threshold
                )
            )
            k += n
        return results

    def answer(
        self,
        question: str,
        context: str,
        top_k: int = 1,
        max_answer_length: int = 30,
        null_threshold: float | None = None,
    ) -> Answer | list[Answer]:
        """Best answer (or the `top_k` best as a list) to `question` in `context`."""
        return self.answer_batch([(question, context)], 32, top_k, max_answer_length, null_threshold)[0]


def _chunks(windows: Sequence[Window], batch_size: int, max_tokens: int | None) -> Iterator[Sequence[Window]]:
    """Consecutive runs of `windows`, each at most `batch_size` windows and `max_tokens` tokens (never empty)."""
    start, tokens = 0, 0
    for i, w in enumerate(windows):
        n = len(w.input_ids)
        if i > start and (i - start == batch_size or (max_tokens is not None and tokens + n > max_tokens)):
            yield windows[start:i]
            start, tokens = i, 0
        tokens += n
    if start < len(windows):
        yield windows[start:]
