"""The engine: one training step (eager or recorded as CUDA graphs), the loop, the process context."""
