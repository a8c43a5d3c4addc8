"""Training batches: the epoch's window order (seeded, optionally grouped by length) and packed collation.

Shapes: B windows per batch, T packed tokens (sum of window lengths), `cu_seqlens` int32 `[B+1]`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engine.data.squad import TrainFeature
from engine.features import PackedBatch, pack_windows

# Length grouping sorts windows within chunks of this many steps: enough for tight lengths, still well mixed.
GROUP_STEPS = 64


def epoch_order(lengths: Sequence[int], per_step: int, seed: int, epoch: int, group_by_length: bool) -> np.ndarray:
    """The window order of one epoch; step k uses `order[k * per_step:(k + 1) * per_step]`.

    Depends only on (lengths, per_step, seed, epoch, group_by_length), so a resumed run sees the same batches.
    With grouping, windows are shuffled, sorted by length within chunks of GROUP_STEPS steps, cut into steps,
    and the steps are shuffled; the windows that do not fill a step go last (unused this epoch).
    """
    rng = np.random.default_rng([seed, epoch])
    n = len(lengths)
    perm = rng.permutation(n)
    if not group_by_length:
        return perm
    lens = np.asarray(lengths)
    chunk = GROUP_STEPS * per_step
    flat = (
        np.concatenate([c[np.argsort(-lens[c], kind="stable")] for c in np.array_split(perm, range(chunk, n, chunk))])
        if n
        else perm
    )
    n_full = (n // per_step) * per_step
    steps = flat[:n_full].reshape(-1, per_step)[rng.permutation(n // per_step)]
    return np.concatenate([steps.reshape(-1), flat[n_full:]])


def collate(features: Sequence[TrainFeature]) -> tuple[PackedBatch, torch.Tensor, torch.Tensor]:
    """Pack labelled windows padding-free; returns (batch, start positions `[B]`, end positions `[B]`)."""
    return pack_windows(features), torch.tensor([f.start for f in features]), torch.tensor([f.end for f in features])
