"""QAEngine.load reads the weights once (issue #16): the manifest and tensor header in Python, the values by the
backend (the cpp backend reads the file in C++); Artifact.state reads and checks them on first use.

Skips when engine._C is not built.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

_C = pytest.importorskip("engine._C", reason="engine._C is not built (C++ toolchain or deps missing at install)")

from engine.artifact import load_artifact
from engine.build_model import build
from engine.features import WindowSettings
from engine.manifest import ArtifactError
from engine.qa import QAEngine


@pytest.fixture(scope="module")
def artifact(tiny_bert, tmp_path_factory) -> Path:
    settings = WindowSettings(max_seq_length=64, doc_stride=16, max_query_length=16)  # the tiny model's 128 positions
    return build(tiny_bert, tmp_path_factory.mktemp("once") / "a", settings=settings)


def _with_nan(artifact: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "nan"
    shutil.copytree(artifact, bad)
    t = load_file(str(bad / "weights.safetensors"))
    t["layers.1.ffn_in.weight"][0, 0] = float("nan")
    save_file(t, str(bad / "weights.safetensors"))
    return bad


def test_cpp_backend_leaves_the_python_state_unread(artifact):
    qa = QAEngine.load(artifact, backend="cpp")
    assert qa.artifact._state is None  # the C++ engine read the weights; Python holds no copy
    eager = load_artifact(artifact)
    assert set(qa.artifact.state) == set(eager.state)  # read on first use, same tensors
    assert all(torch.equal(qa.artifact.state[k], v) for k, v in eager.state.items())


def test_torch_backend_reads_the_state_once(artifact):
    qa = QAEngine.load(artifact, backend="torch")
    assert qa.artifact._state is not None


def test_values_are_still_checked_by_every_path(artifact, tmp_path):
    bad = _with_nan(artifact, tmp_path)
    with pytest.raises(ArtifactError, match="NaN or inf"):
        load_artifact(bad)  # eager (the default)
    lazy = load_artifact(bad, weights=False)  # header only: fine
    with pytest.raises(ArtifactError, match="NaN or inf"):
        lazy.state  # noqa: B018
    with pytest.raises(ArtifactError, match="NaN or inf"):
        QAEngine.load(bad, backend="torch")
    with pytest.raises(_C.Error, match="NaN or inf"):
        QAEngine.load(bad, backend="cpp")


def test_header_is_checked_without_reading(artifact, tmp_path):
    bad = tmp_path / "shape"
    shutil.copytree(artifact, bad)
    t = load_file(str(bad / "weights.safetensors"))
    t["qa.bias"] = torch.zeros(3)
    save_file(t, str(bad / "weights.safetensors"))
    with pytest.raises(ArtifactError, match="'qa.bias' has shape"):
        load_artifact(bad, weights=False)
