"""QAEngine.answer / answer_batch: exact offsets on hard Unicode, long contexts, SQuAD 2.0 null rule, errors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from engine.build_model import build
from engine.decode import decode
from engine.features import Window, WindowMaker, WindowSettings, load_tokenizer, span_labels
from engine.qa import Answer, QAEngine

SETTINGS = WindowSettings(max_seq_length=64, doc_stride=16, max_query_length=16)
CONTEXTS = [
    "Café Müller in São Paulo was founded by Zoë Ångström in 1921, naïvely.",
    "The accent is combining: Cafe\u0301 and nai\u0308ve and e\u0301le\u0300ve appear here.",
    "東京は日本の首都です。 The capital of Japan is Tokyo (東京), population 14 million.",
    "Emoji 😀🎉 and flags 🇫🇷 and family 👨‍👩‍👧 sit between words 🙂 here.",
    "Runs   of\t\twhitespace\n\n\nand\u00a0non-breaking\u2003spaces   remain    intact.",
    "Control\u0000chars\u0007and zero\u200bwidth joiners are odd\ufeff but legal.",
]


@pytest.fixture(scope="module")
def engine(minilm, tmp_path_factory) -> QAEngine:
    return QAEngine.load(build(minilm, tmp_path_factory.mktemp("qa") / "a", settings=SETTINGS), backend="torch")


def _check(a: Answer, context: str) -> None:
    assert context[a.start : a.end] == a.text
    if a.no_answer:
        assert (a.text, a.start, a.end) == ("", 0, 0)
    else:
        assert 0 <= a.start < a.end <= len(context)


@pytest.mark.parametrize("context", CONTEXTS)
def test_offsets_exact_on_unicode(engine, context):
    answers = engine.answer("Who or what is it?", context, top_k=8, null_threshold=float("inf"))
    assert len(answers) >= 2 and not any(a.no_answer for a in answers)
    for a in answers:
        _check(a, context)
    # Every context token's offsets delimit real characters of the context.
    for w in engine.windows.windows("q", context):
        for off in w.offsets:
            if off is not None:
                assert 0 <= off[0] < off[1] <= len(context) and context[off[0] : off[1]].strip()


def test_long_context_windows_cover_everything(engine):
    words = [f"word{i % 97}" for i in range(50 * SETTINGS.max_seq_length)]
    context = " ".join(words) + " The treasure is buried under the old oak tree."
    windows = engine.windows.windows("Where is the treasure?", context)
    assert len(windows) > 50
    assert all(len(w.input_ids) <= SETTINGS.max_seq_length for w in windows)
    covered = {off for w in windows for off in w.offsets if off is not None}
    _, all_offsets = engine.windows.encode(context)
    assert covered == set(all_offsets)
    a = engine.answer("Where is the treasure?", context, null_threshold=float("inf"))
    _check(a, context)


def test_windows_match_hf_overflow(minilm):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(minilm))
    wm = WindowMaker(load_tokenizer(minilm), "bert", WindowSettings(80, 20, 40))
    q, c = "Who founded Café Müller?", " ".join(CONTEXTS * 3)
    ours = wm.windows(q, c)
    enc = hf(q, c, truncation="only_second", max_length=80, stride=20, return_overflowing_tokens=True)
    assert [w.input_ids for w in ours] == enc["input_ids"]
    assert [w.token_type_ids for w in ours] == enc["token_type_ids"]


def test_question_truncated_to_max_query_length(engine):
    long_q = " ".join(["why"] * 100)
    w = engine.windows.windows(long_q, CONTEXTS[0])[0]
    assert w.context_start == 1 + SETTINGS.max_query_length + 1


def _window(n_ctx: int, ctx_start: int = 3) -> Window:
    offsets = [None] * ctx_start + [(2 * i, 2 * i + 1) for i in range(n_ctx)] + [None]
    n = len(offsets)
    return Window([0] * n, [0] * n, offsets, ctx_start)


def test_decode_picks_best_span_across_windows_and_null_rule():
    w1, w2 = _window(6), _window(6)
    s1, e1, s2, e2 = (np.full(10, -5.0) for _ in range(4))
    s1[0], e1[0], s2[0], e2[0] = 1.0, 1.0, 3.0, 3.0  # null score = min over windows = 2
    s2[4], e2[6] = 4.0, 3.5  # window 2: tokens 4..6 -> ctx 1..3 -> chars 2..7
    s1[5], e1[4] = 9.0, 9.0  # end before start: invalid
    spans, null = decode([w1, w2], [s1, s2], [e1, e2], max_answer_length=30, top_k=1)
    assert null == 2.0 and (spans[0].start, spans[0].end, spans[0].score) == (2, 7, 7.5)
    spans, _ = decode([w1, w2], [s1, s2], [e1, e2], max_answer_length=2, top_k=1)
    assert spans[0].end - spans[0].start <= 3 and spans[0].score < 7.5  # 3-token span excluded


def test_null_threshold_semantics(engine):
    ctx = CONTEXTS[0]
    base = engine.answer("Who founded it?", ctx, null_threshold=float("inf"))
    assert not base.no_answer
    diff = base.null_score_diff
    never = engine.answer("Who founded it?", ctx, null_threshold=diff + 1e-3)
    always = engine.answer("Who founded it?", ctx, null_threshold=diff - 1e-3)
    assert not never.no_answer and always.no_answer
    _check(always, ctx)
    assert always.null_score_diff == pytest.approx(diff)
    k = engine.answer("Who founded it?", ctx, top_k=3, null_threshold=diff - 1e-3)
    assert k[0].no_answer and not k[1].no_answer and len(k) == 3


def test_answer_batch_order_and_batching(engine):
    pairs = [(f"Question {i}?", CONTEXTS[i % len(CONTEXTS)] * (1 + i % 4)) for i in range(9)]
    single = [engine.answer(q, c) for q, c in pairs]
    for bs in (1, 5, 32):
        batched = engine.answer_batch(pairs, batch_size=bs)
        for a, b in zip(single, batched):
            assert (a.text, a.start, a.end, a.no_answer) == (b.text, b.start, b.end, b.no_answer)
            assert a.score == pytest.approx(b.score, abs=1e-4)


def test_thread_safe(engine):
    pairs = [(f"What is item {i}?", CONTEXTS[i % len(CONTEXTS)]) for i in range(12)]
    want = [engine.answer(q, c) for q, c in pairs]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda p: engine.answer(*p), pairs))
    assert [(a.text, a.start) for a in got] == [(a.text, a.start) for a in want]


@pytest.mark.parametrize(
    "q, c, err",
    [
        ("", "context", ValueError),
        ("question", "", ValueError),
        ("   ", "context", ValueError),
        ("question", "  \n\t ", ValueError),
        (None, "context", TypeError),
        ("question", b"bytes", TypeError),
        ("question", 42, TypeError),
    ],
)
def test_bad_inputs(engine, q, c, err):
    with pytest.raises(err):
        engine.answer(q, c)


def test_forward_validation(engine):
    ids = torch.randint(5, 1000, (2, 10))
    with pytest.raises(ValueError, match="right-padded"):
        engine.forward(ids, torch.tensor([[0] * 5 + [1] * 5] * 2))
    with pytest.raises(ValueError, match="shape"):
        engine.forward(ids, torch.ones(2, 9))
    with pytest.raises(ValueError, match="vocab|lie in"):
        engine.forward(ids + 10**6, torch.ones_like(ids))
    with pytest.raises(ValueError, match="positions"):
        engine.forward(torch.ones(1, 600, dtype=torch.long), torch.ones(1, 600, dtype=torch.long))


def test_forward_padded_matches_unpadded(engine):
    """The no-padding fast path (reshapes, arange cu_seqlens) and the packing path give the same logits."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 1000, (3, 12), generator=gen)
    types = (torch.arange(12) >= 5).long().expand(3, 12)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    s_pad, e_pad = engine.forward(ids, mask, types)
    for row, n in ((0, 12), (1, 7), (2, 12)):
        s, e = engine.forward(ids[row : row + 1, :n], torch.ones(1, n, dtype=torch.long), types[row : row + 1, :n])
        torch.testing.assert_close(s_pad[row, :n], s[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(e_pad[row, :n], e[0], atol=1e-5, rtol=0)
    assert torch.isinf(s_pad[1, 7:]).all() and torch.isinf(e_pad[1, 7:]).all()
    s, e = engine.forward(ids, mask, types)  # the same call twice: deterministic
    torch.testing.assert_close(s, s_pad, atol=0, rtol=0)
    s0, e0 = engine.forward(ids[:, :0], mask[:, :0])
    assert s0.shape == (3, 0) and e0.shape == (3, 0)


def test_backend_selection_errors(engine):
    with pytest.raises(ValueError, match="unknown backend 'nope'.*torch"):
        QAEngine.load(engine.artifact.path, backend="nope")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            QAEngine.load(engine.artifact.path, device="cuda", backend="triton")
    assert QAEngine.load(engine.artifact.path, backend="auto").backend_name in ("cpp", "torch")


def test_span_labels_round_trip(engine):
    ctx = CONTEXTS[0]
    start = ctx.index("Zoë Ångström")
    w = engine.windows.windows("Who founded it?", ctx)[0]
    s, e = span_labels(w, start, start + len("Zoë Ångström"))
    assert ctx[w.offsets[s][0] : w.offsets[e][1]] == "Zoë Ångström"
    assert span_labels(w, len(ctx) + 5, len(ctx) + 9) == (0, 0)
