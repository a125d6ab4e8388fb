"""Training: ASD distillation."""
