"""HTTP serving with dynamic padding-free batching: `python -m engine.serve ARTIFACT` (docs/SERVING.md)."""

from engine.serve.app import ServeConfig, create_app
from engine.serve.batcher import BatchConfig, Batcher, Job

__all__ = ["BatchConfig", "Batcher", "Job", "ServeConfig", "create_app"]
