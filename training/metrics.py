"""Metrics as sums and counts, so they add up across batches and all-reduce across ranks.

Everything stays on the device during an epoch (no per-step host sync); ``compute``
reads the totals once, after they have been reduced over all processes. One tensor
holds the loss sum, the number of correct predictions, the example count and the
confusion matrix (true x predicted counts), so one all-reduce moves all of it.
"""
from __future__ import annotations

import torch

_LOSS, _CORRECT, _COUNT = range(3)


class ClassificationMetrics:
    """Running loss sum, correct predictions, example count and confusion matrix, in one device tensor."""

    def __init__(self, device: torch.device, num_labels: int = 0):
        # float64 so that sums over many batches stay exact (counts below 2**53; MPS has no float64)
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.num_labels = num_labels
        self.totals = torch.zeros(3 + num_labels * num_labels, dtype=dtype, device=device)

    @torch.no_grad()
    def update(self, loss_sum: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """``loss_sum`` is the summed (not averaged) loss of the batch."""
        preds = logits.argmax(dim=-1)
        t = self.totals
        t[_LOSS] += loss_sum.detach().to(t.dtype)
        t[_CORRECT] += (preds == labels).sum().to(t.dtype)
        t[_COUNT] += labels.numel()  # a Python number: added on the device, no copy
        if self.num_labels:
            # accumulate=True scatters without reading anything back (bincount would sync to size its output)
            cells = 3 + labels * self.num_labels + preds
            t.index_put_((cells,), torch.ones_like(cells, dtype=t.dtype), accumulate=True)

    def confusion(self) -> torch.Tensor:
        k = self.num_labels
        return self.totals[3:].reshape(k, k).cpu()

    def compute(self) -> dict:
        values = self.totals[:3].tolist()  # the one host sync
        loss_sum, correct, count = values
        if count == 0:
            return {"loss": float("nan"), "accuracy": float("nan"), "count": 0, "macro_f1": float("nan")}
        out = {"loss": loss_sum / count, "accuracy": correct / count, "count": int(count)}
        if self.num_labels:
            out["macro_f1"] = macro_f1(self.confusion())
        return out


def macro_f1(confusion: torch.Tensor) -> float:
    """Mean F1 over the classes that occur or are predicted (rows: true, columns: predicted)."""
    confusion = confusion.double()
    tp = confusion.diag()
    support, predicted = confusion.sum(1), confusion.sum(0)
    present = (support + predicted) > 0
    f1 = 2 * tp / (support + predicted).clamp(min=1)
    return float(f1[present].mean()) if present.any() else float("nan")
