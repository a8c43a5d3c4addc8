"""`python -m engine.prune_fast` end to end on a tiny random BERT and the real SQuAD 2.0 train subset: stages,
resume, the distillation stage and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_checkpoint
from engine.model import RaggedQAModel
from engine.train.batching import collate
from engine.train.config import bf16_native


def _cli_args(teacher: Path, train: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--teacher",
        str(teacher),
        "--train",
        str(train),
        "--eval-fraction",
        "0.05",
        "--out",
        str(out),
        "--samples",
        "24",
        "--batch",
        "8",
        "--max-seq-length",
        "96",
        "--doc-stride",
        "32",
        "--max-query-length",
        "24",
        "--eval-negatives-ratio",
        "0.1",
        "--no-progress",
        "--threads",
        "1",
        *extra,
    ]


def _pool_batch(model: Path, argv: list[str]):
    """The first 24 pruning windows of a run with these arguments (its seeded pool), packed into one batch."""
    from engine.features import WindowMaker, WindowSettings, load_tokenizer
    from engine.finetune import prepare_data
    from engine.prune_fast.args import build_parser
    from engine.prune_fast.stages import sample_features

    train, _, _ = prepare_data(build_parser().parse_args(argv))
    maker = WindowMaker(load_tokenizer(model), load_checkpoint(model).cfg.architecture, WindowSettings(96, 32, 24))
    return collate(sample_features(train, maker, 24, 0))[0]


def _outputs(ck, batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A checkpoint's span logits (unpacked `[B, S]`, padding at -1e4) and layer outputs on `batch`."""
    from engine.packing import unpack

    model = RaggedQAModel(ck.cfg)
    model.load_state_dict(ck.state)
    with torch.no_grad():
        out = model.eval()(batch.input_ids, batch.token_type_ids, batch.cu_seqlens, batch.max_seqlen, True)
    return [unpack(x.float(), batch.cu_seqlens, batch.max_seqlen, fill=-1e4) for x in out[:2]], out[2]


def _kl_to(ref, *logits) -> list[float]:
    """The distillation loss (T = 2) of each pair of span logits against the pair `ref`."""
    from engine.train.losses import distill_loss

    return [float(distill_loss(*pair, *ref, temperature=2.0)) for pair in logits]


@pytest.mark.slow
def test_cli_end_to_end_and_resume(tiny_bert, squad_train, tmp_path, capsys):
    from engine.build_model import build
    from engine.prune_fast.cli import main

    out = tmp_path / "fast"
    assert main(_cli_args(tiny_bert, squad_train, out, "--target-sparsity", "0.3", "--save-stages")) == 0
    m = json.loads((out / "metrics.json").read_text())
    ck = load_checkpoint(out)
    assert ck.is_ragged or ck.cfg.heads == load_checkpoint(tiny_bert).cfg.heads
    assert ck.null_threshold is not None
    assert 0.25 <= m["achieved_flop_sparsity"] <= 0.6
    assert m["method"] == "post-training" and m["student"]["f1"] is not None and m["teacher"] is not None
    assert set(m["stages"]) == {"fisher", "scores", "search", "rearrange", "tune", "refit", "distill"}
    assert m["stages"]["distill"]["skipped"] and not m["distillation"]
    assert m["stages"]["refit"]["what"] == "all" and m["stages"]["refit"]["head"]["qa_rel_err_after"] >= 0
    for stage in ("search", "rearrange", "tune"):
        assert (out / "stages" / stage / "config.json").is_file()
    from engine.features import WindowSettings

    build(out, tmp_path / "art", settings=WindowSettings(96, 32, 24))  # build_model takes it as it takes L0 output
    weights = (out / "model.safetensors").read_bytes()

    # Interrupted after the search: the later stages and outputs are gone; --resume redoes only those.
    for name in ("rearrange.json", "tune.json", "refit.json", "refit.safetensors"):
        (out / "state" / name).unlink()
    (out / "model.safetensors").unlink()
    assert main(_cli_args(tiny_bert, squad_train, out, "--target-sparsity", "0.3", "--save-stages", "--resume")) == 0
    assert (out / "model.safetensors").read_bytes() == weights

    # Mid-Fisher: a partial save is continued, with the same result.
    state = out / "state"
    from safetensors.torch import load_file, save_file

    full = load_file(str(state / "fisher.safetensors"))
    partial = {k: (v[:1] if k.startswith(("head.", "ffn.")) else v) for k, v in full.items()}
    partial["batches"] = torch.tensor(1)
    save_file(partial, str(state / "fisher.partial.safetensors"))
    for name in ("fisher.safetensors", "search.json", "rearrange.json", "tune.json", "refit.json"):
        (state / name).unlink()
    assert main(_cli_args(tiny_bert, squad_train, out, "--target-sparsity", "0.3", "--save-stages", "--resume")) == 0
    torch.testing.assert_close(load_file(str(state / "fisher.safetensors"))["head.1"], full["head.1"])
    assert (out / "model.safetensors").read_bytes() == weights

    # Other arguments on resume, or a non-empty OUT without --resume, are refused.
    assert main(_cli_args(tiny_bert, squad_train, out, "--target-sparsity", "0.5", "--resume")) == 2
    assert "other arguments" in capsys.readouterr().err
    assert main(_cli_args(tiny_bert, squad_train, out, "--target-sparsity", "0.3")) == 2
    assert "not empty" in capsys.readouterr().err
    # An argument added after the run started (absent from its run.json) counts as given at its default.
    run_json = state / "run.json"
    started = json.loads(run_json.read_text())
    run_json.write_text(json.dumps({k: v for k, v in started.items() if k != "teacher_precision"}))
    args = _cli_args(tiny_bert, squad_train, out, "--target-sparsity", "0.3", "--save-stages", "--resume")
    assert main([*args, "--teacher-precision", "int8"]) == 2
    assert "other arguments (teacher_precision)" in capsys.readouterr().err
    run_json.write_text(json.dumps({k: v for k, v in started.items() if k != "teacher_precision"}))
    assert main(args) == 0
    assert json.loads(run_json.read_text()) == started

    # The default stored threshold (teacher-rate) is the one at which the student abstains on as many held-out
    # questions as the teacher at the teacher's threshold; --threshold-rule may change on resume (it only re-scores).
    rated = load_checkpoint(out)
    assert m["threshold_rule"] == "teacher-rate" and rated.null_threshold == m["student"]["null_threshold"]
    from engine.data.predict import evaluate_model
    from engine.features import WindowMaker, load_tokenizer
    from engine.finetune import prepare_data
    from engine.prune_fast.args import build_parser

    args = _cli_args(tiny_bert, squad_train, out, "--target-sparsity", "0.3", "--save-stages", "--resume")
    _, evals, _ = prepare_data(build_parser().parse_args(args))
    maker = WindowMaker(load_tokenizer(tiny_bert), rated.cfg.architecture, WindowSettings(96, 32, 24))
    teacher = load_checkpoint(tiny_bert)
    diffs = []
    for c in (rated, teacher):
        model = RaggedQAModel(c.cfg)
        model.load_state_dict(c.state)
        diffs.append(evaluate_model(model.eval(), evals, maker, progress=False)["null_score_diff"])
    t_thr = teacher.null_threshold if teacher.null_threshold is not None else m["teacher"]["null_threshold"]
    assert sum(d > rated.null_threshold for d in diffs[0].values()) == sum(d > t_thr for d in diffs[1].values())
    assert main([*args, "--threshold-rule", "heldout"]) == 0
    assert (out / "model.safetensors").read_bytes() == weights
    m = json.loads((out / "metrics.json").read_text())
    assert m["threshold_rule"] == "heldout" and load_checkpoint(out).null_threshold == m["student"]["best_f1_thresh"]
    with pytest.raises(SystemExit):
        main([*args, "--threshold-rule", "teacher-rate", "--no-teacher-eval"])
    assert "--no-teacher-eval" in capsys.readouterr().err

    # Kwon et al. as published (--refit none): the same shape and tuned model, without the refitted tensors.
    kwon = tmp_path / "kwon"
    assert main(_cli_args(tiny_bert, squad_train, kwon, "--target-sparsity", "0.3", "--refit", "none")) == 0
    assert json.loads((kwon / "metrics.json").read_text())["stages"]["refit"]["skipped"]
    a, b = load_checkpoint(kwon), load_checkpoint(out)
    assert a.cfg == b.cfg
    tuned = load_checkpoint(out / "stages" / "tune")
    torch.testing.assert_close(a.state["layers.0.o.weight"], tuned.state["layers.0.o.weight"])
    assert not torch.equal(a.state["qa.weight"], b.state["qa.weight"])

    # --refit-samples beyond --samples: the Fisher and tuning windows stay the first 24 of the same shuffle.
    more = tmp_path / "more"
    assert main(_cli_args(tiny_bert, squad_train, more, "--target-sparsity", "0.3", "--refit-samples", "40")) == 0
    m = json.loads((more / "metrics.json").read_text())
    assert m["stages"]["refit"]["samples"] == 40 and m["data"]["train"]["windows_used"] == 40
    assert load_checkpoint(more).cfg == b.cfg
    from safetensors.torch import load_file as load

    torch.testing.assert_close(load(str(more / "state" / "fisher.safetensors"))["head.1"], full["head.1"])


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (--device cuda)")


@pytest.mark.slow
@CUDA
@pytest.mark.parametrize(
    "how",
    [["--select", "obs", "--scores", "obs", "--refit", "all", "--fit-error", "ln"], ["--refit", "all"]],
    ids=["obs", "fisher-tune-refit"],
)
def test_cli_stages_on_cuda_match_the_cpu(tiny_bert, squad_train, tmp_path, how):
    """--device cuda runs Fisher, the OBS scores and selection, tuning and the refit on the GPU: the same units are
    kept and the refitted weights agree with the CPU run's."""
    from engine.prune_fast.cli import main

    runs = {}
    for dev in ("cpu", "cuda"):
        args = _cli_args(tiny_bert, squad_train, tmp_path / dev, "--target-sparsity", "0.4", *how, "--device", dev)
        assert main(args) == 0
        runs[dev] = load_checkpoint(tmp_path / dev)
        assert json.loads((tmp_path / dev / "metrics.json").read_text())["device"].startswith(dev)
    a, b = runs["cpu"], runs["cuda"]
    assert a.cfg == b.cfg and a.state.keys() == b.state.keys()
    for k in a.state:
        torch.testing.assert_close(b.state[k], a.state[k], atol=2e-3, rtol=2e-3, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize(
    "what, device", [("bias-ln", "cpu"), ("all", "cpu"), pytest.param("all", "cuda", marks=CUDA, id="all-cuda")]
)
def test_cli_distill_steps(tiny_bert, squad_train, tmp_path, what, device):
    """--distill-steps trains what --distill-params names (nothing else), brings the student's span distributions
    closer to the teacher's on the pruning windows (on --distill-device; the checkpoint comes back to the CPU), and
    a resumed run reuses the stage."""
    from transformers import AutoTokenizer

    from engine.checkpoint import save_checkpoint
    from engine.prune_fast.cli import main

    # The random tiny teacher's span logits are nearly flat; a sharper QA head gives distillation something to match.
    t = load_checkpoint(tiny_bert)
    sharp = tmp_path / "teacher"
    state = {**t.state, "qa.weight": t.state["qa.weight"] * 40}
    save_checkpoint(sharp, t.cfg, state, t.hf_config, tokenizer=AutoTokenizer.from_pretrained(str(tiny_bert)))
    t = load_checkpoint(sharp)
    base = ["--target-sparsity", "0.85", "--refit", "none", "--no-teacher-eval"]
    plain, kd = tmp_path / "plain", tmp_path / "kd"
    assert main(_cli_args(sharp, squad_train, plain, *base)) == 0
    extra = ["--distill-steps", "6", "--distill-params", what, "--distill-lr", "3e-5", "--distill-weight", "1"]
    extra += ["--distill-device", device]
    if what == "all":  # more windows than --samples 24: drawn further from the same shuffle
        extra += ["--distill-samples", "40"]
    else:  # a held-out curve: every 4 steps, at the epoch ends (3 steps of 8 of the 24 windows) and at the last
        extra += ["--distill-eval-every", "4"]
    assert main(_cli_args(sharp, squad_train, kd, *base, *extra)) == 0
    m = json.loads((kd / "metrics.json").read_text())
    curve = m["stages"]["distill"].get("curve")
    if what == "bias-ln":
        assert [row["step"] for row in curve] == [3, 4, 6]
        for k in ("f1", "best_f1", "HasAns_f1_at_zero", "auc"):  # its last point is the saved student's score
            assert curve[-1][k] == pytest.approx(m["student"][k], abs=1e-9), k
    else:
        assert curve is None
    assert m["distillation"] and m["stages"]["distill"]["steps"] == 6 and m["stages"]["distill"]["params"] == what
    assert m["stages"]["distill"]["device"].startswith(device)
    native = bf16_native(torch.device(device))  # --precision auto: bf16 autocast where the device has it natively
    assert m["stages"]["distill"]["precision"] == ("bf16" if native else "fp32")
    # --teacher-logits auto: logits cached once by the engine on the CPU (beside the run), the teacher live on a GPU
    cached = sorted((tmp_path / "teacher-logits").glob("teacher-logits-float32-*.safetensors"))
    assert m["stages"]["distill"]["teacher_logits"] == ("CachedTeacher" if device == "cpu" else "LiveTeacher")
    assert len(cached) == (1 if device == "cpu" else 0)
    if device == "cpu" and what == "all":  # the cached logits are the live teacher's: the same losses, step by step
        md, fp32 = m["stages"]["distill"], []
        if native:  # compared in fp32: bf16 autocast rounds the cached and the live paths differently
            fp32 = ["--precision", "fp32"]
            assert main(_cli_args(sharp, squad_train, tmp_path / "cached32", *base, *extra, *fp32)) == 0
            md = json.loads((tmp_path / "cached32" / "metrics.json").read_text())["stages"]["distill"]
        live = tmp_path / "live"
        assert main(_cli_args(sharp, squad_train, live, *base, *extra, "--teacher-logits", "live", *fp32)) == 0
        ml = json.loads((live / "metrics.json").read_text())["stages"]["distill"]
        assert ml["teacher_logits"] == "LiveTeacher" and md["teacher_logits"] == "CachedTeacher"
        for k in ("loss_first", "loss_last"):
            assert ml[k] == pytest.approx(md[k], rel=1e-4), k
    samples = 40 if what == "all" else 24
    assert m["stages"]["distill"]["samples"] == samples and m["data"]["train"]["windows_used"] == samples
    a, b = load_checkpoint(plain), load_checkpoint(kd)
    assert a.cfg == b.cfg and a.state.keys() == b.state.keys()
    changed = {k for k in a.state if not torch.equal(a.state[k], b.state[k])}
    assert any(k.endswith(".bias") for k in changed)
    if what == "bias-ln":
        assert all(a.state[k].dim() < 2 for k in changed), sorted(changed)
    else:
        assert any(a.state[k].dim() == 2 for k in changed)

    batch = _pool_batch(sharp, _cli_args(sharp, squad_train, kd, *base, *extra))
    kl = _kl_to(_outputs(t, batch)[0], _outputs(a, batch)[0], _outputs(b, batch)[0])
    assert kl[1] < kl[0], kl

    weights = (kd / "model.safetensors").read_bytes()
    for name in ("distill.safetensors", "distill.json"):
        (kd / "state" / name).unlink()
    (kd / "model.safetensors").unlink()
    assert main(_cli_args(sharp, squad_train, kd, *base, *extra, "--resume")) == 0
    assert (kd / "model.safetensors").read_bytes() == weights
    assert json.loads((kd / "metrics.json").read_text())["stages"]["distill"].get("curve") == curve  # from the state


@pytest.mark.slow
def test_cli_bad_inputs(tiny_bert, squad_train, tmp_path, capsys):
    from engine.prune_fast.cli import main

    with pytest.raises(SystemExit):
        main(_cli_args(tiny_bert, squad_train, tmp_path / "a", "--target-sparsity", "0.3", "--samples", "4"))
    assert "too few" in capsys.readouterr().err
    assert (
        main(_cli_args(tiny_bert, squad_train, tmp_path / "b", "--target-sparsity", "0.3", "--samples", "100000")) == 2
    )
    assert "fewer than --samples" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_cli_args(tiny_bert, squad_train, tmp_path / "c", "--target-speedup", "1.5"))
    assert "--latency-shape" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_cli_args(tiny_bert, squad_train, tmp_path / "d", "--target-sparsity", "1.2"))
    with pytest.raises(SystemExit):
        main(_cli_args(tiny_bert, squad_train, tmp_path / "e", "--target-sparsity", "0.3", "--refit-samples", "3"))
    assert "--refit-samples" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_cli_args(tiny_bert, squad_train, tmp_path / "f", "--target-sparsity", "0.3", "--distill-steps", "-1"))
    assert "--distill-steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_cli_args(tiny_bert, squad_train, tmp_path / "g", "--target-sparsity", "0.3", "--distill-samples", "4"))
    assert "--distill-samples" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a curve of no distillation
        main(_cli_args(tiny_bert, squad_train, tmp_path / "g", "--target-sparsity", "0.3", "--distill-eval-every", "2"))
    assert "--distill-eval-every" in capsys.readouterr().err
    for flag in ("--device", "--distill-device"):
        with pytest.raises(SystemExit):
            main(_cli_args(tiny_bert, squad_train, tmp_path / "h", "--target-sparsity", "0.3", flag, "tpu"))
        assert f"{flag}: " in capsys.readouterr().err
    if not bf16_native(torch.device("cpu")):
        with pytest.raises(SystemExit):
            main(_cli_args(tiny_bert, squad_train, tmp_path / "j", "--target-sparsity", "0.3", "--precision", "bf16"))
        assert "--precision bf16: cpu has no native bfloat16 GEMMs" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(
                _cli_args(
                    tiny_bert, squad_train, tmp_path / "i", "--target-sparsity", "0.3", "--distill-device", "cuda"
                )
            )
        assert "--distill-device cuda: torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_spec_keeps_exactly_the_given_units(tiny_bert, squad_train, tmp_path, capsys):
    """--spec (the importance / random ablations): no scores or search, exactly the spec's heads and units are kept
    (with --no-tune and --refit none the cut weights are the teacher's own rows and columns), then the usual
    stages; a spec that does not fit the teacher, or one combined with --select obs, is refused up front."""
    from engine.prune_fast.cli import main

    t = load_checkpoint(tiny_bert)
    heads, ffn = t.cfg.heads[0], t.cfg.ffn[0]
    keep = [
        {"heads": [1, heads - 1], "ffn": [0, 3, ffn - 1]},
        {"heads": [], "ffn": list(range(0, ffn, 2))},  # no attention at all
        {"heads": [0], "ffn": []},  # no FFN at all
    ][: t.cfg.num_layers]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"layers": keep}))
    out = tmp_path / "spec-run"
    extra = ["--spec", str(spec), "--no-tune", "--refit", "none", "--no-teacher-eval"]
    assert main(_cli_args(tiny_bert, squad_train, out, *extra)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["target"] == {"by": "spec", "spec": str(spec)}
    assert set(m["stages"]) == {"spec", "tune", "refit", "distill"}
    ck = load_checkpoint(out)
    assert list(ck.cfg.heads) == [len(lk["heads"]) for lk in keep]
    assert list(ck.cfg.ffn) == [len(lk["ffn"]) for lk in keep]
    w, d = t.state["layers.0.ffn_in.weight"], ck.state["layers.0.ffn_in.weight"]
    assert torch.equal(d, w[keep[0]["ffn"]])  # the spec's units, in order
    assert torch.equal(ck.state["layers.0.ffn_out.weight"], t.state["layers.0.ffn_out.weight"][:, keep[0]["ffn"]])
    dh = t.cfg.head_dim
    o_cols = [c for h in keep[0]["heads"] for c in range(h * dh, (h + 1) * dh)]
    assert torch.equal(ck.state["layers.0.o.weight"], t.state["layers.0.o.weight"][:, o_cols])
    # the same spec with the usual tuning and refit: same structure, refitted weights
    assert main(_cli_args(tiny_bert, squad_train, tmp_path / "refit", "--spec", str(spec), "--no-teacher-eval")) == 0
    assert load_checkpoint(tmp_path / "refit").cfg == ck.cfg
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(_cli_args(tiny_bert, squad_train, tmp_path / "x", "--spec", str(spec), "--select", "obs"))
    assert "--spec fixes the kept units" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": [{"heads": [heads]}] + [{}] * (t.cfg.num_layers - 1)}))
    with pytest.raises(SystemExit):
        main(_cli_args(tiny_bert, squad_train, tmp_path / "y", "--spec", str(bad)))
    assert "--spec:" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one target only
        main(_cli_args(tiny_bert, squad_train, tmp_path / "z", "--spec", str(spec), "--target-sparsity", "0.3"))


@pytest.mark.slow
def test_cli_iterative_pruning_distils_from_the_dense_teacher(tiny_bert, squad_train, tmp_path, capsys):
    """--distill-teacher: a student cut from a dense teacher is cut again and distilled from the dense one (not from
    itself): it ends closer to the dense teacher's span distributions than the cut alone, its losses are not those of
    distilling from the student, and metrics.json counts FLOPs against both. A --distill-teacher of other dims, or
    one without --distill-steps, is refused before anything is computed."""
    from transformers import AutoTokenizer

    from engine.checkpoint import save_checkpoint
    from engine.flops import flop_sparsity
    from engine.prune_fast.cli import main
    from tests.conftest import make_checkpoint

    t = load_checkpoint(tiny_bert)  # a sharper QA head than random: something to distil (test_cli_distill_steps)
    dense = tmp_path / "dense"
    state = {**t.state, "qa.weight": t.state["qa.weight"] * 40}
    save_checkpoint(dense, t.cfg, state, t.hf_config, tokenizer=AutoTokenizer.from_pretrained(str(tiny_bert)))
    # fp32: 4 steps under bf16 autocast (--precision auto on a CPU with native bf16) round too coarsely to compare KLs
    base = ["--refit", "none", "--no-teacher-eval", "--precision", "fp32"]
    first = tmp_path / "first"
    assert main(_cli_args(dense, squad_train, first, "--target-sparsity", "0.4", *base)) == 0
    kd = ["--target-sparsity", "0.5", *base, "--distill-steps", "4", "--distill-lr", "3e-5"]
    cut, from_dense, from_self = tmp_path / "cut", tmp_path / "from-dense", tmp_path / "from-self"
    assert main(_cli_args(first, squad_train, cut, "--target-sparsity", "0.5", *base)) == 0
    assert main(_cli_args(first, squad_train, from_dense, *kd, "--distill-teacher", str(dense))) == 0
    assert main(_cli_args(first, squad_train, from_self, *kd, "--distill-teacher", str(first))) == 0

    m = json.loads((from_dense / "metrics.json").read_text())
    d, s = m["stages"]["distill"], json.loads((from_self / "metrics.json").read_text())["stages"]["distill"]
    assert d["teacher"] == str(dense) and s["teacher"] == str(first) and d["steps"] == 4
    assert d["loss_first"] != pytest.approx(s["loss_first"], rel=1e-3)  # other logits to match
    a, b, dn = load_checkpoint(cut), load_checkpoint(from_dense), load_checkpoint(dense)
    assert a.cfg == b.cfg and m["heads"] == list(b.cfg.heads)
    info = m["distill_teacher"]
    assert info["path"] == str(dense) and info["heads"] == list(dn.cfg.heads) and info["ffn"] == list(dn.cfg.ffn)
    assert info["achieved_flop_sparsity"] == pytest.approx(flop_sparsity(b.cfg, dn.cfg, 384))
    assert info["achieved_flop_sparsity"] > m["achieved_flop_sparsity"] > 0.3  # counted against the dense model too

    batch = _pool_batch(first, _cli_args(first, squad_train, from_dense, *kd))
    kl = _kl_to(_outputs(dn, batch)[0], _outputs(a, batch)[0], _outputs(b, batch)[0])
    assert kl[1] < kl[0], kl

    other = make_checkpoint(tmp_path / "other", "bert", head_dim=4)  # another hidden size, same tokenizer
    assert main(_cli_args(first, squad_train, tmp_path / "x", *kd, "--distill-teacher", str(other))) == 2
    assert "not the same kind of model" in capsys.readouterr().err and not (tmp_path / "x" / "state").exists()
    with pytest.raises(SystemExit):
        main(_cli_args(first, squad_train, tmp_path / "y", "--target-sparsity", "0.5", "--distill-teacher", str(dense)))
    assert "--distill-teacher" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_distill_hidden_weight_matches_layer_outputs(tiny_bert, squad_train, tmp_path, capsys):
    """--distill-hidden-weight adds the layer-output MSE to the distillation (the teacher run live for its layer
    outputs): the student's layer outputs end closer to the teacher's than after the same steps of logits alone.
    Refused without --distill-steps, below 0, or with --teacher-logits cached (no layer outputs in the cache)."""
    from engine.prune_fast.cli import main

    base = ["--target-sparsity", "0.5", "--refit", "none", "--no-teacher-eval", "--distill-steps", "6"]
    base += ["--distill-lr", "1e-3", "--distill-params", "all"]
    logits_only, layers = tmp_path / "logits", tmp_path / "layers"
    assert main(_cli_args(tiny_bert, squad_train, logits_only, *base)) == 0
    assert main(_cli_args(tiny_bert, squad_train, layers, *base, "--distill-hidden-weight", "50")) == 0
    d = json.loads((layers / "metrics.json").read_text())["stages"]["distill"]
    assert d["teacher_logits"] == "LiveTeacher" and d["hidden_weight"] == 50
    assert json.loads((logits_only / "metrics.json").read_text())["stages"]["distill"]["hidden_weight"] == 0

    batch = _pool_batch(tiny_bert, _cli_args(tiny_bert, squad_train, layers, *base))
    ref = _outputs(load_checkpoint(tiny_bert), batch)[1]
    mse = [
        sum(float(((h - r) ** 2).mean()) for h, r in zip(_outputs(load_checkpoint(run), batch)[1], ref))
        for run in (logits_only, layers)
    ]
    assert mse[1] < 0.9 * mse[0], mse  # by a margin: not the rounding between cached and live logits

    for extra, msg in (
        (["--target-sparsity", "0.5", "--distill-hidden-weight", "1"], "--distill-hidden-weight"),
        ([*base, "--distill-hidden-weight", "-1"], "--distill-hidden-weight"),
        ([*base, "--distill-hidden-weight", "1", "--teacher-logits", "cached"], "--teacher-logits live"),
    ):
        with pytest.raises(SystemExit):
            main(_cli_args(tiny_bert, squad_train, tmp_path / "bad", *extra))
        assert msg in capsys.readouterr().err
