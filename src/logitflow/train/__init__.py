"""Training loops: DPO (and distillation, to come) sharing precision, schedule and checkpoints."""
