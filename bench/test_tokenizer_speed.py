"""Byte-level BPE speed: libqaengine's C++ tokenizer against HF `tokenizers` (Rust), one thread each.

Work: every context of the SQuAD 2.0 dev set (1,204 texts), with the real-weight RoBERTa's tokenizer
(bench/roberta.py: byte-level BPE trained on SQuAD train text, <= 30,522 entries). Both sides run from Python and
hand back ids and offsets as Python lists (HF: `encode(...).ids/.offsets`; C++: `encode` -> ids, code-point and byte
offsets), so each pass includes the same kind of binding cost. The two passes alternate in every round of one process,
so load from other jobs hits both alike; `extra_info` holds both medians and `speed_vs_hf` = HF time / C++ time
(target >= 0.8).

Run: `pytest bench/test_tokenizer_speed.py --benchmark-json=bench/results/tokenizer.json` (part of `make bench`).
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # HF single-threaded (encode() is anyway; set before import)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import statistics
import time
from pathlib import Path

import pytest

from bench.common import CACHE, cpu_name
from bench.roberta import squad_texts, train_bpe

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 7


def _data(name: str) -> Path:
    for root in (os.environ.get("SPARSEQA_DATA"), ROOT.parent / "shared" / "data"):
        if root and (Path(root) / "squad2" / name).is_file():
            return Path(root) / "squad2" / name
    pytest.skip(f"squad2/{name} not found (set SPARSEQA_DATA or provide ../shared/data)")


@pytest.fixture(scope="module")
def contexts() -> list[str]:
    """The 1,204 distinct contexts of SQuAD 2.0 dev (each is followed by its questions in squad_texts)."""
    import gzip
    import json

    with gzip.open(_data("dev-v2.0.json.gz"), "rt", encoding="utf-8") as f:
        data = json.load(f)
    return [p["context"] for a in data["data"] for p in a["paragraphs"]]


@pytest.fixture(scope="module")
def tokenizer_json() -> Path:
    """The real-weight RoBERTa's tokenizer, trained once per machine into build/bench-artifacts."""
    out = CACHE / "roberta-squad-bpe"
    if not (out / "tokenizer.json").is_file():
        train_bpe(list(squad_texts(_data("train-subset-v2.0.json.gz"))), out)
    return out / "tokenizer.json"


def test_bpe_speed_vs_hf_tokenizers(benchmark, contexts, tokenizer_json):
    _C = pytest.importorskip("engine._C", reason="engine._C is not built")
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tokenizer_json))
    cpp = _C.ByteLevelBPETokenizer(str(tokenizer_json))
    times: dict[str, list[float]] = {"hf": [], "cpp": []}
    tokens: dict[str, int] = {}

    def hf_pass() -> int:
        encs = [hf.encode(c, add_special_tokens=False) for c in contexts]
        return sum(len(e.ids) + len(e.offsets) for e in encs) // 2

    def cpp_pass() -> int:
        return sum(len(cpp.encode(c)[0]) for c in contexts)

    def one_round() -> None:
        for name, fn in (("hf", hf_pass), ("cpp", cpp_pass)):
            t0 = time.perf_counter()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - t0)

    benchmark.group = "byte-level BPE, SQuAD 2.0 dev contexts, 1 thread"
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert tokens["hf"] == tokens["cpp"]
    hf_s, cpp_s = statistics.median(times["hf"][1:]), statistics.median(times["cpp"][1:])  # [0]: warm-up round
    chars = sum(len(c) for c in contexts)
    benchmark.extra_info.update(
        work="SQuAD 2.0 dev contexts",
        texts=len(contexts),
        chars=chars,
        tokens=tokens["cpp"],
        threads=1,
        device=cpu_name(),
        hf_median_s=hf_s,
        cpp_median_s=cpp_s,
        hf_chars_per_s=chars / hf_s,
        cpp_chars_per_s=chars / cpp_s,
        speed_vs_hf=hf_s / cpp_s,
        rounds=ROUNDS,
        note="benchmark stats time one round = one HF pass + one C++ pass, interleaved",
    )
    print(
        f"\nHF tokenizers {hf_s * 1e3:.1f} ms, C++ {cpp_s * 1e3:.1f} ms per pass over {len(contexts)} contexts "
        f"({chars} chars): C++ runs at {hf_s / cpp_s:.2f}x HF's speed"
    )
