"""Training: arguments (upstream flag names), stages, the trainer, launch, the sft recipe."""
