"""Knowledge distillation: the training objective and its config section."""
