"""Int8 and bf16 artifacts on disk: static-scale calibration (its provenance, real dev text, bad files and flags),
malformed int8 artifacts, backends without the int8 kernels, and engine.evaluate on every precision."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.artifact import load_artifact
from engine.build_model import build, main
from engine.manifest import ArtifactError
from engine.qa import QAEngine
from tests.conftest import data_root
from tests.quant.helpers import (
    NEEDS_INT8,
    SMALL,
    synthetic_squad,
)

pytestmark = NEEDS_INT8


# ---- calibration -----------------------------------------------------------------------------------------------------


def test_static_artifact_layout_and_calibration_provenance(artifacts, squad_file):
    art = load_artifact(artifacts["bert", "int8s"])
    m = json.loads((artifacts["bert", "int8s"] / "engine.json").read_text())
    assert m["format_version"] == 2 and m["dtype"] == "int8"
    assert m["quantization"]["kernels"] == ["int8_gemm_static"]
    cal = m["quantization"]["calibration"]
    assert cal["examples"] == 8 and cal["windows"] >= 8 and cal["tokens"] > 0 and cal["file"].endswith("squad.json")
    for name, shape in (("layers.0.qkv", (3 * 16, 32)), ("layers.0.ffn_out", (32, 37)), ("layers.1.o", (32, 0))):
        assert art.state[name + ".weight"].dtype == torch.int8 and tuple(art.state[name + ".weight"].shape) == shape
        assert art.state[name + ".weight_scale"].shape == (shape[0],)
        assert art.state[name + ".input_scale"].shape == (shape[1],)
    dyn = json.loads((artifacts["bert", "int8"] / "engine.json").read_text())
    assert dyn["quantization"]["kernels"] == ["int8_gemm_per_token"] and dyn["quantization"]["calibration"] is None
    assert not any(k.endswith("input_scale") for k in load_artifact(artifacts["bert", "int8"]).state)
    assert json.loads((artifacts["bert", "bfloat16"] / "engine.json").read_text())["format_version"] == 1


def test_calibration_on_real_dev_text(tiny_bert, tmp_path):
    root = data_root()
    dev = root / "squad2" / "dev-v2.0.json.gz" if root else None
    if dev is None or not dev.is_file():
        pytest.skip("real SQuAD 2.0 dev set not found")
    out = build(tiny_bert, tmp_path / "a", dtype="int8", settings=SMALL, calibrate=dev, calib_samples=6)
    cal = json.loads((out / "engine.json").read_text())["quantization"]["calibration"]
    assert cal["examples"] == 6 and cal["windows"] >= 6  # real paragraphs need several 96-token windows
    eng = QAEngine.load(out, backend="torch")
    assert eng.answer("Who ruled Normandy?", "Rollo ruled Normandy in the 10th century.").start >= 0


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "content, samples, expect",
    [
        ({"version": "v2.0", "data": []}, 4, "holds no examples"),
        ({"data": [{"title": "t", "paragraphs": []}]}, 4, "holds no examples"),
        ({"rows": [1, 2]}, 4, "not in SQuAD format"),
        ({"data": [{"title": "t", "paragraphs": [{"text": "no context key"}]}]}, 4, "does not follow the SQuAD schema"),
        ([1, 2, 3], 4, "not in SQuAD format"),
        ("{broken", 4, "not a readable SQuAD JSON file"),
        (synthetic_squad(1), 0, "--calib-samples must be >= 1"),
    ],
)
def test_calibration_rejects_bad_files(tiny_bert, tmp_path, capsys, content, samples, expect):
    path = tmp_path / "cal.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    code, err = _cli(
        capsys,
        "--model",
        tiny_bert,
        "--out",
        tmp_path / "o",
        "--dtype",
        "int8",
        "--calibrate",
        path,
        "--calib-samples",
        samples,
        "--max-seq-length",
        96,
        "--doc-stride",
        16,
    )
    assert code == 2 and expect in err and err.count("\n") == 0, err
    assert not (tmp_path / "o").exists()


def test_calibration_flag_errors(tiny_bert, tmp_path, capsys, squad_file):
    base = ("--model", tiny_bert, "--out", tmp_path / "o", "--max-seq-length", 96, "--doc-stride", 16)
    code, err = _cli(capsys, *base, "--calibrate", squad_file)
    assert code == 2 and "--calibrate applies to --dtype int8 only" in err
    code, err = _cli(capsys, *base, "--dtype", "int8", "--calib-samples", 3)
    assert code == 2 and "--calib-samples needs --calibrate" in err
    code, err = _cli(capsys, *base, "--dtype", "int8", "--calibrate", tmp_path / "nope.json")
    assert code == 2 and "does not exist" in err


# ---- malformed int8 artifacts and kernels ----------------------------------------------------------------------------


def _edit(path, fn_manifest=None, fn_tensors=None):
    if fn_manifest:
        m = json.loads((path / "engine.json").read_text())
        fn_manifest(m)
        (path / "engine.json").write_text(json.dumps(m))
    if fn_tensors:
        t = load_file(str(path / "weights.safetensors"))
        fn_tensors(t)
        save_file(t, str(path / "weights.safetensors"))


def _set(d, key, value):
    d[key] = value


@pytest.mark.parametrize(
    "kind, manifest, tensors, expect",
    [
        ("int8", None, lambda t: t.pop("layers.0.o.weight_scale"), "tensor 'layers.0.o.weight_scale' is missing"),
        (
            "int8",
            None,
            lambda t: _set(t, "layers.2.ffn_in.weight_scale", torch.ones(2)),
            "'layers.2.ffn_in.weight_scale' has shape (2,), expected (1,)",
        ),
        ("int8", None, lambda t: _set(t, "layers.0.qkv.weight_scale", -torch.ones(48)), "must be positive and finite"),
        (
            "int8",
            None,
            lambda t: _set(t, "layers.0.qkv.input_scale", torch.ones(32)),
            "unexpected tensor 'layers.0.qkv.input_scale'",
        ),
        (
            "int8",
            None,
            lambda t: _set(t, "layers.0.o.weight", t["layers.0.o.weight"].float()),
            "'layers.0.o.weight' has dtype F32, expected I8",
        ),
        (
            "int8",
            None,
            lambda t: _set(t, "layers.0.o.bias", t["layers.0.o.bias"].to(torch.int8)),
            "'layers.0.o.bias' has dtype I8, expected F32",
        ),
        ("int8", None, lambda t: t["layers.0.qkv.weight"].view(-1).__setitem__(0, -128), "holds -128"),
        ("int8s", None, lambda t: t.pop("layers.2.ffn_out.input_scale"), "'layers.2.ffn_out.input_scale' is missing"),
        (
            "int8s",
            None,
            lambda t: _set(t, "layers.0.o.input_scale", torch.ones(32)),
            "'layers.0.o.input_scale' has shape (32,), expected (16,)",
        ),
        ("int8", lambda m: m.pop("quantization"), None, "missing field(s) ['quantization']"),
        ("int8", lambda m: _set(m, "format_version", 1), None, "dtype 'int8' needs format_version 2"),
        ("int8", lambda m: _set(m, "dtype", "float32"), None, "format_version 2 is for int8 artifacts"),
        (
            "int8",
            lambda m: _set(m["quantization"], "kernels", ["int4_gemm"]),
            None,
            "requires kernel(s) ['int4_gemm'] that this SparseQA does not know",
        ),
        (
            "int8",
            lambda m: _set(m["quantization"], "kernels", ["int8_gemm_static"]),
            None,
            "need kernels ['int8_gemm_per_token']",
        ),
        ("int8", lambda m: _set(m["quantization"], "activations", "per_tensor"), None, "activations is 'per_tensor'"),
        ("int8s", lambda m: _set(m["quantization"], "calibration", None), None, "need a 'calibration' object"),
        ("int8", lambda m: _set(m["quantization"], "weights", "int4_groupwise"), None, "weights is 'int4_groupwise'"),
        ("int8", lambda m: _set(m["quantization"], "extra", 1), None, "unknown key(s) ['extra']"),
    ],
)
def test_malformed_int8_artifacts(artifacts, tmp_path, kind, manifest, tensors, expect):
    path = tmp_path / "a"
    shutil.copytree(artifacts["bert", kind], path)
    _edit(path, manifest, tensors)
    with pytest.raises(ArtifactError) as ei:
        load_artifact(path)
    assert expect in str(ei.value)


def test_backend_without_int8_kernels_is_refused(artifacts, monkeypatch):
    import engine.runtime.cpp_backend as cb
    import engine.runtime.torch_backend as tb

    path = artifacts["bert", "int8"]
    if "triton" in __import__("engine.runtime", fromlist=["x"]).available_backends("cpu"):
        with pytest.raises(RuntimeError, match=r"needs kernel\(s\) \['int8_gemm_per_token'\]"):
            QAEngine.load(path, backend="triton")
    monkeypatch.setattr(tb, "supported_kernels", lambda device: frozenset())
    monkeypatch.setattr(cb, "supported_kernels", lambda device: frozenset())  # the cpp backend runs them too
    with pytest.raises(RuntimeError, match="provides the kernels"):
        QAEngine.load(path, backend="auto")
    with pytest.raises(RuntimeError, match="Backends that can: \\[\\]"):
        QAEngine.load(path, backend="torch")
    QAEngine.load(artifacts["bert", "bfloat16"], backend="torch")  # float artifacts need no special kernel


def test_evaluate_runs_bf16_and_int8_artifacts(artifacts, squad_file):
    from engine.evaluate import evaluate_artifact

    for kind in ("bfloat16", "int8", "int8s"):
        m = evaluate_artifact(artifacts["bert", kind], squad_file, backend="torch", progress=False)
        assert m["questions"] == 8 and m["backend"] == "torch" and 0 <= m["at_zero"]["f1"] <= 100
