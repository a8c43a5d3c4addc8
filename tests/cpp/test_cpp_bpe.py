"""The C++ byte-level BPE equals HF `tokenizers` (ids and code-point offsets) and Engine.answer on RoBERTa artifacts
equals QAEngine.answer (torch backend).

Tokenizers: a tiny BPE trained here on mixed-script text, and the SQuAD-trained BPE of the real-weight RoBERTa
(bench/roberta.py: MiniLM's weights in RoBERTa form), each with add_prefix_space and trim_offsets on and off.
Texts: the whole SQuAD 2.0 dev set (every context and question), adversarial Unicode, every code point.
"""

from __future__ import annotations

import copy
import gzip
import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from bench.roberta import minilm_roberta_artifact, squad_texts, train_bpe
from engine.features import WindowSettings
from tests.conftest import assert_same_tokens

_C = pytest.importorskip("engine._C", reason="engine._C is not built (C++ toolchain or deps missing at install)")

VARIANTS = [(False, True), (True, True), (False, False), (True, False)]  # (add_prefix_space, trim_offsets)
VARIANT_IDS = ["roberta", "prefix_space", "no_trim", "prefix_space_no_trim"]
CORPUS = [
    "The Normans conquered England in 1066 after the Battle of Hastings; they didn't stop there.",
    "Café naïve Ångström résumé façade São Zoë über Straße — «quoted» text, ‘single’ and “double”.",
    "東京は日本の首都です。北京、上海；한국어 テスト 中文字符 漢字",
    "Emoji 😀🎉 🇫🇷 👨‍👩‍👧 🙂🏽 ♥️ 1️⃣ and more 😀😀😀",
    "العربية نص من اليمين إلى اليسار עברית שלום Ελληνικά Русский текст",
    "Numbers 3.14159 1,000,000 12th 1990s $5 €10 ¥20 50% #1 @home a/b c\\d",
]
ADVERSARIAL = [
    "Cafe\u0301 nai\u0308ve e\u0301le\u0300ve a\u0316\u0300 q\u0307\u0323 x\u20dd \u0301leading mark",  # combining marks  # noqa: E501
    "👨‍👩‍👧‍👦 🏳️‍🌈 👩🏽‍💻 🧑‍🤝‍🧑 ❤️‍🔥 🇺🇳🇫🇷 keycap 1️⃣#️⃣ tag 🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f",
    "東京は日本の首都です。北京、上海；한국어 テスト 𠀋𪚲 豈 更 ｆｕｌｌｗｉｄｔｈ　ｓｐａｃｅ",
    "RTL: العربية \u200fمرحبا\u200e mixed עברית 123 \u202eevil\u202c \u2067isolate\u2069 ؟ ،",
    "Control\u0000chars\u0007and\u001fzero\u200bwidth\u200d\ufeff\u00ad\ue000\U000f0000 end\ufffd\u0085nel\x7f",
    "NUL \x00\x00 in the middle\x00",
    'lone surrogates as escapes: \\ud800 \\udfff \\ud83d\\ude00 "\\uD800"',
    "Runs   of\t\twhitespace\n\n\nand\u00a0non-breaking\u2003spaces\u3000ideographic\u2028line \u000bvt\r\n",
    "Contractions: don't I'm you're we've they'll he'd it's 'S 'T 'RE ''s '''",
    "Special tokens: <s>inside</s> text <mask> <pad><unk> < s> </s></s> <s",
    "x" * 3000 + " " + "ab" * 2000 + " " + "é" * 700 + " " + "😀" * 300 + " " + "\u0301" * 500,  # very long words
    " leading space",
    "  two leading spaces",
    "trailing spaces   ",
    "\u3000ideographic first",
    "?!",
    "a",
    "",
    " ",
    "\n",
]


def _variant(base: dict, add_prefix_space: bool, trim_offsets: bool, path: Path, mask_lstrip: bool = False) -> Path:
    """`base` tokenizer.json with the pre-tokenizer / post-processor flags set (as RobertaTokenizerFast sets them)."""
    j = copy.deepcopy(base)
    j["pre_tokenizer"]["add_prefix_space"] = add_prefix_space
    j["post_processor"]["add_prefix_space"] = add_prefix_space
    j["post_processor"]["trim_offsets"] = trim_offsets
    for t in j["added_tokens"]:
        t["lstrip"] = mask_lstrip and t["content"] == "<mask>"  # roberta-base's <mask> takes the space before it
    path.write_text(json.dumps(j), encoding="utf-8")
    return path


def _variants(tokenizer_dir: Path, out: Path) -> dict[tuple[bool, bool], Path]:
    base = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    return {(p, t): _variant(base, p, t, out / f"tok_{int(p)}{int(t)}.json", mask_lstrip=p) for p, t in VARIANTS}


@pytest.fixture(scope="module")
def tiny_bpe(tmp_path_factory) -> dict[tuple[bool, bool], Path]:
    """A 700-entry byte-level BPE trained on mixed-script text, in each variant."""
    d = tmp_path_factory.mktemp("tiny_bpe")
    return _variants(train_bpe(CORPUS * 30, d / "tok", vocab_size=700), d)


@pytest.fixture(scope="module")
def dev_texts(squad_dev) -> list[str]:
    """Every context and question of the SQuAD 2.0 dev set."""
    return list(squad_texts(squad_dev))


@pytest.fixture(scope="module")
def squad_bpe_dir(squad_dev, tmp_path_factory) -> Path:
    """The real-weight RoBERTa's tokenizer: a byte-level BPE with <= 30,522 entries trained on SQuAD train text."""
    train = squad_dev.parent / "train-subset-v2.0.json.gz"
    if not train.is_file():
        pytest.skip(f"{train} not found (the SQuAD 2.0 train subset trains the RoBERTa BPE)")
    return train_bpe(list(squad_texts(train)), tmp_path_factory.mktemp("squad_bpe"))


def _pair(path: Path) -> tuple[Tokenizer, object]:
    hf = Tokenizer.from_file(str(path))
    hf.no_truncation()
    hf.no_padding()
    return hf, _C.ByteLevelBPETokenizer(str(path))


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_adversarial_text(tiny_bpe, variant):
    assert_same_tokens(*_pair(tiny_bpe[variant]), CORPUS + ADVERSARIAL)


def test_every_assigned_code_point(tiny_bpe):
    """Each code point after a letter and between a space and a digit: the regex classes and byte merges.

    Every code point of planes 0-3 and 14 (all assigned characters, tags and variation selectors), and every 97th of
    the unassigned planes 4-13 and the private-use planes 15-16. The classes do not depend on the variant, so one
    suffices (the adversarial tests run all four).
    """
    hf, cpp = _pair(tiny_bpe[(False, True)])
    cps = [
        c
        for c in range(0x110000)
        if not 0xD800 <= c <= 0xDFFF and (c < 0x40000 or 0xE0000 <= c < 0xF0000 or c % 97 == 0)
    ]
    texts = ["".join(f"a{chr(c)} {chr(c)}1" for c in cps[i : i + 1024]) for i in range(0, len(cps), 1024)]
    assert_same_tokens(hf, cpp, texts, check_bytes=False)


def test_random_fragments(tiny_bpe):
    """Random strings over a pool of hard characters (whitespace kinds, marks, ZWJ, quotes, specials)."""
    pool = list("aZ1 '\t\n\u3000\u00a0\u0301\u200d😀東é!?<>/s") + ["<s>", "</s>", "<mask>", "'s", "'ll", "  "]
    rng = random.Random(0)
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(3000)]
    for variant in VARIANTS:
        assert_same_tokens(*_pair(tiny_bpe[variant]), texts)


def test_added_tokens_normalized_lstrip_rstrip(tiny_bpe, tmp_path):
    """User-added tokens: normalized ones (second pass), lstrip/rstrip, and rstrip whitespace a next match reuses."""
    from tokenizers import AddedToken

    hf = Tokenizer.from_file(str(tiny_bpe[(True, True)]))
    hf.add_tokens(
        [
            AddedToken("the cat", normalized=True),
            AddedToken(" dog", normalized=True, rstrip=True),
            AddedToken("<x>", normalized=False, lstrip=True, rstrip=True),
        ]
    )
    path = tmp_path / "added.json"
    hf.save(str(path))
    texts = [
        "the cat sat",
        "a dog  barks",
        "x <x> y",
        "the cat<x>the cat",
        "  dog dog",
        "<x>",
        "xthe caty",
        "\u3000<x>\u3000 z",
        " dog\t dog  <x>  <x>the cat",
    ]
    pool = ["the cat", " dog", "<x>", " ", "\t", "\u3000", "a", "é", "'s"]
    rng = random.Random(1)
    texts += ["".join(rng.choice(pool) for _ in range(rng.randint(1, 12))) for _ in range(2000)]
    assert_same_tokens(*_pair(path), texts)


def test_fifty_thousand_character_contexts(tiny_bpe, dev_texts):
    long = [(" ".join(dev_texts[i::7]))[:50_000] for i in range(4)]
    assert all(len(t) == 50_000 for t in long)
    assert_same_tokens(*_pair(tiny_bpe[(False, True)]), long)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_squad_dev_with_the_real_weight_tokenizer(squad_bpe_dir, dev_texts, tmp_path, variant):
    """All 1,204 contexts and 11,873 questions of SQuAD 2.0 dev with the RoBERTa artifact's tokenizer."""
    assert len(dev_texts) == 1204 + 11873
    path = _variants(squad_bpe_dir, tmp_path)[variant]
    assert_same_tokens(*_pair(path), dev_texts + ADVERSARIAL)


def test_squad_dev_with_the_tiny_tokenizer(tiny_bpe, dev_texts):
    assert_same_tokens(*_pair(tiny_bpe[(False, True)]), dev_texts)


def test_invalid_input_is_an_error(tiny_bpe):
    cpp = _C.ByteLevelBPETokenizer(str(tiny_bpe[(False, True)]))
    with pytest.raises((TypeError, UnicodeEncodeError)):
        cpp.encode("lone surrogate \ud800")  # not representable as UTF-8: refused before reaching C++
    with pytest.raises(ValueError, match="not valid UTF-8"):
        cpp.encode(b"abc\xff")  # bytes reach C++ as they are


def test_unsupported_tokenizer_files_name_the_field(tiny_bpe, tmp_path):
    base = json.loads(tiny_bpe[(False, True)].read_text(encoding="utf-8"))
    cases = {
        "normalizer": ("normalizer", {"type": "NFC"}),
        "ByteLevel only": ("pre_tokenizer", {"type": "Whitespace"}),
        "dropout": ("model", {**base["model"], "dropout": 0.1}),
        "not a byte-level BPE": ("model", {**base["model"], "type": "WordPiece"}),
        "missing from the vocabulary": ("model", {**base["model"], "merges": [["Ġ", "zzz_not_there"]]}),
    }
    for message, (key, value) in cases.items():
        j = copy.deepcopy(base)
        j[key] = value
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(j), encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            _C.ByteLevelBPETokenizer(str(p))
    with pytest.raises(ValueError, match="missing"):
        _C.ByteLevelBPETokenizer(str(tmp_path / "absent.json"))


@pytest.fixture(scope="module")
def roberta_artifact(squad_bpe_dir, tmp_path_factory) -> Path:
    """MiniLM's weights as a RoBERTa artifact with the SQuAD-trained BPE (bench/roberta.py)."""
    return minilm_roberta_artifact(squad_bpe_dir, tmp_path_factory.mktemp("roberta_art") / "art", WindowSettings())


@pytest.mark.parametrize("questions", [40, pytest.param(500, marks=pytest.mark.slow)])
def test_engine_answer_equals_python_qaengine(roberta_artifact, squad_dev, questions):
    """Dev questions spread over the set: Engine.answer (C++) and QAEngine.answer (torch backend) give the same text
    and offsets. The 500-question run takes about 2 minutes on an idle 2-core machine (slow)."""
    from engine.qa import QAEngine

    with gzip.open(squad_dev, "rt", encoding="utf-8") as f:
        data = json.load(f)
    pairs = [(q["question"], p["context"]) for a in data["data"] for p in a["paragraphs"] for q in p["qas"]]
    pairs = pairs[:: len(pairs) // questions][:questions]
    assert len(pairs) == questions
    py = QAEngine.load(roberta_artifact, backend="torch")
    cpp = _C.Engine.load(str(roberta_artifact))
    assert cpp.architecture == "roberta"
    want = py.answer_batch(pairs, batch_size=16, null_threshold=1e9)  # always a span: compares the span choice
    near_ties = []
    for (question, context), w in zip(pairs, want):
        got = cpp.answer(question, context, null_threshold=1e9)
        assert got.score == pytest.approx(w.score, abs=1e-3)
        if (got.text, got.start, got.end) != (w.text, w.start, w.end):
            near_ties.append((question, got.text, w.text))  # same score within fp32 noise: another span
            continue
        assert context[got.start : got.end] == got.text
        assert got.null_score_diff == pytest.approx(w.null_score_diff, abs=1e-3)
    print(f"\n{questions} questions: {questions - len(near_ties)} identical answers, {len(near_ties)} near-ties")
    assert len(near_ties) <= 2, near_ties


def test_engine_tokenize_uses_the_bpe(roberta_artifact, squad_bpe_dir):
    cpp = _C.Engine.load(str(roberta_artifact))
    hf = Tokenizer.from_file(str(roberta_artifact / "tokenizer.json"))
    text = "Where did the Normans settle? In Normandy, 911 — café 😀."
    ids, offsets, _bytes = cpp.tokenize(text)
    enc = hf.encode(text, add_special_tokens=False)
    assert ids == enc.ids and offsets == [tuple(o) for o in enc.offsets]
