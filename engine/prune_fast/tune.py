"""Mask tuning (Kwon et al.): kept masks become real scales, fitted layer by layer by linear least squares.

Layer l, attention sublayer. The target is the dense teacher's pre-LayerNorm output on the *teacher's* input,
`Z = X_t + Attn(X_t)`. The pruned model computes `X_s + b_O + sum_{h in K} m_h Y_h` on its own input `X_s` (the
output of the already-tuned layers below), where `Y_h = ctx_h W_O,h^T` `[T, d]` is head h's output. The scales
solve `min_m || sum_h m_h Y_h - (Z - X_s - b_O) ||^2` over every token and hidden unit: a `|K| x |K|` normal-equation
system. The FFN sublayer is the same with `Y_u = a_u W_2,u^T` for unit activation `a_u`, whose Gram matrix is
`(A^T A) * (W_2^T W_2)` (elementwise), so it costs one `[T, |K|]` GEMM per batch rather than `|K|` `[T, d]` ones.

The reconstruction target is the dense model, not a less-pruned intermediate: the dense outputs are exactly what
the pruned model should reproduce, and feeding each layer the pruned model's own input lets the scales of layer l
absorb the error left by layers below (an intermediate target would add its own error on top).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from engine.data.squad import TrainFeature
from engine.model import Layer, RaggedQAModel
from engine.prune_fast.masked import head_context
from engine.train.batching import collate

MAX_SCALE = 10.0  # as Kwon et al.: a solution with a larger |scale| is ill-conditioned; keep the binary mask


@dataclass
class _Chunk:
    """One batch of tuning windows: packing and the current teacher and student hidden states `[T, d]`."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    teacher: torch.Tensor
    student: torch.Tensor
    ctx: torch.Tensor | None = None  # the student's kept-head context `[T, K*dh]` of the current layer


def embedded_chunks(
    teacher: RaggedQAModel, student: RaggedQAModel | None, features: Sequence[TrainFeature], batch: int
) -> list[_Chunk]:
    """The windows packed `batch` at a time, with both models' embeddings: each layer's first inputs (student None:
    the teacher's layers pruned, so its embeddings, shared: every update of a chunk's state is a new tensor)."""
    chunks, dev = [], teacher.qa.weight.device
    for i in range(0, len(features), batch):
        packed = collate(features[i : i + batch])[0].to(dev)
        x_t = teacher.embeddings(packed.input_ids, packed.token_type_ids, packed.cu_seqlens)
        x_s = x_t if student is None else student.embeddings(packed.input_ids, packed.token_type_ids, packed.cu_seqlens)
        chunks.append(_Chunk(packed.cu_seqlens, packed.max_seqlen, x_t, x_s))
    return chunks


def ridge_solve(
    gram: torch.Tensor, rhs: torch.Tensor, ridge: float, prior: torch.Tensor | None = None
) -> torch.Tensor | None:
    """`argmin_w ||X w - R||^2 + lam ||w - prior||^2` (prior 0 when None) from `gram = X^T X` and `rhs = X^T R`,
    with `lam = ridge * mean(diag(gram))`, in float64; None when the solve fails or the solution is not finite."""
    lam = ridge * float(gram.diagonal().double().mean().clamp_min(1e-30))
    rhs = rhs.double() if prior is None else rhs.double() + lam * prior.double()
    try:
        eye = torch.eye(len(gram), dtype=torch.float64, device=gram.device)
        w = torch.linalg.solve(gram.double() + lam * eye, rhs)
    except RuntimeError:
        return None
    return w if bool(torch.isfinite(w).all()) else None


def solve_scales(gram: torch.Tensor, rhs: torch.Tensor, damping: float = 1e-10) -> torch.Tensor | None:
    """Solve `gram @ m = rhs` (float64, lightly damped); None when the solution is non-finite or beyond MAX_SCALE."""
    if gram.numel() == 0:
        return gram.new_zeros(0, dtype=torch.float64)
    m = ridge_solve(gram, rhs, damping)
    return None if m is None or float(m.abs().max()) > MAX_SCALE else m


def head_outputs(layer: Layer, ctx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Each kept head's contribution to the output projection: `[T, K, d]` from the kept heads' context
    `[T, K*dh]`."""
    c = ctx.view(ctx.shape[0], -1, layer.head_dim)  # (T, K, dh)
    w = layer.o.weight.view(-1, layer.heads, layer.head_dim)[:, keep]  # (d, K, dh)
    return torch.einsum("tkc,dkc->tkd", c, w)


def teacher_attention(t_layer: Layer, chunk: _Chunk) -> torch.Tensor:
    """The teacher's pre-LN1 output `[T, d]` on its own input `chunk.teacher`: the attention sublayer's target."""
    if not t_layer.heads:
        return chunk.teacher + t_layer.o.bias
    ctx_t = head_context(t_layer, chunk.teacher, chunk.cu_seqlens, chunk.max_seqlen)
    return chunk.teacher + torch.addmm(t_layer.o.bias, ctx_t, t_layer.o.weight.t())


def teacher_ffn(t_layer: Layer, h_t: torch.Tensor) -> torch.Tensor:
    """The teacher's pre-LN2 output `[T, d]` on its own post-LN1 state `h_t`: the FFN sublayer's target."""
    return h_t + t_layer.ffn_out(t_layer.act(t_layer.ffn_in(h_t)))


def attention_system(
    t_layer: Layer, layer: Layer, chunk: _Chunk, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Gram `[K, K]`, rhs `[K]`, teacher pre-LN target) of the attention sublayer on one chunk."""
    z = teacher_attention(t_layer, chunk)
    if not layer.heads or not bool(keep.any()):
        return z.new_zeros(0, 0), z.new_zeros(0), z
    chunk.ctx = head_context(layer, chunk.student, chunk.cu_seqlens, chunk.max_seqlen, keep)  # reused after solving
    y = head_outputs(layer, chunk.ctx, keep)
    r = z - chunk.student - layer.o.bias
    return torch.einsum("tkd,tjd->kj", y, y), torch.einsum("tkd,td->k", y, r), z


def ffn_system(
    t_layer: Layer, layer: Layer, h_t: torch.Tensor, h_s: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(activation Gram `[K, K]` (times `W_2^T W_2` gives the system), rhs `[K]`, teacher pre-LN target)."""
    z = teacher_ffn(t_layer, h_t)
    if not bool(keep.any()):
        return z.new_zeros(0, 0), z.new_zeros(0), z
    w_in, b_in, w2 = layer.ffn_in.weight[keep], layer.ffn_in.bias[keep], layer.ffn_out.weight[:, keep]
    a = layer.act(torch.addmm(b_in, h_s, w_in.t()))  # (T, K)
    r = z - h_s - layer.ffn_out.bias
    return a.t() @ a, ((r @ w2) * a).sum(0), z


@torch.inference_mode()
def tune_masks(
    model: RaggedQAModel,
    features: Sequence[TrainFeature],
    head_keep: Sequence[torch.Tensor],
    ffn_keep: Sequence[torch.Tensor],
    batch: int = 32,
    done: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    on_layer: Callable[[int, torch.Tensor, torch.Tensor, dict], None] | None = None,
    progress: bool = True,
    teacher: RaggedQAModel | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[dict]]:
    """Fit real-valued scales for the kept heads and units of every layer, in order (see the module docstring).

    The reconstruction target is `teacher` (default: `model` itself, unmasked: the dense model being pruned).
    `done` holds (head scales, FFN scales) of layers already tuned by an interrupted run: they are applied, not
    re-fitted. `on_layer(l, head_scales, ffn_scales, info)` is called after each newly tuned layer (checkpointing).
    Returns per-layer head scales `[h]`, FFN scales `[f]` (0 for pruned units; on the CPU) and per-layer solver
    info. The models may be on any one device.
    """
    teacher = (teacher if teacher is not None else model).eval()
    model.eval()
    cfg = model.cfg
    chunks = embedded_chunks(teacher, model, features, batch)
    dev = model.qa.weight.device
    head_scales, ffn_scales, infos = [], [], []
    bar = tqdm(total=cfg.num_layers * len(chunks) * 3, desc="tune", unit="batch", disable=not progress)
    for l, (t_layer, layer) in enumerate(zip(teacher.layers, model.layers)):
        hk, fk = head_keep[l].bool().to(dev), ffn_keep[l].bool().to(dev)
        info: dict = {"heads_kept": int(hk.sum()), "ffn_kept": int(fk.sum())}
        # -- attention: accumulate the normal equations, solve, then move both models past LN1
        targets = []
        gram, rhs = (
            torch.zeros(int(hk.sum()), int(hk.sum()), dtype=torch.float64, device=dev),
            torch.zeros(int(hk.sum()), dtype=torch.float64, device=dev),
        )
        for c in chunks:
            g, r, z = attention_system(t_layer, layer, c, hk)
            gram, rhs = gram + g.double(), rhs + r.double()
            targets.append(z)
            bar.update(1)
        hm = _scales(hk, done[l][0].to(dev) if l < len(done) else solve_scales(gram, rhs), info, "heads")
        for c, z in zip(chunks, targets):
            c.teacher = t_layer.ln1(z)
            c.student = _after_attention(layer, c, hm, hk)
        del targets
        # -- FFN: same, then move both models past LN2
        targets = []
        gram, rhs = (
            torch.zeros(int(fk.sum()), int(fk.sum()), dtype=torch.float64, device=dev),
            torch.zeros(int(fk.sum()), dtype=torch.float64, device=dev),
        )
        for c in chunks:
            g, r, z = ffn_system(t_layer, layer, c.teacher, c.student, fk)
            gram, rhs = gram + g.double(), rhs + r.double()
            targets.append(z)
            bar.update(1)
        w2 = layer.ffn_out.weight[:, fk].double()
        fm = _scales(fk, done[l][1].to(dev) if l < len(done) else solve_scales(gram * (w2.t() @ w2), rhs), info, "ffn")
        for c, z in zip(chunks, targets):
            c.teacher = t_layer.ln2(z)
            c.student = layer.ln2(c.student + _ffn_out(layer, c.student, fm))
            bar.update(1)
        head_scales.append(hm.cpu())
        ffn_scales.append(fm.cpu())
        infos.append(info)
        if on_layer is not None and l >= len(done):
            on_layer(l, head_scales[-1], ffn_scales[-1], info)
    bar.close()
    return head_scales, ffn_scales, infos


def _scales(keep: torch.Tensor, solved: torch.Tensor | None, info: dict, kind: str) -> torch.Tensor:
    """Full-length scales: solved values at kept positions (1 if the solve was rejected), 0 elsewhere."""
    if solved is not None and solved.numel() == keep.numel():  # already full-length (resumed)
        return solved.float()
    out = torch.zeros(keep.numel(), device=keep.device)
    if solved is None:
        out[keep] = 1.0
        info[f"{kind}_rejected"] = True
    else:
        out[keep] = solved.float()
    return out


def _after_attention(layer: Layer, c: _Chunk, scales: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Student hidden state after the attention sublayer and LN1, with head scales `[h]` (kept heads' context from
    `attention_system`)."""
    ctx, c.ctx = c.ctx, None
    if ctx is None:
        return layer.ln1(c.student + layer.o.bias)
    cols = keep.repeat_interleave(layer.head_dim)
    ctx = ctx * scales[keep].repeat_interleave(layer.head_dim)
    return layer.ln1(c.student + torch.addmm(layer.o.bias, ctx, layer.o.weight[:, cols].t()))


def _ffn_out(layer: Layer, h: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """FFN sublayer output (bias included) with unit scales `[f]`; only units with a nonzero scale are computed."""
    keep = scales.ne(0)
    if not bool(keep.any()):
        return layer.ffn_out.bias
    a = layer.act(torch.addmm(layer.ffn_in.bias[keep], h, layer.ffn_in.weight[keep].t())) * scales[keep]
    return torch.addmm(layer.ffn_out.bias, a, layer.ffn_out.weight[:, keep].t())


# ------------------------------------------------------------------------------- refit (SparseQA's fifth stage)

REFIT_RIDGE = 1e-4  # ridge toward the tuned weights, relative to the mean diagonal of each system's Gram matrix


def refit_solve(gram: torch.Tensor, rhs: torch.Tensor, w0: torch.Tensor, ridge: float = REFIT_RIDGE) -> torch.Tensor:
    """`argmin_W ||X W - R||^2 + lam ||W - W0||^2` from `gram = X^T X` `[n, n]` and `rhs = X^T R` `[n, d]`, with
    `lam = ridge * mean(diag(gram))`; `w0` `[n, d]` is returned unchanged when the solution is not finite."""
    if gram.numel() == 0:
        return w0
    w = ridge_solve(gram, rhs, ridge, prior=w0)
    return w0 if w is None else w.to(w0.dtype)


class _Normal:
    """Accumulated normal equations `[X 1]^T [X 1]`, `[X 1]^T R` (float64) and the residual of the current
    weights, for one least-squares system whose features are `X` `[T, n]` and targets `R` `[T, d]`."""

    def __init__(self, n: int, d: int, device: torch.device | str = "cpu"):
        self.gram = torch.zeros(n + 1, n + 1, dtype=torch.float64, device=device)
        self.rhs = torch.zeros(n + 1, d, dtype=torch.float64, device=device)
        self.norm = 0.0

    def add(self, x: torch.Tensor, r: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """One chunk: features `x` `[T, n]`, targets `r` `[T, d]`; `rows` `[T]` weights each token's squared error
        by `rows**2` (`ln_rows`)."""
        x1 = torch.cat([x, x.new_ones(len(x), 1)], 1)
        if rows is not None:
            x1, r = x1 * rows[:, None], r * rows[:, None]
        self.gram += (x1.t() @ x1).double()
        self.rhs += (x1.t() @ r).double()
        self.norm += float(r.pow(2).sum())

    def rel_err(self, w: torch.Tensor) -> float:
        """`||[X 1] w - R||^2 / ||R||^2` of weights `w` `[n + 1, d]`, from the accumulated sums alone:
        `||X w - R||^2 = w^T G w - 2 w^T (X^T R) + ||R||^2`."""
        wd = w.double()
        err = float((wd * (self.gram @ wd)).sum() - 2 * (wd * self.rhs).sum()) + self.norm
        return max(err, 0.0) / max(self.norm, 1e-30)

    def solve(self, w0: torch.Tensor, info: dict, kind: str, ridge: float) -> torch.Tensor:
        """The refitted `[n + 1, d]` weights; records the relative error before and after in `info`."""
        w = refit_solve(self.gram, self.rhs, w0, ridge)
        info[f"{kind}_rel_err_before"], info[f"{kind}_rel_err_after"] = self.rel_err(w0), self.rel_err(w)
        return w


def ln_rows(z: torch.Tensor, ln: torch.nn.LayerNorm | None) -> torch.Tensor | None:
    """Per-token weights `[T]` that turn a sublayer's squared pre-LayerNorm error into (to first order) its error
    after `ln`: `1 / sigma_t`, sigma_t the LayerNorm's standard deviation of the target `z` `[T, d]` at token t.
    Tokens whose pre-LN states are large (the [CLS]/[SEP] outliers of BERT) are shrunk by LN, so an unweighted fit
    spends its capacity on them. None (unweighted) when `ln` is None."""
    if ln is None:
        return None
    return torch.rsqrt(z.var(-1, unbiased=False) + ln.eps)


def _stacked(linear: torch.nn.Linear) -> torch.Tensor:
    """`[n + 1, d]`: a linear layer's weight transposed, with its bias as the last row."""
    return torch.cat([linear.weight.t(), linear.bias[None, :]], 0).detach().clone()


def _unstack(linear: torch.nn.Linear, w: torch.Tensor) -> None:
    linear.weight.copy_(w[:-1].t())
    linear.bias.copy_(w[-1])


def refit_head(
    qa: torch.nn.Linear, teacher: RaggedQAModel, chunks: list[_Chunk], info: dict, ridge: float, bar: tqdm
) -> torch.Tensor:
    """The QA head `qa` refitted (`[d + 1, 2]`, `_stacked` layout) so that the student's last hidden states give
    the teacher's start and end logits; records the relative errors as `qa_rel_err_*` in `info`."""
    w0, system = _stacked(qa), _Normal(qa.in_features, 2, qa.weight.device)
    for c in chunks:
        system.add(c.student, teacher.qa(c.teacher))
        bar.update(1)
    return system.solve(w0, info, "qa", ridge)


def _student_context(layer: Layer, c: _Chunk) -> torch.Tensor:
    """The student's attention context `[T, h*dh]` on its own input (`[T, 0]` for a layer with no heads)."""
    if not layer.heads:
        return c.student.new_zeros(len(c.student), 0)
    return head_context(layer, c.student, c.cu_seqlens, c.max_seqlen)


def _refit_sublayer(
    chunks: list[_Chunk],
    teacher_out: Callable[[_Chunk], torch.Tensor],
    features: Callable[[_Chunk], torch.Tensor],
    linear: torch.nn.Linear,
    norms: tuple[torch.nn.Module, torch.nn.Module],
    fit: tuple[dict, str, float] | None,
    bar: tqdm,
    ln_weighted: bool = False,
) -> None:
    """One sublayer of `refit_projections`: with `fit` = (info, name, ridge), refit `linear` (in place) so that
    `X_s + linear(features)` matches the teacher's pre-LN output `teacher_out` (weighted per token by `ln_rows`
    with `ln_weighted`); then move both models' hidden states past the sublayer's LayerNorms (`norms` = teacher's,
    student's)."""
    w0, system, kept = _stacked(linear), _Normal(linear.in_features, linear.out_features, linear.weight.device), []
    for c in chunks:
        z, x = teacher_out(c), features(c)
        system.add(x, z - c.student, ln_rows(z, norms[0] if ln_weighted else None))
        kept.append((z, x))
        bar.update(1)
    if fit is not None:
        _unstack(linear, system.solve(w0, *fit))
    for c, (z, x) in zip(chunks, kept):
        c.teacher = norms[0](z)
        c.student = norms[1](c.student + torch.addmm(linear.bias, x, linear.weight.t()))


@torch.inference_mode()
def refit_projections(
    student: RaggedQAModel,
    teacher: RaggedQAModel,
    features: Sequence[TrainFeature],
    batch: int = 32,
    layers: bool = True,
    head: bool = True,
    progress: bool = True,
    ridge: float = REFIT_RIDGE,
    ln_weighted: bool = False,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Refit the pruned (folded) model's linear maps into the residual stream by least squares against the teacher,
    layer by layer in order, then its QA head. Returns the refitted tensors (state-dict names) and solver info.

    Mask tuning fits one scale per kept unit; this fits the whole output projection of each sublayer (and its bias)
    on the same windows. Layer l, attention: features `[ctx_s 1]` (the kept heads' context on the student's own
    input `X_s`), target `Z - X_s`, with `Z` the teacher's pre-LN1 output as in `attention_system`; FFN: features
    `[a_s 1]` (kept-unit activations), target the teacher's pre-LN2 output minus `H_s`. Each is an `[n+1, n+1]`
    ridge system (n = kept width), regularised toward the tuned weights; a layer with no heads or units refits
    its bias alone. With `ln_weighted`, each token's error is weighted as after the sublayer's LayerNorm
    (`ln_rows`). The QA head: features `[H_s 1]` (the student's last hidden state), target the teacher's start
    and end logits, so the pruned model's span and no-answer scores are put back on the teacher's scale. Both
    models on any one device; the tensors come back on the CPU.
    """
    teacher.eval()
    student.eval()
    chunks = embedded_chunks(teacher, student, features, batch)
    out: dict[str, torch.Tensor] = {}
    infos: list[dict] = []
    bar = tqdm(
        total=student.cfg.num_layers * len(chunks) * 2 + len(chunks) * head,
        desc="refit",
        unit="batch",
        disable=not progress,
    )
    for l, (t_layer, layer) in enumerate(zip(teacher.layers, student.layers)):
        info: dict = {}
        _refit_sublayer(
            chunks,
            lambda c, t_layer=t_layer: teacher_attention(t_layer, c),
            lambda c, layer=layer: _student_context(layer, c),
            layer.o,
            (t_layer.ln1, layer.ln1),
            (info, "attention", ridge) if layers else None,
            bar,
            ln_weighted,
        )
        _refit_sublayer(
            chunks,
            lambda c, t_layer=t_layer: teacher_ffn(t_layer, c.teacher),
            lambda c, layer=layer: layer.act(layer.ffn_in(c.student)),
            layer.ffn_out,
            (t_layer.ln2, layer.ln2),
            (info, "ffn", ridge) if layers else None,
            bar,
            ln_weighted,
        )
        if layers:
            for name in ("o", "ffn_out"):
                lin = getattr(layer, name)
                out[f"layers.{l}.{name}.weight"] = lin.weight.cpu().clone()
                out[f"layers.{l}.{name}.bias"] = lin.bias.cpu().clone()
        infos.append(info)
    head_info: dict = {}
    if head:
        _unstack(student.qa, refit_head(student.qa, teacher, chunks, head_info, ridge, bar))
        out["qa.weight"], out["qa.bias"] = student.qa.weight.cpu().clone(), student.qa.bias.cpu().clone()
    bar.close()
    return out, {"layers": infos, "head": head_info}
