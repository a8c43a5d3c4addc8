"""Training-side structured pruning: hard-concrete gates, L0 target control, distillation."""
