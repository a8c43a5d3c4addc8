"""SparseQA: structured pruning and a ragged inference engine for BERT/RoBERTa extractive QA."""

from engine import openmp  # noqa: F401  (first: bounds OpenMP spinning before anything loads torch)
from engine.config import Architecture, EncoderConfig

__all__ = ["Architecture", "EncoderConfig", "QAEngine", "Answer"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # QAEngine pulls in tokenizers and the runtime; import it lazily so `import engine` stays cheap.
    if name in ("QAEngine", "Answer"):
        from engine import qa

        return getattr(qa, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
