"""How `engine.latency` times a model on the real engine: an artifact of each ragged shape (random weights: only
the shape matters) or of a real checkpoint, run through `engine.runtime`'s backend, timed round-robin.

`EngineTimer` is the `MeasureFn` that `engine.latency.build_table` fits its table to, and the timer of the
measure-and-correct loops (engine.latency_target); `measure_speedup` is the benchmark of a pruned checkpoint against
its dense teacher.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from engine.config import EncoderConfig

MIN_TIME_S, MAX_REPS = 0.2, 50  # per grid point: time at least this long, with at most this many runs
Shape = tuple[tuple[int, ...], tuple[int, ...]]  # (heads per layer, FFN units per layer)


def _latency_state(cfg: EncoderConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of every tensor of `cfg`'s artifact (latency does not depend on the values)."""
    from engine.model import expected_shapes

    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in expected_shapes(cfg).items()}


class EngineTimer:
    """Times `forward_packed` of ragged models on one backend: writes an artifact per shape and runs it."""

    def __init__(
        self,
        dense: EncoderConfig,
        tokenizer_dir: Path,
        backend: str,
        dtype: str,
        batch: int,
        seq: int,
        threads: int,
        reps: int = 3,
        workdir: Path | None = None,
        progress: bool = True,
        min_time_s: float = MIN_TIME_S,
    ):
        from engine.features import WindowSettings

        max_seq = dense.max_position_embeddings - dense.position_offset
        if seq > max_seq:
            raise ValueError(f"--latency-shape seq {seq} exceeds the model's {max_seq} positions")
        if batch < 1 or seq < 8:
            raise ValueError(f"latency shape must have batch >= 1 and seq >= 8, got ({batch},{seq})")
        # A small vocabulary keeps each artifact small; the embedding lookup costs the same.
        self.cfg = EncoderConfig.from_dict({**dense.to_dict(), "vocab_size": min(dense.vocab_size, 1024)})
        self.tokenizer_dir, self.backend, self.dtype = Path(tokenizer_dir), backend, dtype
        self.threads, self.reps, self.progress, self.min_time_s = threads, reps, progress, min_time_s
        self.settings = WindowSettings(seq, max(1, seq // 4), max(1, seq // 4))
        self._tmp = tempfile.TemporaryDirectory(prefix="sparseqa-latency-", dir=workdir)
        g = torch.Generator().manual_seed(batch * 1000 + seq)
        self.ids = torch.randint(5, self.cfg.vocab_size, (batch * seq,), generator=g)
        self.types = torch.zeros_like(self.ids)
        self.cu = torch.arange(0, batch + 1, dtype=torch.int32) * seq
        self.seq = seq
        self._n = 0

    def close(self) -> None:
        """Delete the temporary artifacts."""
        self._tmp.cleanup()

    def _template(self) -> Path:
        """An artifact of the empty model, written once: its tokenizer files and manifest are reused."""
        from engine.artifact import save_artifact

        root = Path(self._tmp.name) / "template"
        if not (root / "engine.json").is_file():
            cfg = self.cfg.with_shape((0,) * self.cfg.num_layers, (0,) * self.cfg.num_layers)
            save_artifact(root, cfg, _latency_state(cfg), self.tokenizer_dir, self.settings, self.dtype)
        return root

    def load(self, heads: Sequence[int], ffn: Sequence[int]) -> Any:
        """A backend running a random-weight model of this ragged shape (an artifact written for it)."""
        from safetensors.torch import save_file

        from engine.artifact import Artifact, TokenizerSpec
        from engine.manifest import DTYPES, FORMAT, MANIFEST, WEIGHTS
        from engine.runtime import create_backend

        template = self._template()
        manifest = json.loads((template / MANIFEST).read_text())
        cfg = self.cfg.with_shape(tuple(heads), tuple(ffn))
        out = Path(self._tmp.name) / f"m{self._n}"
        self._n += 1
        out.mkdir()
        for f in manifest["tokenizer"]["files"]:
            os.link(template / f, out / f)
        state = {k: v.to(DTYPES[self.dtype]).contiguous() for k, v in _latency_state(cfg).items()}
        save_file(state, str(out / WEIGHTS), metadata={"format": FORMAT})
        (out / MANIFEST).write_text(json.dumps({**manifest, "config": cfg.to_dict()}, indent=1))
        t = manifest["tokenizer"]
        tok = TokenizerSpec(self.settings, bool(t["do_lower_case"]), bool(t["strip_accents"]), list(t["files"]))
        artifact = Artifact(out, cfg, self.dtype, tok, 0.0, {}, state)
        return create_backend(self.backend, artifact, "cpu", self.threads)

    def run(self, model: Any) -> float:
        """Milliseconds of one forward (no warm-up)."""
        t0 = time.perf_counter()
        model.forward_packed(self.ids, self.types, self.cu, self.seq)
        return (time.perf_counter() - t0) * 1e3

    def __call__(self, shapes: Sequence[Shape]) -> list[float]:
        """Latency (ms) of each shape: the fastest run over `reps` round-robin rounds (after one warm-up each).

        Rounds visit every model in turn, so slow drift in machine load touches all of them alike; each round runs a
        model until it has taken `min_time_s` (at most MAX_REPS runs). The minimum, not the median: on a shared
        machine other processes only ever add time.
        """
        return self.time_models([lambda shape=shape: self.load(*shape) for shape in shapes])

    def load_checkpoint(self, model_dir: Path) -> Any:
        """A backend running the real weights of a checkpoint (dense or ragged), built with engine.build_model."""
        from engine.artifact import load_artifact
        from engine.build_model import build
        from engine.runtime import create_backend

        out = Path(self._tmp.name) / f"m{self._n}"
        self._n += 1
        build(model_dir, out, dtype=self.dtype, settings=self.settings)
        return create_backend(self.backend, load_artifact(out), "cpu", self.threads)

    def time_models(self, makers: Sequence[Callable[[], Any]]) -> list[float]:
        """Round-robin timing (see `__call__`) of the backends that `makers` create."""
        from tqdm.auto import tqdm

        bar = tqdm(total=len(makers) * (self.reps + 1), desc="latency", unit="model", disable=not self.progress)
        models = []
        for make in makers:
            models.append(make())
            self.run(models[-1])  # warm-up: first touch, oneDNN primitive creation
            bar.update(1)
        best = [math.inf] * len(models)
        self.per_round = [[] for _ in models]  # each round's fastest run of each model, for paired ratios
        for _ in range(self.reps):
            for i, m in enumerate(models):
                t = self.run(m)
                runs = min(MAX_REPS, max(1, math.ceil(self.min_time_s * 1e3 / max(t, 1e-3))))
                self.per_round[i].append(min([t, *(self.run(m) for _ in range(runs - 1))]))
                best[i] = min(best[i], self.per_round[i][-1])
                bar.update(1)
        bar.close()
        return best

    def paired_speedup(self, model: int = 0, dense: int = 1) -> float:
        """Median over rounds of dense / model latency, each pair measured back to back in the last timing: robust
        to load that changes between rounds, which the ratio of the two minima is not."""
        return statistics.median(d / m for m, d in zip(self.per_round[model], self.per_round[dense]))


def measure_speedup(
    model_dir: str | Path,
    dense_dir: str | Path,
    batch: int,
    seq: int,
    backend: str = "cpp",
    threads: int = 2,
    dtype: str = "float32",
    rounds: int = 7,
    progress: bool = False,
) -> dict[str, float]:
    """The benchmark of a pruned checkpoint against its dense teacher on one engine: both are built with
    engine.build_model (real weights), then timed round-robin in one process (fastest of `rounds` rounds each).
    Returns `{"ms", "dense_ms"}` (fastest runs), `speedup` (median of per-round paired ratios) and `speedup_min`
    (ratio of the fastest runs)."""
    from engine.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    timer = EngineTimer(
        load_checkpoint(dense_dir).cfg, Path(dense_dir), backend, dtype, batch, seq, threads, rounds, progress=progress
    )
    try:
        ms, dense_ms = timer.time_models(
            [lambda: timer.load_checkpoint(Path(model_dir)), lambda: timer.load_checkpoint(Path(dense_dir))]
        )
        paired = timer.paired_speedup()
    finally:
        timer.close()
    return {"ms": ms, "dense_ms": dense_ms, "speedup": paired, "speedup_min": dense_ms / ms, "rounds": rounds}
