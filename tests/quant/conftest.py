"""Fixtures of the precision tests: a synthetic SQuAD file, the ragged spec, and the tiny models in every precision."""

from __future__ import annotations

import json

import pytest

from tests.quant.helpers import RAGGED, precision_artifacts, synthetic_squad


@pytest.fixture(scope="module")
def squad_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("squad") / "tiny-squad.json"
    path.write_text(json.dumps(synthetic_squad()))
    return path


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "spec.json"
    path.write_text(json.dumps(RAGGED))
    return path


@pytest.fixture(scope="module")
def artifacts(tiny_bert, tiny_roberta, spec_file, squad_file, tmp_path_factory):
    """(arch, dtype) -> artifact dir; every model ragged with a 0-head/0-FFN layer. "int8s" = static scales."""
    return precision_artifacts(tiny_bert, tiny_roberta, spec_file, squad_file, tmp_path_factory.mktemp("quant_arts"))
