"""Using what a run trained: loading a checkpoint and predicting."""
