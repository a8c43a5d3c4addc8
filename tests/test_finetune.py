"""End-to-end tests of engine.finetune and engine.train on a tiny random BERT and synthetic SQuAD data."""

import gzip
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoint import load_checkpoint
from engine.finetune import build_parser, finetune, prepare_data
from engine.train.config import make_optimizer, weight_groups
from engine.train.losses import span_loss
from engine.train.state import NonFiniteLossError, check_finite, load_training_state, lr_at, save_training_state
from tests.conftest import TINY_TRAIN_ARGS

_NAMES = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
_THINGS = ["river", "castle", "bridge", "market", "tower", "garden"]
_WORDS = (
    "the of is a what which who in near built by was called and it . ? , capital city north south old new"
).split()


def _squad(seed: int, n_articles: int) -> dict:
    """Synthetic SQuAD 2.0 data: "the <thing> of <name> is <other>." sentences; some unanswerable questions."""
    rng = random.Random(seed)
    data = []
    for a in range(n_articles):
        paragraphs = []
        for p in range(3):
            facts = [(rng.choice(_THINGS), rng.choice(_NAMES), rng.choice(_NAMES)) for _ in range(3)]
            context = " ".join(f"The {t} of {n} is {o}." for t, n, o in facts)
            qas = []
            for k, (t, n, o) in enumerate(facts):
                start = context.index(f"The {t} of {n} is {o}.") + len(f"The {t} of {n} is ")
                qas.append(
                    {
                        "id": f"q{a}_{p}_{k}",
                        "question": f"What is the {t} of {n}?",
                        "is_impossible": False,
                        "answers": [{"text": o, "answer_start": start}],
                    }
                )
            qas.append(
                {"id": f"q{a}_{p}_x", "question": "Who built the old tower?", "is_impossible": True, "answers": []}
            )
            paragraphs.append({"context": context, "qas": qas})
        data.append({"title": f"Article_{a}", "paragraphs": paragraphs})
    return {"version": "v2.0", "data": data}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random BertForQuestionAnswering with a tiny WordPiece vocabulary, saved HF-style."""
    from transformers import BertConfig, BertForQuestionAnswering, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(_WORDS + _NAMES + _THINGS))]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True).save_pretrained(str(root))
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertForQuestionAnswering(cfg).save_pretrained(str(root))
    return root


@pytest.fixture(scope="module")
def squad_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train .json.gz, eval .json) synthetic files."""
    root = tmp_path_factory.mktemp("squad")
    train, dev = root / "train-tiny.json.gz", root / "dev-tiny.json"
    with gzip.open(train, "wt", encoding="utf-8") as f:
        json.dump(_squad(0, 6), f)
    dev.write_text(json.dumps(_squad(1, 2)))
    return train, dev


def _args(model: Path, train: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model",
        str(model),
        "--train",
        str(train),
        "--out",
        str(out),
        *TINY_TRAIN_ARGS,
        *extra,
    ]


def _run(argv: list[str]) -> dict:
    return finetune(build_parser().parse_args(argv))


def test_finetune_learns_and_writes_checkpoint(tiny_model: Path, squad_files: tuple[Path, Path], tmp_path: Path):
    train, dev = squad_files
    out = tmp_path / "run"
    metrics = _run(
        _args(
            tiny_model,
            train,
            out,
            "--eval",
            str(dev),
            "--max-steps",
            "40",
            "--lr",
            "3e-3",
            "--negatives-ratio",
            "0.5",
            "--eval-every",
            "20",
            "--checkpoint-every",
            "20",
        )
    )
    first, last = metrics["loss"]["first"], metrics["loss"]["last"]
    assert sum(last) / len(last) < 0.8 * sum(first) / len(first), (first, last)
    for key in (
        "step",
        "eval_at_zero",
        "eval_at_best",
        "null_threshold",
        "auc",
        "steps",
        "total_steps",
        "steps_per_epoch",
        "epochs_done",
        "stopped_by",
        "train_time_s",
        "wall_time_s",
        "history",
        "loss",
        "data",
        "args",
    ):
        assert key in metrics, key
    for key in ("exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1", "best_f1_thresh"):
        assert key in metrics["eval_at_zero"], key
    assert metrics["steps"] == 40 and metrics["stopped_by"] == "steps"
    assert [h["step"] for h in metrics["history"]] == [20, 40]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 40
    assert 0.0 <= metrics["auc"] <= 1.0

    ckpt = load_checkpoint(out)
    assert not ckpt.qa_head_initialised and not ckpt.is_ragged
    assert ckpt.null_threshold == pytest.approx(metrics["null_threshold"])
    from transformers import AutoTokenizer, BertForQuestionAnswering

    hf = BertForQuestionAnswering.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    enc = tok("What is the river of alpha?", "The river of alpha is bravo.", return_tensors="pt")
    assert hf(**enc).start_logits.shape == enc["input_ids"].shape


def test_question_edit_negatives_reach_the_train_set(tiny_model: Path, squad_files: tuple[Path, Path], tmp_path: Path):
    train, _ = squad_files
    argv = _args(
        tiny_model,
        train,
        tmp_path / "run",
        "--negatives-ratio",
        "0.5",
        "--real-negatives-factor",
        "0",
        "--eval-fraction",
        "0.2",
    )
    edits = ["--swap-share", "0.0", "--negation-share", "0.5", "--antonym-share", "0.25"]
    base, _, _ = prepare_data(build_parser().parse_args(argv))
    mixed, _, info = prepare_data(build_parser().parse_args(argv + edits))
    kinds = {e.qid.rsplit("_", 1)[-1] for e in mixed if e.is_impossible}
    assert {"negation", "nosent"} <= kinds and not any(e.qid.endswith("_negation") for e in base)
    negated = [e for e in mixed if e.qid.endswith("_negation")]
    assert all(e.question.startswith("What isn't the ") for e in negated)
    assert sum(e.is_impossible for e in mixed) == sum(e.is_impossible for e in base)  # same budget, other kinds
    assert info["train"]["unanswerable"] == sum(e.is_impossible for e in mixed)
    with pytest.raises(ValueError, match="summing to at most 1"):
        prepare_data(build_parser().parse_args(argv + ["--negation-share", "0.7", "--antonym-share", "0.7"]))


def test_resume_matches_uninterrupted(tiny_model: Path, squad_files: tuple[Path, Path], tmp_path: Path):
    train, _ = squad_files
    common = (
        "--eval-fraction",
        "0.34",
        "--negatives-ratio",
        "0.5",
        "--max-steps",
        "12",
        "--checkpoint-every",
        "5",
        "--lr",
        "1e-3",
        "--eval-every",
        "4",
        "--keep-checkpoints",
        "5",
    )
    full = tmp_path / "full"
    _run(_args(tiny_model, train, full, *common))
    # Simulate a run killed right after step 5: keep only that state, then resume to step 12.
    part = tmp_path / "part"
    shutil.copytree(full / "checkpoints" / "step-00000005", part / "checkpoints" / "step-00000005")
    resumed = _run(_args(tiny_model, train, part, *common, "--resume"))
    a = load_file(str(full / "checkpoints" / "step-00000012" / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / "step-00000012" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    assert resumed["steps"] == 12
    assert [h["step"] for h in resumed["history"]] == [4, 8, 10, 12]  # 10 = end of epoch 1
    held = json.loads((full / "eval-set.json").read_text())
    held_part = json.loads((part / "eval-set.json").read_text())
    assert {a["title"] for a in held["data"]} == {a["title"] for a in held_part["data"]}


def test_nan_guard_names_step(tiny_model: Path, squad_files: tuple[Path, Path], tmp_path: Path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad_model"
    shutil.copytree(tiny_model, bad)
    state = load_file(str(bad / "model.safetensors"))
    state["qa_outputs.bias"] = torch.tensor([float("nan"), 0.0])
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    train, dev = squad_files
    with pytest.raises(NonFiniteLossError, match="at step 1;"):
        _run(_args(bad, train, tmp_path / "out", "--eval", str(dev), "--max-steps", "3"))
    with pytest.raises(NonFiniteLossError, match="at step 17;"):
        check_finite(torch.tensor(float("inf")), 17)


def test_time_budget_stops_and_saves(tiny_model: Path, squad_files: tuple[Path, Path], tmp_path: Path):
    train, dev = squad_files
    out = tmp_path / "budget"
    metrics = _run(
        _args(tiny_model, train, out, "--eval", str(dev), "--max-steps", "1000", "--time-budget-min", "1e-9")
    )
    assert metrics["stopped_by"] == "time_budget" and metrics["steps"] == 1
    assert (out / "checkpoints" / "step-00000001" / "trainer.json").is_file()
    assert load_checkpoint(out).null_threshold is not None


def test_refuses_nonempty_out_without_resume(tiny_model: Path, squad_files: tuple[Path, Path], tmp_path: Path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    with pytest.raises(FileExistsError, match="--resume"):
        _run(_args(tiny_model, squad_files[0], tmp_path / "x", "--eval", str(squad_files[1]), "--max-steps", "1"))


# --------------------------------------------------------------------------------------------- training utilities


def test_lr_schedule():
    lrs = [lr_at(s, 10, 2, 1.0) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert lrs[-1] == pytest.approx(1 / 8) and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_span_loss_matches_per_window_cross_entropy():
    torch.manual_seed(0)
    lengths = [5, 3, 7]
    cu = torch.tensor([0, 5, 8, 15], dtype=torch.int32)
    start, end = torch.randn(15), torch.randn(15)
    sp, ep = torch.tensor([1, 0, 6]), torch.tensor([2, 0, 6])
    ref = 0.0
    for b, n in enumerate(lengths):
        s, e = start[cu[b] : cu[b] + n], end[cu[b] : cu[b] + n]
        ref += 0.5 * (torch.log_softmax(s, 0)[sp[b]].neg() + torch.log_softmax(e, 0)[ep[b]].neg()) / len(lengths)
    torch.testing.assert_close(span_loss(start, end, cu, 7, sp, ep), ref)


def test_training_state_round_trip(tmp_path: Path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = make_optimizer(weight_groups(model, 1e-2, 0.01))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    path = save_training_state(tmp_path, model, opt, 7, {"note": "x"})
    expected_rand = torch.rand(3)
    torch.manual_seed(123)
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt2 = make_optimizer(weight_groups(model2, 1e-2, 0.01))
    step, meta = load_training_state(path, model2, opt2)
    assert step == 7 and meta == {"note": "x"}
    torch.testing.assert_close(torch.rand(3), expected_rand)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])
    assert not list(tmp_path.glob("*.tmp"))
