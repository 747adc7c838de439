"""Where checkpoints come from: local roots today."""
