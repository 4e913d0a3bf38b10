"""A run: the builder that wires config, data, task, model and engine; checkpoints, resume, the run log."""
