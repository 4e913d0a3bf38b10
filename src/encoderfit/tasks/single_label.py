"""One label out of K: cross-entropy (optionally class-weighted), accuracy and macro-F1."""
from __future__ import annotations
from typing import Optional, Sequence
import torch
from encoderfit.metrics import macro_f1
from encoderfit.tasks.base import Task


class SingleLabelClassification(Task):
    """One label out of K: cross-entropy (optionally class-weighted), accuracy and macro-F1 from a
    confusion matrix, softmax scores."""

    name = "single_label"
    problem_type = "single_label_classification"
    best_metrics = {"accuracy": 1, "macro_f1": 1, "loss": -1}
    default_metric = "accuracy"
    summary_metrics = ("accuracy", "macro_f1", "loss")
    _shown = (("loss", "loss"), ("accuracy", "acc"), ("macro_f1", "f1"))
    _LOSS, _CORRECT, _COUNT = range(3)

    def __init__(self, label_names, class_weights: Optional[Sequence[float]] = None):
        super().__init__(label_names)
        self.num_labels = len(self.label_names)
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        self.normalizer_differs_by_rank = class_weights is not None
        weight = None if class_weights is None else torch.tensor(self.class_weights, dtype=torch.float32)
        self._host_weight = weight
        # the module (not the functional form), so a test can wrap its forward to inject a NaN
        self._criterion = torch.nn.CrossEntropyLoss(weight=weight, reduction="sum")

    def to(self, device: torch.device) -> "SingleLabelClassification":
        self._criterion.to(device)
        return self

    def record(self) -> dict:
        return {**super().record(), "class_weights": self.class_weights}

    def config_extras(self) -> dict:
        # kept with the model, so evaluate.py reports the loss training reported
        return {"class_weights": self.class_weights} if self.class_weights is not None else {}

    # ------------------------------------------------------------ the loss
    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The batch's summed (not averaged) loss, in float32; with class weights each example's
        loss is multiplied by its label's weight (as ``CrossEntropyLoss(weight=...)`` does)."""
        if self._criterion.weight is not None and self._criterion.weight.device != logits.device:
            self._criterion.to(logits.device)  # the tools evaluate on their own device
        return self._criterion(logits.float(), labels)

    def normalizer(self, batch) -> float:
        """Examples, or with class weights the sum of the batch's label weights: the step's loss is then
        the weighted mean that ``CrossEntropyLoss(weight=..., reduction="mean")`` computes over one batch."""
        if self._host_weight is None:
            return batch.num_examples
        return float(self._host_weight[batch.labels.cpu()].sum())  # the batch's labels are still on the host

    # ------------------------------------------------------------ metric sums (device tensors)
    @property
    def sums_size(self) -> int:
        # loss, correct, count, confusion (true x predicted), and with class weights the weight sum last
        return 3 + self.num_labels * self.num_labels + (self.class_weights is not None)

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
        if self.class_weights is not None:
            sums[-1] += self._criterion.weight[labels].sum().to(sums.dtype)

    def running(self, sums: torch.Tensor) -> dict:
        """Loss, accuracy and example count of reduced sums: one host sync."""
        loss_sum, correct, count = sums[:3].tolist()
        if count == 0:
            return {"loss": float("nan"), "accuracy": float("nan"), "count": 0}
        norm = float(sums[-1]) if self.class_weights is not None else count
        return {"loss": loss_sum / norm, "accuracy": correct / count, "count": int(count)}

    def metrics(self, sums: torch.Tensor, outputs=None) -> dict:
        """Every metric of reduced sums (an epoch's training or validation)."""
        out = self.running(sums)
        k = self.num_labels
        out["macro_f1"] = macro_f1(sums[3:3 + k * k].reshape(k, k).cpu()) if out["count"] else float("nan")
        return out

    # ------------------------------------------------------------ predictions
    def decode(self, logits: torch.Tensor) -> tuple:
        """(scores per label, predicted label id) of float32 logits: softmax and its argmax."""
        probs = logits.float().softmax(dim=-1)
        return probs, probs.argmax(dim=-1)

    def predictions(self, logits: torch.Tensor) -> list:
        """Per example: the predicted label, its probability, and every label's probability."""
        probs, best = self.decode(logits)
        return [{"label": self.label_names[k], "score": row[k], "scores": dict(zip(self.label_names, row))}
                for row, k in zip(probs.tolist(), best.tolist())]
