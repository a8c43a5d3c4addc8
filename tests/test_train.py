"""The unified trainer: SIGKILL resume, the teacher-logit cache (equal to live, stale ones refused), one cost model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoint import load_checkpoint
from engine.data.squad import load_squad, train_features
from engine.features import WindowMaker, WindowSettings, load_tokenizer
from engine.flops import encoder_flops, exact_flops, expected_flops
from engine.model import RaggedQAModel
from engine.prune.gated import GatedQAModel, export_ragged
from engine.train.batching import collate, epoch_order
from engine.train.logit_cache import CachedTeacher, CacheKey, StaleTeacherCacheError, cached_teacher
from engine.train.teacher import LiveTeacher
from tests.conftest import make_checkpoint
from tests.test_finetune import _args, squad_files, tiny_model  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = WindowSettings(64, 16, 16)


def _finetune_cmd(model: Path, train: Path, dev: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "engine.finetune",
        *_args(
            model,
            train,
            out,
            "--eval",
            str(dev),
            "--max-steps",
            "150",
            "--checkpoint-every",
            "3",
            "--lr",
            "1e-3",
            "--log-every",
            "0",
            *extra,
        ),
    ]


def test_resume_after_sigkill_ends_where_uninterrupted_ends(tiny_model, squad_files, tmp_path):  # noqa: F811
    train, dev = squad_files
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    full = tmp_path / "full"
    subprocess.run(_finetune_cmd(tiny_model, train, dev, full), env=env, check=True, capture_output=True, cwd=ROOT)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        _finetune_cmd(tiny_model, train, dev, cut),
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not list((cut / "checkpoints").glob("step-*/trainer.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted((cut / "checkpoints").glob("step-*/trainer.json"))
    assert done and done[-1].parent.name != "step-00000150", "the run finished before it could be killed"
    subprocess.run(
        _finetune_cmd(tiny_model, train, dev, cut, "--resume"), env=env, check=True, capture_output=True, cwd=ROOT
    )
    a = load_file(str(full / "checkpoints" / "step-00000150" / "model.safetensors"))
    b = load_file(str(cut / "checkpoints" / "step-00000150" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


def test_sigterm_saves_the_step_and_resume_ends_where_uninterrupted_ends(tiny_model, squad_files, tmp_path):  # noqa: F811
    """`timeout` or a scheduler sends SIGTERM: the trainer saves the step it is on (no periodic checkpoint here),
    exits 143 without exporting a model, and --resume finishes bit-identical to an uninterrupted run."""
    train, dev = squad_files
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sparse = ("--checkpoint-every", "1000", "--log-every", "1")  # the last --log-every wins
    full = tmp_path / "full"
    subprocess.run(
        _finetune_cmd(tiny_model, train, dev, full, *sparse), env=env, check=True, capture_output=True, cwd=ROOT
    )
    cut = tmp_path / "cut"
    log = tmp_path / "cut.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            _finetune_cmd(tiny_model, train, dev, cut, *sparse), env=env, cwd=ROOT, stdout=err, stderr=err
        )
        deadline = time.monotonic() + 300
        while "step 2/150" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 128 + signal.SIGTERM, log.read_text()[-2000:]
    text = log.read_text()
    assert "SIGTERM at step" in text and "state saved" in text, text[-2000:]
    done = sorted((cut / "checkpoints").glob("step-*/trainer.json"))
    assert len(done) == 1 and done[0].parent.name != "step-00000150", done
    assert not (cut / "model.safetensors").exists(), "an interrupted run must not export a model"
    subprocess.run(
        _finetune_cmd(tiny_model, train, dev, cut, *sparse, "--resume"),
        env=env,
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    a, b = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


def test_stop_requests_policy():
    """Inside training: SIGTERM is recorded (again and again, never fatal), a first Ctrl-C is recorded, a second one
    interrupts at once; outside, the previous handlers are back."""
    from engine.train.loop import _stop_requests

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), _stop_requests() as got:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert got == [signal.SIGTERM, signal.SIGTERM, signal.SIGINT]
        os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_length_grouped_order_is_a_seeded_permutation_of_similar_lengths():
    lengths = [int(x) for x in torch.randint(5, 200, (1000,), generator=torch.Generator().manual_seed(0))]
    a = epoch_order(lengths, 16, 3, 1, True)
    assert sorted(a.tolist()) == list(range(1000))
    assert (a == epoch_order(lengths, 16, 3, 1, True)).all() and not (a == epoch_order(lengths, 16, 3, 2, True)).all()
    spread = [
        max(lengths[k] for k in a[i : i + 16]) - min(lengths[k] for k in a[i : i + 16]) for i in range(0, 992, 16)
    ]
    uniform = epoch_order(lengths, 16, 3, 1, False)
    spread_u = [
        max(lengths[k] for k in uniform[i : i + 16]) - min(lengths[k] for k in uniform[i : i + 16])
        for i in range(0, 992, 16)
    ]
    assert sum(spread) < 0.2 * sum(spread_u)


# ------------------------------------------------------------------------------------------- teacher cache


@pytest.fixture(scope="module")
def teacher_windows(tmp_path_factory, squad_files):  # noqa: F811
    root = tmp_path_factory.mktemp("teachers")
    teacher = make_checkpoint(root / "t", "bert", layers=2, heads=4, head_dim=8, ffn=37, seed=3)
    maker = WindowMaker(load_tokenizer(teacher), load_checkpoint(teacher).cfg.architecture, SETTINGS)
    feats = train_features(load_squad(squad_files[0]), maker)
    return teacher, feats


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_cached_teacher_logits_equal_live(teacher_windows, tmp_path, backend):
    from engine.runtime import available_backends

    if backend not in available_backends("cpu"):
        pytest.skip(f"backend {backend!r} is not available here: {available_backends('cpu')}")
    teacher, feats = teacher_windows
    cache = cached_teacher(teacher, SETTINGS, feats, tmp_path, "float32", backend=backend, progress=False)
    ck = load_checkpoint(teacher)
    live = RaggedQAModel(ck.cfg)
    live.load_state_dict(ck.state)
    live = LiveTeacher(live)
    idx = [0, 5, 3, len(feats) - 1, 7]
    batch = collate([feats[k] for k in idx])[0]
    got, want = cache.logits(idx, batch, False), live.logits(idx, batch, False)
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=0)
    # The second student of this teacher reuses the file (no recomputation: same path, same contents).
    again = cached_teacher(teacher, SETTINGS, feats, tmp_path, "float32", backend=backend, progress=False)
    assert again.path == cache.path and len(list(tmp_path.glob("*.safetensors"))) == 1


def test_stale_teacher_cache_is_refused(teacher_windows, tmp_path):
    teacher, feats = teacher_windows
    cache = cached_teacher(teacher, SETTINGS, feats, tmp_path / "c", "float32", backend="torch", progress=False)
    other = make_checkpoint(tmp_path / "other", "bert", layers=2, heads=4, head_dim=8, ffn=37, seed=4)
    with pytest.raises(StaleTeacherCacheError, match="teacher_sha"):
        CachedTeacher(cache.path, CacheKey.of(other, SETTINGS, feats, "float32"))
    with pytest.raises(StaleTeacherCacheError, match="settings"):
        CachedTeacher(cache.path, CacheKey.of(teacher, WindowSettings(64, 32, 16), feats, "float32"))
    with pytest.raises(StaleTeacherCacheError, match="windows_sha"):
        CachedTeacher(cache.path, CacheKey.of(teacher, SETTINGS, feats[1:] + feats[:1], "float32"))
    with pytest.raises(StaleTeacherCacheError, match="precision"):
        CachedTeacher(cache.path, CacheKey.of(teacher, SETTINGS, feats, "int8"))
    tok = tmp_path / "tok"
    import shutil

    shutil.copytree(teacher, tok)
    (tok / "tokenizer_config.json").write_text((tok / "tokenizer_config.json").read_text().replace("}", ', "x": 1}', 1))
    with pytest.raises(StaleTeacherCacheError, match="tokenizer_sha"):
        CachedTeacher(cache.path, CacheKey.of(tok, SETTINGS, feats, "float32"))
    with pytest.raises(StaleTeacherCacheError, match="live"):  # the message names the fixes
        cached_teacher(other, SETTINGS, feats, cache.path, "float32", backend="torch", progress=False)


def _counting_windows(monkeypatch, fail_at: int | None = None) -> list[int]:
    """Count the chunks the teacher actually runs (their window counts); raise KeyboardInterrupt at call `fail_at`."""
    import engine.train.logit_cache as cache_mod

    real, calls = cache_mod._run_windows, []

    def run(runner, feats, tokens, bar):
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        calls.append(len(feats))
        return real(runner, feats, tokens, bar)

    monkeypatch.setattr(cache_mod, "_run_windows", run)
    return calls


def test_an_interrupted_teacher_cache_resumes_at_its_first_missing_chunk(teacher_windows, tmp_path, monkeypatch):
    teacher, feats = teacher_windows
    c = max(1, len(feats) // 4)  # 4-5 chunks, the last one short when c does not divide the windows
    n_chunks = -(-len(feats) // c)
    whole = cached_teacher(
        teacher, SETTINGS, feats, tmp_path / "one", backend="torch", progress=False, chunk_windows=10**9
    )
    with monkeypatch.context() as m:
        _counting_windows(m, fail_at=2)
        with pytest.raises(KeyboardInterrupt):
            cached_teacher(teacher, SETTINGS, feats, tmp_path / "c", backend="torch", progress=False, chunk_windows=c)
    assert not list((tmp_path / "c").glob("*.safetensors"))  # no final file: nothing claims to be complete
    assert len(list((tmp_path / "c" / "chunks").glob("*.safetensors"))) == 2
    with monkeypatch.context() as m:
        calls = _counting_windows(m)
        got = cached_teacher(teacher, SETTINGS, feats, tmp_path / "c", backend="torch", progress=False, chunk_windows=c)
    assert len(calls) == n_chunks - 2 and sum(calls) == len(feats) - 2 * c  # only the missing chunks ran
    assert torch.equal(got.offsets, whole.offsets)
    torch.testing.assert_close(got.start, whole.start, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.end, whole.end, atol=1e-5, rtol=0)
    # A damaged chunk is recomputed, not trusted; the finished cache no longer needs its chunks.
    chunk = sorted((tmp_path / "c" / "chunks").glob("*.safetensors"))[0]
    chunk.write_bytes(chunk.read_bytes()[:100])
    (got.path).unlink()
    with monkeypatch.context() as m:
        calls = _counting_windows(m)
        again = cached_teacher(
            teacher, SETTINGS, feats, tmp_path / "c", backend="torch", progress=False, chunk_windows=c
        )
    assert len(calls) == 1
    torch.testing.assert_close(again.start, whole.start, atol=1e-5, rtol=0)


def test_a_larger_teacher_cache_reuses_a_smaller_ones_chunks(teacher_windows, tmp_path, monkeypatch):
    teacher, feats = teacher_windows
    c = max(1, len(feats) // 4)
    with monkeypatch.context() as m:
        calls = _counting_windows(m)
        small = cached_teacher(
            teacher, SETTINGS, feats[: 2 * c + 1], tmp_path, backend="torch", progress=False, chunk_windows=c
        )
    assert calls == [c, c, 1]
    with monkeypatch.context() as m:
        calls = _counting_windows(m)
        big = cached_teacher(teacher, SETTINGS, feats, tmp_path, backend="torch", progress=False, chunk_windows=c)
    assert sum(calls) == len(feats) - 2 * c and calls[0] == min(
        c, len(feats) - 2 * c
    )  # the short chunk is not a prefix
    assert big.path != small.path and len(list(tmp_path.glob("*.safetensors"))) == 2
    n = int(small.offsets[-1])
    assert torch.equal(big.offsets[: 2 * c + 2], small.offsets)
    torch.testing.assert_close(big.start[:n], small.start, atol=1e-5, rtol=0)


def test_a_larger_teacher_cache_reuses_a_finished_smaller_cache_file(teacher_windows, tmp_path, monkeypatch):
    import shutil

    teacher, feats = teacher_windows
    c = max(1, len(feats) // 4)
    small = cached_teacher(
        teacher, SETTINGS, feats[: 2 * c + 1], tmp_path, backend="torch", progress=False, chunk_windows=10**9
    )
    shutil.rmtree(tmp_path / "chunks")  # a cache file made before caches were chunked, or with its chunks deleted
    other = make_checkpoint(tmp_path / "other", "bert", layers=2, heads=4, head_dim=8, ffn=37, seed=4)
    cached_teacher(other, SETTINGS, feats[:c], tmp_path, backend="torch", progress=False)  # another teacher's: unused
    with monkeypatch.context() as m:
        calls = _counting_windows(m)
        big = cached_teacher(teacher, SETTINGS, feats, tmp_path, backend="torch", progress=False, chunk_windows=c)
    assert sum(calls) == len(feats) - 2 * c  # the two chunks inside the smaller file's windows were not rerun
    n = int(small.offsets[-1])
    assert torch.equal(big.offsets[: 2 * c + 2], small.offsets)
    assert torch.equal(big.start[:n], small.start) and torch.equal(big.end[:n], small.end)
    fresh = cached_teacher(teacher, SETTINGS, feats, tmp_path / "fresh", backend="torch", progress=False)
    torch.testing.assert_close(big.start, fresh.start, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- one cost model


@pytest.mark.parametrize("seq", [17, 384])
def test_expected_flops_at_closed_open_gates_equal_exported_count(tmp_path, seq):
    ck = load_checkpoint(make_checkpoint(tmp_path / "m", "bert", layers=3, heads=4, head_dim=8, ffn=29, seed=1))
    base = RaggedQAModel(ck.cfg)
    base.load_state_dict(ck.state)
    gated = GatedQAModel(base)
    g = torch.Generator().manual_seed(seq)
    with torch.no_grad():
        for gate in [*gated.head_gates, *gated.ffn_gates]:
            open_ = torch.rand(gate.log_alpha.shape, generator=g) < 0.5
            gate.log_alpha.copy_(torch.where(open_, torch.tensor(float("inf")), torch.tensor(float("-inf"))))
        gated.head_gates[1].log_alpha.fill_(float("-inf"))  # a 0-head layer
    ph, pf, _, _ = gated._probs()
    expected = expected_flops(ph, pf, ck.cfg.hidden, ck.cfg.head_dim, seq).detach()
    cfg, _ = export_ragged(gated)
    assert cfg.heads[1] == 0
    assert float(expected) == exact_flops(cfg.heads, cfg.ffn, cfg.hidden, cfg.head_dim, seq)
    assert float(expected) * seq == encoder_flops(cfg, 1, seq)
    dense = encoder_flops(ck.cfg, 1, seq)
    assert float(gated.expected_sparsity(ck.cfg, seq)) == pytest.approx(
        1 - encoder_flops(cfg, 1, seq) / dense, abs=1e-6
    )


@pytest.mark.parametrize("p", [0.1, 0.37, 0.5])
def test_dropout_keeps_each_element_with_probability_one_minus_p(p):
    from engine.model import Dropout

    drop = Dropout(p).train()
    x = torch.rand(1000, 1001) + 0.5  # no zeros of its own; an odd element count (not a multiple of 4)
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    n = x.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5 + 2**-16
    assert torch.equal(y[kept], x[kept] * (1.0 / (1.0 - p)))  # survivors scaled, as nn.Dropout does
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # seeded by torch's generator, so a resumed run draws the same masks
    rows = kept.float().mean(1)  # no stripes: every row keeps about 1 - p of its elements
    assert (rows - (1 - p)).abs().max() < 6 * (p * (1 - p) / x.shape[1]) ** 0.5
    x.requires_grad_(True)
    torch.manual_seed(1)
    drop(x).sum().backward()
    torch.manual_seed(1)
    assert torch.equal(x.grad, drop(torch.ones_like(x)))  # gradient: the same mask, the same scale


def test_dropout_edge_cases():
    from engine.model import Dropout

    x = torch.randn(7, 5)
    assert Dropout(0.5).eval()(x) is x and Dropout(0.0).train()(x) is x
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    y = Dropout(0.25).train()(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert Dropout(0.0).train()(torch.empty(0, 384)).shape == (0, 384)
    assert Dropout(0.3).train()(torch.empty(0, 384)).shape == (0, 384)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="dropout probability"):
            Dropout(bad)


@pytest.mark.parametrize("lengths", [[37, 37, 37], [40, 33, 38], [5, 61, 1]])  # equal, padded, one call each
def test_bf16_attention_on_cpu_runs_in_fp32(lengths):
    from engine.model import attention_packed

    torch.manual_seed(0)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    qkv = torch.randn(sum(lengths), 3, 3, 8).bfloat16()
    want = attention_packed(qkv.float(), cu, max(lengths))  # fp32 attention of the bf16 inputs
    got = attention_packed(qkv, cu, max(lengths))
    assert got.dtype == torch.float32 and torch.equal(got, want)
    with torch.autocast("cpu", torch.bfloat16):  # autocast does not send it back to bf16
        assert torch.equal(attention_packed(qkv, cu, max(lengths)), want)
    for k in range(len(lengths)):  # and each sequence attends only to itself
        a, b = cu[k].item(), cu[k + 1].item()
        q, kk, v = qkv[a:b].float().permute(1, 2, 0, 3).unbind(0)
        ref = torch.softmax(q @ kk.transpose(-1, -2) / 8**0.5, -1) @ v
        torch.testing.assert_close(got[a:b], ref.transpose(0, 1).reshape(b - a, 24), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lengths", [[37, 37, 37], [40, 33, 38], [5, 61, 1]])  # equal, padded, one call each
def test_packed_attention_takes_the_fused_cpu_kernel(lengths):
    """Every path of attention_packed reaches the CPU's fused (flash) SDPA kernel, forward and backward: a 3-D call
    (the per-sequence path once did) falls to the unfused math kernel, 1.65x slower at (12, 200, 32)."""
    from torch.profiler import profile

    from engine.model import attention_packed

    torch.manual_seed(0)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    qkv = torch.randn(sum(lengths), 3, 4, 8, requires_grad=True)
    with profile() as prof:
        attention_packed(qkv, cu, max(lengths)).square().sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" not in names
    assert any(n.startswith("aten::_scaled_dot_product_flash_attention") for n in names), sorted(names)
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()


def test_per_sequence_attention_gradients_match_a_reference():
    """The one-call-per-sequence path (uneven lengths, an empty sequence among them): outputs and gradients equal
    attention computed sequence by sequence from plain softmax(QK^T/sqrt(d))V."""
    from engine.model import attention_packed

    torch.manual_seed(1)
    lengths = [5, 0, 61, 1]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    qkv = torch.randn(sum(lengths), 3, 3, 8, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(sum(lengths), 24, dtype=torch.float64)
    got = attention_packed(qkv, cu, max(lengths))
    (g_got,) = torch.autograd.grad(got, qkv, grad_out)
    refs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        q, k, v = qkv[a:b].permute(1, 2, 0, 3).unbind(0)
        refs.append((torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v).transpose(0, 1).reshape(b - a, 24))
    ref = torch.cat(refs)
    (g_ref,) = torch.autograd.grad(ref, qkv, grad_out)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g_got, g_ref)
