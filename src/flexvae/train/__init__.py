"""Training: the training loop, memory planning and checkpoints."""
