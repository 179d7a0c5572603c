"""Training: losses, the explicit loop, checkpoints and resume."""
