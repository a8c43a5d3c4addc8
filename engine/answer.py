"""`python -m engine.answer [ARTIFACT] --question Q (--context TEXT | --context-file F)`: print the answer as JSON.

Without ARTIFACT it answers with the bundled model (models/DEFAULT; $SPARSEQA_MODEL overrides)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.defaults import default_model
from engine.manifest import ArtifactError


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m engine.answer", description=__doc__)
    p.add_argument(
        "artifact",
        nargs="?",
        help="engine artifact directory (from python -m engine.build_model); default: the bundled model",
    )
    p.add_argument("--question", required=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--context", help="context text")
    g.add_argument("--context-file", help="UTF-8 file holding the context")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--max-answer-length", type=int, default=30, help="longest answer in tokens")
    p.add_argument("--null-threshold", type=float, help="override the artifact's null threshold")
    p.add_argument("--backend", default="auto", help="auto, torch, cpp or triton")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)
    a = p.parse_args(argv)
    from engine.qa import QAEngine

    try:
        context = a.context if a.context is not None else Path(a.context_file).read_text(encoding="utf-8")
        eng = QAEngine.load(a.artifact or default_model(), device=a.device, backend=a.backend, threads=a.threads)
        res = eng.answer(
            a.question, context, top_k=a.top_k, max_answer_length=a.max_answer_length, null_threshold=a.null_threshold
        )
    except (ValueError, TypeError, OSError, RuntimeError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = [r.to_dict() for r in res] if isinstance(res, list) else res.to_dict()
    print(json.dumps(out, ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
