"""Artifact round-trip and every bad-input case of the artifact loader and build_model CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.artifact import load_artifact
from engine.build_model import build, main
from engine.features import WindowSettings
from engine.manifest import ArtifactError
from engine.qa import QAEngine

SMALL = WindowSettings(96, 16, 24)


@pytest.fixture(scope="module")
def artifact(tiny_bert, tmp_path_factory):
    return build(
        tiny_bert,
        tmp_path_factory.mktemp("art") / "a",
        settings=SMALL,
        spec=_spec_file(tmp_path_factory.mktemp("spec")),
    )


def _spec_dict():
    return {"layers": [{"heads": [3, 1]}, {"heads": [], "ffn": []}, {"ffn": [0]}]}


def _spec_file(d):
    p = d / "spec.json"
    p.write_text(json.dumps(_spec_dict()))
    return p


def _copy(artifact, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def test_round_trip(artifact, tiny_bert):
    from engine.checkpoint import load_checkpoint
    from engine.spec import apply_spec, parse_spec

    art = load_artifact(artifact)
    ck = load_checkpoint(tiny_bert)
    cfg, state = apply_spec(ck.state, ck.cfg, parse_spec(_spec_dict(), ck.cfg))
    assert art.cfg == cfg and art.cfg.heads == (2, 0, 4) and art.cfg.ffn == (37, 0, 1)
    assert set(art.state) == set(state)
    assert all(torch.equal(art.state[k], state[k]) for k in state)
    assert art.tokenizer.settings == SMALL and art.tokenizer.do_lower_case is True
    assert art.null_threshold == 0.0


def _edit_manifest(path, **changes):
    m = json.loads((path / "engine.json").read_text())
    for k, v in changes.items():
        if v is KeyError:
            m.pop(k)
        else:
            m[k] = v
    (path / "engine.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "case, expect",
    [
        ("no_manifest", "engine.json is missing"),
        ("bad_json", "not valid JSON"),
        ("wrong_format", "field 'format'"),
        ("newer_version", "newer SparseQA"),
        ("missing_field", "missing field(s) ['dtype']"),
        ("unknown_field", "unknown field(s) ['extra']"),
        ("bad_dtype", "field 'dtype'"),
        ("bad_config", "field 'config'"),
        ("heads_mismatch", "has shape"),
        ("missing_tokenizer", "tokenizer file"),
        ("missing_weights", "weights file"),
        ("truncated_weights", "not a readable safetensors file"),
        ("garbage_weights", "not a readable safetensors file"),
        ("missing_tensor", "tensor 'qa.bias' is missing"),
        ("extra_tensor", "unexpected tensor 'bogus'"),
        ("wrong_shape", "'layers.0.o.weight' has shape"),
        ("wrong_dtype", "dtype F16, expected F32"),
        ("nan_weight", "NaN or inf"),
        ("bad_window", "tokenizer settings"),
    ],
)
def test_malformed_artifacts(artifact, tmp_path, case, expect):
    a = _copy(artifact, tmp_path)
    w = a / "weights.safetensors"
    if case == "no_manifest":
        (a / "engine.json").unlink()
    elif case == "bad_json":
        (a / "engine.json").write_text("{not json")
    elif case == "wrong_format":
        _edit_manifest(a, format="onnx")
    elif case == "newer_version":
        _edit_manifest(a, format_version=99)
    elif case == "missing_field":
        _edit_manifest(a, dtype=KeyError)
    elif case == "unknown_field":
        _edit_manifest(a, extra=1)
    elif case == "bad_dtype":
        _edit_manifest(a, dtype="int4")
    elif case == "bad_config":
        m = json.loads((a / "engine.json").read_text())
        m["config"]["heads"] = [2, 0]
        (a / "engine.json").write_text(json.dumps(m))
    elif case == "heads_mismatch":
        m = json.loads((a / "engine.json").read_text())
        m["config"]["heads"] = [3, 0, 4]
        (a / "engine.json").write_text(json.dumps(m))
    elif case == "missing_tokenizer":
        (a / "tokenizer.json").unlink()
    elif case == "missing_weights":
        w.unlink()
    elif case == "truncated_weights":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif case == "garbage_weights":
        w.write_bytes(b"\xff" * 64)
    else:
        t = load_file(str(w))
        if case == "missing_tensor":
            t.pop("qa.bias")
        elif case == "extra_tensor":
            t["bogus"] = torch.zeros(1)
        elif case == "wrong_shape":
            t["layers.0.o.weight"] = torch.zeros(32, 15)
        elif case == "wrong_dtype":
            t["qa.bias"] = t["qa.bias"].half()
        elif case == "nan_weight":
            t["layers.2.ffn_in.weight"][0, 0] = float("nan")
        elif case == "bad_window":
            _edit_manifest(
                a, tokenizer={**json.loads((a / "engine.json").read_text())["tokenizer"], "max_seq_length": 4096}
            )
        save_file(t, str(w))
    with pytest.raises(ArtifactError) as ei:
        load_artifact(a)
    assert expect in str(ei.value)


@pytest.mark.parametrize("dtype, atol", [("float16", 2e-2), ("bfloat16", 1e-1)])
def test_half_artifacts_run_on_cpu(tiny_bert, tmp_path, dtype, atol):
    ref = QAEngine.load(build(tiny_bert, tmp_path / "f32", settings=SMALL), backend="torch")
    half = QAEngine.load(build(tiny_bert, tmp_path / dtype, settings=SMALL, dtype=dtype), backend="torch")
    assert all(v.dtype == getattr(torch, dtype) for v in half.artifact.state.values())
    ids = torch.randint(5, ref.cfg.vocab_size, (2, 40))
    mask = torch.ones_like(ids)
    s0, _ = ref.forward(ids, mask)
    s1, _ = half.forward(ids, mask)
    # Weight rounding alone: relative 2^-11 (fp16) / 2^-8 (bf16) per weight, a few layers deep.
    assert (s0 - s1).abs().max() < atol
    assert (s0 - s1).abs().max() > 0  # the weights really were rounded


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip()


def test_cli_bad_inputs(tiny_bert, tmp_path, capsys):
    out = tmp_path / "o"
    bad = tmp_path / "spec.json"
    cases = [
        ({"layers": [{}, {}]}, "spec has 2 layers but the model has 3"),
        ({"layers": [{"heads": [4]}, {}, {}]}, "spec layer 0 keeps head 4, but the model has 4 heads (0-3)"),
        ({"layers": [{}, {"ffn": [1, 1]}, {}]}, "spec layer 1 lists FFN unit 1 twice"),
        ({"layers": [{}, {}, {"head": [0]}]}, "unknown key(s) ['head']"),
        ({"layers": [{}, {}, {"heads": [-1]}]}, "keeps head -1"),
    ]
    for spec, msg in cases:
        bad.write_text(json.dumps(spec))
        code, err = _cli(
            capsys,
            "--model",
            tiny_bert,
            "--out",
            out,
            "--spec",
            bad,
            "--max-seq-length",
            96,
            "--doc-stride",
            16,
            "--force",
        )
        assert code == 2 and msg in err and err.count("\n") == 0, (spec, err)
    code, err = _cli(capsys, "--model", tmp_path / "nope", "--out", out)
    assert code == 2 and "does not exist" in err
    weird = tmp_path / "weird"
    shutil.copytree(tiny_bert, weird)
    cfg = json.loads((weird / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (weird / "config.json").write_text(json.dumps(cfg))
    code, err = _cli(capsys, "--model", weird, "--out", out)
    assert code == 2 and "unknown architecture 'gpt2'" in err
    nofile = tmp_path / "nofile"
    shutil.copytree(tiny_bert, nofile)
    (nofile / "model.safetensors").rename(nofile / "pytorch_model.bin")
    code, err = _cli(capsys, "--model", nofile, "--out", out)
    assert code == 2 and "never unpickles" in err


def test_cli_refuses_non_empty_out_and_verifies(tiny_bert, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = _cli(capsys, "--model", tiny_bert, "--out", out, "--max-seq-length", 96, "--doc-stride", 16)
    assert code == 2 and "--force" in err and (out / "keep.txt").exists()
    code = main(
        [
            "--model",
            str(tiny_bert),
            "--out",
            str(out),
            "--max-seq-length",
            "96",
            "--doc-stride",
            "16",
            "--force",
            "--verify",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "verify: max |logit difference|" in printed
    assert float(printed.split("= ")[1].split()[0]) < 1e-4
