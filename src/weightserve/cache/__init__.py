"""The server's model cache: open checkpoints, cached chunks, a memory budget."""
