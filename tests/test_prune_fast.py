"""Post-training pruning (engine.prune_fast): Fisher scores, search, rearrangement, least-squares tuning, the latency
search. The command line is tests/test_prune_fast_cli.py."""

from __future__ import annotations

import pytest
import torch

from engine.config import EncoderConfig
from engine.data.squad import TrainFeature
from engine.flops import encoder_flops
from engine.model import RaggedQAModel
from engine.prune_fast.masked import fisher, fold_masks, mask_gradients, masked_forward
from engine.prune_fast.search import flops_cost, pruned_objective, rearrange, search
from engine.prune_fast.tune import refit_projections, refit_solve, solve_scales, tune_masks
from engine.train.batching import collate
from engine.train.losses import span_loss
from tests.conftest import slow_pruned_timer

CFG = EncoderConfig(
    architecture="bert",
    vocab_size=50,
    hidden=16,
    head_dim=4,
    heads=(4, 4, 4),
    ffn=(7, 9, 5),
    max_position_embeddings=64,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    activation="gelu",
    pad_token_id=0,
)


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> RaggedQAModel:
    torch.manual_seed(seed)
    m = RaggedQAModel(CFG).to(dtype).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "ln" not in name:
                p.normal_(0, 0.3)
    return m


def _features(n: int, seed: int = 0) -> list[TrainFeature]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 14, (1,), generator=g))
        ids = torch.randint(1, CFG.vocab_size, (length,), generator=g).tolist()
        s = int(torch.randint(0, length, (1,), generator=g))
        out.append(TrainFeature(ids, [0] * 3 + [1] * (length - 3), s, min(length - 1, s + 1)))
    return out


def assert_same_logits(student: RaggedQAModel, teacher: RaggedQAModel) -> None:
    """The two models' start and end logits agree (to 1e-6) on fresh windows."""
    packed, _, _ = collate(_features(9, seed=5))
    args = (packed.input_ids, packed.token_type_ids, packed.cu_seqlens, packed.max_seqlen)
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(student(*args)), torch.stack(teacher(*args)), atol=1e-6, rtol=1e-6)


def _masks(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.rand(h, generator=g) < 0.6 for h in CFG.heads], [torch.rand(f, generator=g) < 0.6 for f in CFG.ffn])


# ---------------------------------------------------------------------------------------------------- Fisher


def test_mask_gradients_match_finite_differences():
    model = _model(dtype=torch.float64)
    feats = _features(6)
    hg, fg = mask_gradients(model, feats, batch=6, batches=[0])
    packed, sp, ep = collate(feats)

    def loss(hm, fm):
        s, e = masked_forward(
            model, hm, fm, packed.input_ids, packed.token_type_ids, packed.cu_seqlens, packed.max_seqlen
        )
        return float(span_loss(s.double(), e.double(), packed.cu_seqlens, packed.max_seqlen, sp, ep))

    eps = 1e-3
    for kind, grads in (("head", hg), ("ffn", fg)):
        for layer in range(CFG.num_layers):
            for j in range(grads[layer].shape[1]):
                ones = [
                    [torch.ones(h, dtype=torch.float64) for h in CFG.heads],
                    [torch.ones(f, dtype=torch.float64) for f in CFG.ffn],
                ]
                idx = 0 if kind == "head" else 1
                plus, minus = [[m.clone() for m in ms] for ms in ones], [[m.clone() for m in ms] for ms in ones]
                plus[idx][layer][j] += eps
                minus[idx][layer][j] -= eps
                fd = (loss(*plus) - loss(*minus)) / (2 * eps)
                assert grads[layer][0, j].item() == pytest.approx(fd, rel=2e-2, abs=2e-4), (kind, layer, j)
    # Fisher = sum over mini-batches of squared gradients
    hg2, _ = mask_gradients(model, feats, batch=3, batches=[0, 1])
    assert torch.allclose(fisher(hg2)[1], hg2[1].double().pow(2).sum(0))


def test_fold_masks_equals_masked_model():
    model = _model()
    hk, fk = _masks(3)
    g = torch.Generator().manual_seed(1)
    hm = [k.float() * (0.5 + torch.rand(k.numel(), generator=g)) for k in hk]
    fm = [k.float() * (0.5 + torch.rand(k.numel(), generator=g)) for k in fk]
    cfg, state = fold_masks(model, hm, fm)
    assert cfg.heads == tuple(int(k.sum()) for k in hk) and cfg.ffn == tuple(int(k.sum()) for k in fk)
    pruned = RaggedQAModel(cfg).eval()
    pruned.load_state_dict(state)
    packed, _, _ = collate(_features(4))
    args = (packed.input_ids, packed.token_type_ids, packed.cu_seqlens, packed.max_seqlen)
    with torch.no_grad():
        ref = masked_forward(model, hm, fm, *args)
        got = pruned(*args)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- search


def test_search_respects_flop_budget_and_prefers_high_fisher():
    g = torch.Generator().manual_seed(0)
    hs = [torch.rand(h, generator=g, dtype=torch.float64) for h in CFG.heads]
    fs = [torch.rand(f, generator=g, dtype=torch.float64) * 0.01 for f in CFG.ffn]
    cost = flops_cost(CFG, 32)
    full = encoder_flops(CFG, 1, 32)
    for target in (0.2, 0.5, 0.8):
        res = search(hs, fs, cost, (1 - target) * full)
        shape = CFG.with_shape(tuple(int(m.sum()) for m in res.head_masks), tuple(int(m.sum()) for m in res.ffn_masks))
        assert encoder_flops(shape, 1, 32) <= (1 - target) * full
        # within a layer, kept heads are the highest-scoring ones
        for m, s in zip(res.head_masks, hs):
            if m.any() and (~m).any():
                assert s[m].min() >= s[~m].max()
    with pytest.raises(ValueError, match="no pruned shape fits"):
        search(hs, fs, lambda h, f: 1.0 + sum(h) + sum(f), 0.5)


def test_rearrangement_never_raises_its_objective():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        n = int(torch.randint(2, 40, (1,), generator=g))
        grads = torch.randn(16, n, generator=g)
        keep = torch.rand(n, generator=g) < 0.5
        after = rearrange(grads, keep)
        assert int(after.sum()) == int(keep.sum())
        assert pruned_objective(grads, after) <= pruned_objective(grads, keep) + 1e-9
    # Unit 1's gradient nearly cancels those of units 2 and 3: pruning {1, 3} beats the diagonal choice {2, 3}
    # (the two smallest diagonal scores), objective 2.44 against 8.
    grads = torch.tensor([[4.0, -2.0, 1.0, 1.0], [4.0, -2.2, 1.0, 1.0]])
    keep = torch.tensor([True, True, False, False])
    after = rearrange(grads, keep)
    assert after[0] and not after[1]
    assert pruned_objective(grads, after) == pytest.approx(2.44)
    assert pruned_objective(grads, keep) == pytest.approx(8.0)


# ---------------------------------------------------------------------------------------------------- tuning


def test_solve_scales_rejects_wild_solutions():
    assert solve_scales(torch.eye(2), torch.tensor([1.0, 2.0])).tolist() == pytest.approx([1.0, 2.0])
    assert solve_scales(torch.eye(2), torch.tensor([1.0, 50.0])) is None


def test_tuning_recovers_known_scales_exactly():
    """The teacher is a model whose pruned units output nothing; the student is the same model with each kept
    head's/unit's output columns divided by a known scale. Layer-wise least squares must recover the scales."""
    teacher = _model(seed=5, dtype=torch.float64)
    hk, fk = _masks(7)
    g = torch.Generator().manual_seed(2)
    true_h = [k.double() * (0.5 + torch.rand(k.numel(), generator=g, dtype=torch.float64)) for k in hk]
    true_f = [k.double() * (0.5 + torch.rand(k.numel(), generator=g, dtype=torch.float64)) for k in fk]
    student = _model(seed=5, dtype=torch.float64)
    with torch.no_grad():
        for l, (tl, sl) in enumerate(zip(teacher.layers, student.layers)):
            col_h = hk[l].repeat_interleave(CFG.head_dim)
            tl.o.weight[:, ~col_h] = 0
            tl.ffn_out.weight[:, ~fk[l]] = 0
            scale_h = torch.where(col_h, true_h[l].repeat_interleave(CFG.head_dim), torch.ones(len(col_h)))
            sl.o.weight.copy_(tl.o.weight / scale_h)
            sl.ffn_out.weight.copy_(tl.ffn_out.weight / torch.where(fk[l], true_f[l], torch.ones(len(fk[l]))))
    hm, fm, infos = tune_masks(student, _features(12), hk, fk, batch=5, progress=False, teacher=teacher)
    for l in range(CFG.num_layers):
        torch.testing.assert_close(hm[l].double(), true_h[l], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fm[l].double(), true_f[l], atol=1e-5, rtol=1e-5)
        assert not any(k.endswith("rejected") for k in infos[l])


def test_tuning_reduces_reconstruction_error():
    """On a real pruning problem (teacher = the unmasked model), tuned scales fit the teacher better than 0/1."""
    model = _model(seed=1)
    hk, fk = _masks(11)
    feats = _features(16)
    hm, fm, _ = tune_masks(model, feats, hk, fk, batch=8, progress=False)
    packed, _, _ = collate(feats)
    args = (packed.input_ids, packed.token_type_ids, packed.cu_seqlens, packed.max_seqlen)

    def last_hidden(hmask, fmask) -> torch.Tensor:
        x = model.embeddings(packed.input_ids, packed.token_type_ids, packed.cu_seqlens)
        from engine.prune_fast.masked import masked_layer

        for layer, a, b in zip(model.layers, hmask, fmask):
            x = masked_layer(layer, x, packed.cu_seqlens, packed.max_seqlen, a, b)
        return x

    with torch.no_grad():
        ref = model(*args, output_hidden_states=True)[2][-1]
        err_binary = (last_hidden([k.float() for k in hk], [k.float() for k in fk]) - ref).pow(2).mean()
        err_tuned = (last_hidden(hm, fm) - ref).pow(2).mean()
    assert err_tuned < err_binary


# ----------------------------------------------------------------------------------------------------- refit


def test_refit_solve_recovers_a_known_linear_map():
    """Noise-free targets of a linear map with bias: the ridge solve returns that map (to the ridge's bias)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 7, generator=g, dtype=torch.float64)
    w_true = torch.randn(8, 5, generator=g, dtype=torch.float64)  # 7 features + the bias row
    x1 = torch.cat([x, torch.ones(500, 1, dtype=torch.float64)], 1)
    w = refit_solve(x1.t() @ x1, x1.t() @ (x1 @ w_true), torch.zeros(8, 5, dtype=torch.float64), ridge=1e-12)
    torch.testing.assert_close(w, w_true, atol=1e-8, rtol=1e-8)
    # the ridge pulls toward w0: with w0 = the answer, any ridge returns it
    w = refit_solve(x1.t() @ x1, x1.t() @ (x1 @ w_true), w_true, ridge=10.0)
    torch.testing.assert_close(w, w_true, atol=1e-8, rtol=1e-8)
    bad = torch.full((3, 3), float("nan"), dtype=torch.float64)
    w0 = torch.ones(3, 2, dtype=torch.float64)
    assert refit_solve(bad, torch.ones(3, 2, dtype=torch.float64), w0) is w0


@pytest.mark.parametrize("ln_weighted", [False, True])
def test_refit_recovers_perturbed_projections_exactly(ln_weighted):
    """The student is the teacher with every output projection and the QA head perturbed (ragged shapes, a layer
    with no heads and one with no FFN units): the sequential refit must give the teacher's maps back, with the
    errors weighted as after LayerNorm or not."""
    cfg = CFG.with_shape((2, 0, 3), (5, 4, 0))
    torch.manual_seed(4)
    teacher = RaggedQAModel(cfg).double().eval()
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if "ln" not in name:
                p.normal_(0, 0.3)
    student = RaggedQAModel(cfg).double().eval()
    student.load_state_dict(teacher.state_dict())
    names = [n for n, _ in student.named_parameters() if n.startswith("qa.") or ".o." in n or ".ffn_out." in n]
    with torch.no_grad():
        for n, p in student.named_parameters():
            if n in names:
                p.add_(torch.randn_like(p) * 0.2)
    refit, info = refit_projections(
        student, teacher, _features(40), batch=7, progress=False, ridge=1e-12, ln_weighted=ln_weighted
    )
    assert set(refit) == set(names)
    ref = teacher.state_dict()
    for n in names:
        if not n.startswith("qa."):  # the head's inputs are LayerNorm outputs, one direction short of full rank
            torch.testing.assert_close(refit[n], ref[n], atol=1e-5, rtol=1e-5)
    student.load_state_dict({**student.state_dict(), **refit})
    assert_same_logits(student, teacher)
    for layer in info["layers"]:
        for kind in ("attention", "ffn"):
            assert layer[f"{kind}_rel_err_after"] < 1e-8 <= layer[f"{kind}_rel_err_before"]
    assert info["head"]["qa_rel_err_after"] < 1e-8


def test_refit_lowers_the_error_of_a_pruned_model():
    """A real pruning problem (tuned scales folded in): refitting never raises a sublayer's own least-squares error
    on the fitting windows, and brings the logits closer to the unpruned teacher's on held-out windows."""
    teacher = _model(seed=1)
    hk, fk = _masks(11)
    feats, held = _features(48), _features(16, seed=9)
    hm, fm, _ = tune_masks(teacher, feats, hk, fk, batch=8, progress=False)
    cfg, state = fold_masks(teacher, hm, fm)
    student = RaggedQAModel(cfg).eval()
    student.load_state_dict(state)
    packed, _, _ = collate(held)
    args = (packed.input_ids, packed.token_type_ids, packed.cu_seqlens, packed.max_seqlen)
    with torch.no_grad():
        ref = torch.stack(teacher(*args), 1)
        before = (torch.stack(student(*args), 1) - ref).pow(2).mean()
    for layers, head in ((False, True), (True, False), (True, True)):
        s = RaggedQAModel(cfg).eval()
        s.load_state_dict(state)
        refit, info = refit_projections(s, teacher, feats, batch=8, layers=layers, head=head, progress=False)
        assert any(n.startswith("qa.") for n in refit) == head
        assert any(n.startswith("layers.") for n in refit) == layers
        for layer in info["layers"]:
            for kind in ("attention", "ffn") if layers else ():
                assert layer[f"{kind}_rel_err_after"] <= layer[f"{kind}_rel_err_before"] + 1e-9
        if head:
            assert info["head"]["qa_rel_err_after"] <= info["head"]["qa_rel_err_before"] + 1e-9
        s.load_state_dict({**state, **refit})
        with torch.no_grad():
            after = (torch.stack(s(*args), 1) - ref).pow(2).mean()
        assert after < before


def test_latency_search_corrects_a_biased_table(monkeypatch):
    """The table over-predicts pruned speed by 15% (the engine's pruned models are slower than its sum of layers):
    the measure-and-correct loop must still land within tolerance of the requested speedup, as measured."""
    import argparse

    import engine.latency as lat
    import engine.latency_timer as timer
    from engine.latency_table import LatencyKey, dims_hash
    from engine.prune_fast.stages import _latency_search

    dense = CFG.with_shape((12, 12, 12), (400, 400, 400))

    def table_ms(heads, ffn):
        return 2.0 + sum(0.5 * h + 0.01 * f + (0.3 if h else 0) for h, f in zip(heads, ffn))

    table = lat.build_table(
        dense,
        LatencyKey("x", "cpp", "float32", 8, 32, 2, dims_hash(dense)),
        lambda shapes: [table_ms(*s) for s in shapes],
        n_validation=0,
    )

    # the truth: pruned shapes 15% slower than the table says, the dense one exact
    engine_ms, FakeTimer = slow_pruned_timer(table, dense)

    monkeypatch.setattr(lat, "load_or_measure", lambda *a, **k: table)
    monkeypatch.setattr(timer, "EngineTimer", FakeTimer)
    g = torch.Generator().manual_seed(0)
    hs = [torch.rand(12, generator=g, dtype=torch.float64) for _ in range(3)]
    fs = [torch.rand(400, generator=g, dtype=torch.float64) * 0.01 for _ in range(3)]
    args = argparse.Namespace(
        latency_shape="8,32",
        threads=2,
        latency_threads=None,
        teacher=None,
        backend="cpp",
        latency_dtype="float32",
        latency_table=None,
        remeasure_latency=False,
        target_latency_ms=None,
        target_speedup=1.5,
        latency_iterations=4,
        latency_tolerance=0.03,
    )
    res, info = _latency_search(args, dense, hs, fs, progress=False)
    first, last = info["verification"][0], info["verification"][-1]
    assert first["rel_error"] < -0.1  # the table alone misses by ~15%
    assert abs(last["rel_error"]) <= 0.03
    shape = (tuple(int(m.sum()) for m in res.head_masks), tuple(int(m.sum()) for m in res.ffn_masks))
    assert engine_ms(dense.heads, dense.ffn) / engine_ms(*shape) == pytest.approx(1.5, rel=0.03)
