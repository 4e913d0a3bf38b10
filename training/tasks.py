"""What differs by task, in one place: label encoding, the loss, the metric sums, decoding.

A task is chosen once from the data and the flags (``choose_task``), recorded in the checkpoint
(the model config's ``problem_type`` and ``id2label``; ``record()`` in the training state) and
passed to the engine, the CUDA graphs and the tools, which never ask which task they run.

The step's metric sums are one fixed-size device tensor per step (``new_sums`` / ``add_sums``),
so they add up over batches, all-reduce over ranks in one call, and can be recorded inside a
CUDA graph (no host sync, no data-dependent shapes). ``metrics`` turns reduced sums into numbers.

Today's one task is single-label classification; a new task is a new class here with the same
methods, and nothing else in the engine changes.
"""
from __future__ import annotations

from typing import Optional

import torch

from training.metrics import macro_f1


class SingleLabelClassification:
    """One label out of K: cross-entropy, accuracy and macro-F1 from a confusion matrix, softmax scores."""

    name = "single_label"
    problem_type = "single_label_classification"
    # the validation metrics that can pick the best checkpoint, and which way is better
    best_metrics = {"accuracy": 1, "macro_f1": 1, "loss": -1}
    _LOSS, _CORRECT, _COUNT = range(3)

    def __init__(self, label_names):
        self.label_names = [str(n) for n in label_names]
        self.num_labels = len(self.label_names)
        # the module (not the functional form), so a test can wrap its forward to inject a NaN
        self._criterion = torch.nn.CrossEntropyLoss(reduction="sum")

    # ------------------------------------------------------------ what the checkpoint records
    def model_config(self) -> dict:
        """What the model config must carry, so ``pipeline()`` and the tools decode the same way."""
        id2label = dict(enumerate(self.label_names))
        return {"num_labels": self.num_labels, "id2label": id2label,
                "label2id": {name: i for i, name in id2label.items()}, "problem_type": self.problem_type}

    def record(self) -> dict:
        return {"task": self.name, "label_names": list(self.label_names)}

    # ------------------------------------------------------------ the loss
    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The batch's summed (not averaged) loss, in float32."""
        return self._criterion(logits.float(), labels)

    def normalizer(self, batch) -> float:
        """What a batch adds to the divisor of a step's loss (a host number, read without a sync):
        the mean over a step's examples is the summed loss over the sum of these."""
        return batch.num_examples

    # ------------------------------------------------------------ metric sums (device tensors)
    @property
    def sums_size(self) -> int:
        return 3 + self.num_labels * self.num_labels  # loss, correct, count, confusion (true x predicted)

    def new_sums(self, device: torch.device) -> torch.Tensor:
        # float64 so that sums over many batches stay exact (counts below 2**53; MPS has no float64)
        return torch.zeros(self.sums_size, dtype=torch.float32 if device.type == "mps" else torch.float64,
                           device=device)

    @torch.no_grad()
    def add_sums(self, sums: torch.Tensor, loss_sum: torch.Tensor, logits: torch.Tensor,
                 labels: torch.Tensor) -> None:
        """Add one batch to ``sums`` in place, on the device, without reading anything back."""
        preds = logits.argmax(dim=-1)
        sums[self._LOSS] += loss_sum.detach().to(sums.dtype)
        sums[self._CORRECT] += (preds == labels).sum().to(sums.dtype)
        sums[self._COUNT] += labels.numel()  # a Python number: added on the device, no copy
        # accumulate=True scatters without reading anything back (bincount would sync to size its output)
        cells = 3 + labels * self.num_labels + preds
        sums.index_put_((cells,), torch.ones_like(cells, dtype=sums.dtype), accumulate=True)

    def running(self, sums: torch.Tensor) -> dict:
        """Loss, accuracy and example count of reduced sums: one host sync."""
        loss_sum, correct, count = sums[:3].tolist()
        if count == 0:
            return {"loss": float("nan"), "accuracy": float("nan"), "count": 0}
        return {"loss": loss_sum / count, "accuracy": correct / count, "count": int(count)}

    def metrics(self, sums: torch.Tensor) -> dict:
        """Every metric of reduced sums (an epoch's training or validation)."""
        out = self.running(sums)
        k = self.num_labels
        out["macro_f1"] = macro_f1(sums[3:].reshape(k, k).cpu()) if out["count"] else float("nan")
        return out

    @staticmethod
    def describe(stats: dict) -> str:
        """The metrics as the epoch line shows them."""
        text = f"loss {stats['loss']:.4f} acc {stats['accuracy']:.4f}"
        return text + (f" f1 {stats['macro_f1']:.4f}" if "macro_f1" in stats else "")

    # ------------------------------------------------------------ predictions
    def decode(self, logits: torch.Tensor) -> tuple:
        """(scores per label, predicted label id) of float32 logits: softmax and its argmax."""
        probs = logits.float().softmax(dim=-1)
        return probs, probs.argmax(dim=-1)


def choose_task(label_names) -> SingleLabelClassification:
    """The task of a run, from its data (single-label classification is the only one so far)."""
    return SingleLabelClassification(label_names)


def task_from_model_config(config, label_names) -> SingleLabelClassification:
    """The task a checkpoint was trained for, from its model config's ``problem_type``."""
    kind: Optional[str] = getattr(config, "problem_type", None)
    if kind not in (None, SingleLabelClassification.problem_type):
        from training.utils import UserError
        raise UserError(f"this checkpoint was trained for {kind}, which these tools do not handle yet")
    return SingleLabelClassification(label_names)
