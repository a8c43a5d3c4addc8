"""Where the bundled default QA model lives: `models/<name>/`, with `<name>` read from the one-line `models/DEFAULT`.

The bundled model is an engine artifact (written by `python -m engine.build_model`), e.g.
`models/minilm-l6-squad2-pruned/` with `models/DEFAULT` holding `minilm-l6-squad2-pruned`. `$SPARSEQA_MODEL`
(an artifact directory) overrides it. See docs/ARTIFACT.md, "The bundled default model".
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.manifest import MANIFEST

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"  # the bundled models' folder; models/DEFAULT names the default one
DEFAULT_FILE = "DEFAULT"
ENV_VAR = "SPARSEQA_MODEL"  # an artifact directory used instead of the bundled model
MAX_BUNDLE_MB = 25.0  # size budget of a bundled artifact on disk (10^6 bytes)

HOW_TO_GET = (
    "build one with `python -m engine.build_model --model <QA checkpoint> --out models/<name>` "
    "(a fine-tuned or pruned SQuAD 2.0 checkpoint; scripts/reproduce_squad.sh trains them), write <name> into "
    "models/DEFAULT, or point $SPARSEQA_MODEL at any engine artifact (docs/ARTIFACT.md, 'The bundled default model')"
)


class NoDefaultModel(FileNotFoundError):
    """The bundled default model (or the artifact $SPARSEQA_MODEL names) is absent; the message says how to get one."""


def default_model_name(models: Path | None = None) -> str | None:
    """The bundled model's directory name from `models/DEFAULT`, or None when that file is absent."""
    path = (models or MODELS) / DEFAULT_FILE
    if not path.is_file():
        return None
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(lines) != 1 or "/" in lines[0] or "\\" in lines[0] or lines[0] in (".", ".."):
        raise NoDefaultModel(
            f"{path} must hold exactly one line, the name of a directory next to it "
            f"(e.g. minilm-l6-squad2-pruned), got {lines!r}"
        )
    return lines[0]


def _bundled(models: Path | None) -> Path | None:
    models = models or MODELS
    name = default_model_name(models)
    return None if name is None else models / name


try:  # a malformed models/DEFAULT must not break imports: default_model() reports it
    DEFAULT_MODEL: Path | None = _bundled(None)  # models/<the name in models/DEFAULT>; None when nothing is bundled
except NoDefaultModel:
    DEFAULT_MODEL = None


def default_model(models: Path | None = None) -> Path:
    """The default artifact directory: $SPARSEQA_MODEL, else the bundled one; raises NoDefaultModel naming the fix."""
    env, models = os.environ.get(ENV_VAR), models or MODELS
    if env:
        path, where = Path(env), f"${ENV_VAR} is set, but"
    else:
        bundled = _bundled(models)
        if bundled is None:
            raise NoDefaultModel(f"no bundled model: {models / DEFAULT_FILE} is absent. To get one, {HOW_TO_GET}")
        path, where = bundled, f"{models / DEFAULT_FILE} names {bundled.name}, but"
    if not is_artifact(path):
        raise NoDefaultModel(f"{where} {path} is not an engine artifact (no {MANIFEST}). To get one, {HOW_TO_GET}")
    return path


def is_artifact(path: str | Path) -> bool:
    """Whether `path` is an engine artifact directory (holds engine.json) rather than a checkpoint."""
    return (Path(path) / MANIFEST).is_file()
