"""Metrics as sums and counts, so they add up across batches and all-reduce across ranks.

Everything stays on the device during an epoch (no per-step host sync); ``compute``
reads the totals once, after they have been reduced over all processes.
"""
from __future__ import annotations

import torch

_LOSS, _CORRECT, _COUNT = range(3)


class ClassificationMetrics:
    """Running loss sum, correct predictions and example count, kept in one device tensor."""

    def __init__(self, device: torch.device):
        # float64 so that sums over many batches stay exact enough to compare across world sizes
        # (MPS has no float64, so it falls back to float32 there).
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.totals = torch.zeros(3, dtype=dtype, device=device)

    @torch.no_grad()
    def update(self, loss_sum: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """``loss_sum`` is the summed (not averaged) loss of the batch."""
        correct = (logits.argmax(dim=-1) == labels).sum()
        batch = torch.stack([loss_sum.detach().to(self.totals.dtype),
                             correct.to(self.totals.dtype),
                             # a fill kernel, not a host-to-device copy
                             torch.full((), labels.numel(), dtype=self.totals.dtype, device=labels.device)])
        self.totals += batch

    def compute(self) -> dict:
        loss_sum, correct, count = self.totals.tolist()  # the one host sync
        if count == 0:
            return {"loss": float("nan"), "accuracy": float("nan"), "count": 0}
        return {"loss": loss_sum / count, "accuracy": correct / count, "count": int(count)}
