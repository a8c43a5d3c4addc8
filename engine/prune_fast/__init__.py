"""Post-training structured pruning in minutes (Kwon et al., NeurIPS 2022): Fisher mask search, mask rearrangement,
least-squares mask tuning; no retraining. CLI: `python -m engine.prune_fast` (its arguments and their checks:
engine/prune_fast/args.py; the run: cli.py; the stages: stages.py)."""
