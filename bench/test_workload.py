"""Real-workload benchmark: every question of the official SQuAD 2.0 dev set, end to end (tokenize, run, decode).

SparseQA's `QAEngine.answer_batch` against an HF pipeline-style baseline on the same weights: HF tokenizer with
truncation + stride overflow windows, padded batches of windows through `AutoModelForQuestionAnswering` (the
masked-HF reference for ragged models, so the baseline pays dense cost), and a start/end span search with the CLS
null score. Calls carry 1 question (windows run one at a time) or 32 questions (windows run 32 at a time).
`extra_info` records questions/s and p50/p99 per-call latency (per question at batch 1, per 32 questions at 32).

Run: `pytest bench/test_workload.py` (skips when the dev set is absent: ../shared/data or $SPARSEQA_DATA).
`SPARSEQA_WORKLOAD_LIMIT=N` keeps the first N questions for a quick run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.common import ROOT, THREADS, ModelUnderTest, cpu_name, minilm
from engine.data.squad import read_squad_json
from engine.features import WindowSettings

BATCHES = [1, 32]
MAX_ANSWER_LENGTH = 30


def _dev_path() -> Path | None:
    env = os.environ.get("SPARSEQA_DATA")
    for cand in ([Path(env), Path(env) / "squad2" / "dev-v2.0.json.gz"] if env else []) + [
        ROOT.parent / "shared" / "data" / "squad2" / "dev-v2.0.json.gz"
    ]:
        if cand.is_file():
            return cand
    return None


@pytest.fixture(scope="module")
def questions() -> list[tuple[str, str]]:
    """(question, context) pairs of the dev set in file order, capped by SPARSEQA_WORKLOAD_LIMIT."""
    path = _dev_path()
    if path is None:
        pytest.skip("SQuAD 2.0 dev set not found (../shared/data/squad2/dev-v2.0.json.gz or $SPARSEQA_DATA)")
    data = read_squad_json(path)["data"]
    pairs = [(qa["question"], para["context"]) for art in data for para in art["paragraphs"] for qa in para["qas"]]
    limit = os.environ.get("SPARSEQA_WORKLOAD_LIMIT")
    return pairs[: int(limit)] if limit and int(limit) > 0 else pairs  # 0 or unset: every question


class HFPipelineQA:
    """HF-pipeline-style extractive QA: overflow windows, padded window batches, argmax-style span decoding."""

    def __init__(self, m: ModelUnderTest, settings: WindowSettings, null_threshold: float):
        from transformers import AutoTokenizer

        from engine.checkpoint import load_checkpoint
        from engine.reference import masked_hf_model
        from engine.spec import parse_spec

        self.tok = AutoTokenizer.from_pretrained(str(m.src))
        spec = parse_spec(m.spec, load_checkpoint(m.src).cfg) if m.spec else None
        self.model = masked_hf_model(m.src, spec, "sdpa")  # sdpa: transformers' default attention
        self.settings = settings
        self.null_threshold = null_threshold

    def answer_batch(self, pairs: list[tuple[str, str]], batch_size: int) -> list[str]:
        """Answer texts ("" = no answer), in input order."""
        enc = self.tok(
            [q for q, _ in pairs],
            [c for _, c in pairs],
            truncation="only_second",
            max_length=self.settings.max_seq_length,
            stride=self.settings.doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding="longest",
            return_tensors="pt",
        )
        owner = enc["overflow_to_sample_mapping"].tolist()
        feed = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        starts, ends = [], []
        with torch.inference_mode():
            for i in range(0, len(owner), batch_size):
                width = int(feed["attention_mask"][i : i + batch_size].sum(1).max())  # pad to this batch's longest
                out = self.model(**{k: v[i : i + batch_size, :width] for k, v in feed.items()})
                starts += list(out.start_logits.float().numpy())
                ends += list(out.end_logits.float().numpy())
        best: list[tuple[float, int, int]] = [(-np.inf, 0, 0)] * len(pairs)
        null = [np.inf] * len(pairs)
        for w, (s, e) in enumerate(zip(starts, ends)):
            ex = owner[w]
            null[ex] = min(null[ex], float(s[0] + e[0]))
            ctx = np.array([sid == 1 for sid in enc.sequence_ids(w)][: len(s)])
            s_c, e_c = np.where(ctx, s, -np.inf), np.where(ctx, e, -np.inf)
            scores = s_c[:, None] + e_c[None, :]  # (start, end)
            n = len(s)
            i, j = np.indices((n, n))
            scores[(j < i) | (j - i >= MAX_ANSWER_LENGTH)] = -np.inf
            k = int(np.argmax(scores))
            a, b = divmod(k, n)
            if scores[a, b] > best[ex][0]:
                offsets = enc["offset_mapping"][w]
                best[ex] = (float(scores[a, b]), int(offsets[a][0]), int(offsets[b][1]))
        return [
            "" if nl - sc > self.null_threshold else pairs[x][1][st:en]
            for x, ((sc, st, en), nl) in enumerate(zip(best, null))
        ]


_RUNNERS: dict = {}


def _runner(provider: str, kind: str):
    """(callable(pairs, batch_size) -> answers, backend name); one model in memory at a time."""
    key = (provider, kind)
    if key not in _RUNNERS:
        _RUNNERS.clear()
        from engine.artifact import load_artifact
        from engine.qa import QAEngine

        m = minilm(kind)
        if provider == "engine":
            eng = QAEngine.load(m.artifact, threads=THREADS)
            _RUNNERS[key] = (
                lambda p, b: eng.answer_batch(p, batch_size=b, max_answer_length=MAX_ANSWER_LENGTH),
                eng.backend_name,
            )
        else:
            art = load_artifact(m.artifact)  # the same window settings and null threshold as the engine
            hf = HFPipelineQA(m, art.tokenizer.settings, art.null_threshold)
            _RUNNERS[key] = (hf.answer_batch, f"transformers-{hf.model.config._attn_implementation}")
    return _RUNNERS[key]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("kind", ["dense", "half"])
@pytest.mark.parametrize("provider", ["engine", "hf-pipeline"])
def test_squad_dev_workload(benchmark, questions, provider, kind, batch):
    torch.set_num_threads(THREADS)
    run, backend = _runner(provider, kind)
    run(questions[: 2 * batch], batch)  # warm up allocators and lazy init outside the timed round
    latencies: list[float] = []

    def whole_set() -> list:
        answers = []
        for i in range(0, len(questions), batch):
            t0 = time.perf_counter()
            answers += run(questions[i : i + batch], batch)
            latencies.append(time.perf_counter() - t0)
        return answers

    benchmark.group = f"squad2-dev minilm-{kind} batch {batch}"
    answers = benchmark.pedantic(whole_set, rounds=1, iterations=1, warmup_rounds=0)
    assert len(answers) == len(questions)
    texts = [a if isinstance(a, str) else a.text for a in answers]
    lat_ms = np.array(latencies) * 1e3
    benchmark.extra_info.update(
        provider=provider,
        backend=backend,
        model=f"minilm-{kind}",
        batch=batch,
        questions=len(questions),
        calls=len(latencies),
        questions_per_s=len(questions) / float(np.sum(latencies)),
        p50_ms=float(np.percentile(lat_ms, 50)),
        p99_ms=float(np.percentile(lat_ms, 99)),
        latency_unit="per question" if batch == 1 else f"per call of {batch} questions",
        no_answer_rate=sum(1 for t in texts if not t) / len(texts),
        device=cpu_name(),
        threads=THREADS,
        dtype="float32",
    )
