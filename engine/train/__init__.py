"""The one trainer: `loop.train` driven by a frozen `TrainConfig`, with typed `ParamGroup`s, the losses in
`losses`, teacher logits live or cached (`teacher`), length-grouped packed batches (`batching`) and pickle-free
resumable state (`state`). `engine.finetune` and `engine.prune` supply only the model, the groups and the hooks.
"""

from engine.train.config import (
    ParamGroup,
    Precision,
    TrainConfig,
    default_threads,
    resolve_device,
    resolve_precision,
    weight_groups,
)
from engine.train.loop import Hooks, curve_hook, train
from engine.train.losses import DistillConfig

__all__ = [
    "DistillConfig",
    "Hooks",
    "ParamGroup",
    "Precision",
    "TrainConfig",
    "curve_hook",
    "default_threads",
    "resolve_device",
    "resolve_precision",
    "train",
    "weight_groups",
]
