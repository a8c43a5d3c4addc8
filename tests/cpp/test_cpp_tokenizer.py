"""The C++ WordPiece tokenizer equals HF `tokenizers` (ids and code-point offsets) on the whole SQuAD 2.0 dev set,
on hard synthetic Unicode, and on every Unicode code point, for uncased, lower-case-only and cased normalizers.
"""

from __future__ import annotations

import copy
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from tests.conftest import assert_same_tokens

_C = pytest.importorskip("engine._C", reason="engine._C is not built (C++ toolchain or deps missing at install)")

ROOT = Path(__file__).resolve().parents[2]
# (lowercase, strip_accents); None keeps the file's (uncased MiniLM: lowercase + strip accents)
VARIANTS = [(True, True), (True, False), (False, False)]
SYNTHETIC = [
    "Café naïve Ångström résumé façade São Zoë über",
    "Cafe\u0301 nai\u0308ve e\u0301le\u0300ve a\u0316\u0300 q\u0307\u0323 x\u20dd",  # combining marks, reordering
    "東京は日本の首都です。北京、上海；한국어 テスト 𠀋𪚲 豈 更",  # CJK, Hangul, kana, ext. B, compatibility
    "Emoji 😀🎉 🇫🇷 👨‍👩‍👧 🙂🏽 ♥️ 1️⃣ 🥲",
    "Control\u0000chars\u0007and\u001fzero\u200bwidth\u200d\ufeff\u00ad\ue000\U000f0000 end\ufffd",
    "Runs   of\t\twhitespace\n\n\nand\u00a0non-breaking\u2003spaces\u3000ideographic\u2028line\u0085nel\u000bvt",
    "İstanbul DİYARBAKIR ΣΊΣΥΦΟΣ ǅ ﬃ ß ẞ ǰ ΐ Ⅻ ⓐ",  # special casing
    "Punctuation!?¿¡—–‐‑‒ «quoted» „low“ ‹x› 〈y〉 ¶§ ※ ‽ ⁂ ؟ ، ۔ । ၊ ་",
    "x" * 99 + " " + "y" * 100 + " " + "z" * 101 + " " + "é" * 101 + " " + "ab" * 80,  # max_input_chars_per_word
    "unaffable antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "Special [CLS] tokens[SEP]in text [MASK][PAD] [UNK] [cls] [ SEP ]",
    "Numbers 3.14159 1,000,000 12th 1990s $5 €10 ¥20 50% #1 @home a/b c\\d",
    "",
    "   ",
]


@pytest.fixture(scope="module")
def tokenizer_files(minilm, tmp_path_factory) -> dict[tuple[bool, bool], Path]:
    """MiniLM's tokenizer.json, rewritten for each normalizer variant."""
    base = json.loads((minilm / "tokenizer.json").read_text(encoding="utf-8"))
    out = {}
    d = tmp_path_factory.mktemp("tok")
    for lower, strip in VARIANTS:
        j = copy.deepcopy(base)
        j["normalizer"]["lowercase"] = lower
        j["normalizer"]["strip_accents"] = strip
        p = d / f"tok_{int(lower)}{int(strip)}.json"
        p.write_text(json.dumps(j), encoding="utf-8")
        out[(lower, strip)] = p
    return out


def _pair(path: Path) -> tuple[Tokenizer, object]:
    hf = Tokenizer.from_file(str(path))
    hf.no_truncation()
    hf.no_padding()
    return hf, _C.WordPieceTokenizer(str(path))


@pytest.mark.parametrize("variant", VARIANTS, ids=["uncased", "lower_only", "cased"])
def test_synthetic_unicode(tokenizer_files, variant):
    assert_same_tokens(*_pair(tokenizer_files[variant]), SYNTHETIC)


@pytest.mark.parametrize("variant", VARIANTS, ids=["uncased", "lower_only", "cased"])
def test_every_code_point(tokenizer_files, variant):
    """Each code point alone, inside a word, doubled, and next to an accented capital."""
    hf, cpp = _pair(tokenizer_files[variant])
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    texts = [
        " ".join(f"a{chr(c)}b {chr(c)} X{chr(c)}{chr(c)}É" for c in cps[i : i + 256]) for i in range(0, len(cps), 256)
    ]
    assert_same_tokens(hf, cpp, texts)


def test_manifest_flags_override_the_file(tokenizer_files):
    hf, _ = _pair(tokenizer_files[(False, False)])
    cpp = _C.WordPieceTokenizer(str(tokenizer_files[(True, True)]), lowercase=False, strip_accents=False)
    assert_same_tokens(hf, cpp, SYNTHETIC)


def test_squad_dev_contexts_and_questions(tokenizer_files, squad_dev):
    hf, cpp = _pair(tokenizer_files[(True, True)])
    with gzip.open(squad_dev) as f:
        data = json.loads(f.read())
    texts = []
    for article in data["data"]:
        for p in article["paragraphs"]:
            texts.append(p["context"])
            texts += [q["question"] for q in p["qas"]]
    assert len(texts) > 13000
    assert_same_tokens(hf, cpp, texts)


def test_invalid_utf8_is_an_error(tokenizer_files):
    cpp = _C.WordPieceTokenizer(str(tokenizer_files[(True, True)]))
    with pytest.raises((TypeError, UnicodeEncodeError)):
        cpp.encode("lone surrogate \ud800")  # not representable as UTF-8: refused before reaching C++


def test_unicode_tables_match_installed_tokenizers(tmp_path):
    """csrc/src/unicode_tables.inc must be regenerated when the pinned tokenizers version changes."""
    out = tmp_path / "tables.inc"
    subprocess.run(
        [sys.executable, str(ROOT / "csrc" / "tools" / "gen_unicode_tables.py"), str(out)],
        check=True,
        capture_output=True,
    )
    committed = (ROOT / "csrc" / "src" / "unicode_tables.inc").read_text().splitlines()[1:]
    assert out.read_text().splitlines()[1:] == committed, (
        "HF tokenizers' character classes changed: run python csrc/tools/gen_unicode_tables.py and rebuild"
    )
