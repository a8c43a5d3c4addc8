"""Post-training structured pruning in minutes (Kwon et al., NeurIPS 2022): Fisher mask search, mask rearrangement,
least-squares mask tuning; no retraining. CLI: `python -m engine.prune_fast` (engine/prune_fast/cli.py)."""
