"""One label out of K: cross-entropy (optionally class-weighted), accuracy and macro-F1."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from encoderfit.metrics import macro_f1
from encoderfit.tasks.base import Task


class SingleLabelClassification(Task):
    """One label out of K: cross-entropy (optionally class-weighted), accuracy and macro-F1 from a
    confusion matrix, softmax scores."""

    name = "single_label"
    problem_type = "single_label_classification"
    title = "single-label"
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

    def setup_lines(self) -> list:
        if self.class_weights is None:
            return []
        return ["class weights: " + ", ".join(f"{n} {w:.4g}" for n, w in zip(self.label_names, self.class_weights))]

    def check_labels(self, labels: list, where: str) -> None:
        from encoderfit.serve.report import known_ids

        known_ids(labels, self.label_names, where)

    def evaluation_report(self, logits: torch.Tensor, labels: list, *, where: str, elapsed: float, say) -> tuple:
        """Accuracy, macro-F1, the loss (class-weighted as in training), the per-class table and the confusion
        matrix."""
        from encoderfit.metrics import classification_metrics, confusion_matrix
        from encoderfit.serve.report import format_confusion, format_report, known_ids

        y_true = known_ids(labels, self.label_names, where)
        _, y_pred = self.decode(logits)
        target = torch.from_numpy(y_true)
        sums = self.new_sums(torch.device("cpu"))  # the task's own sums: a weighted mean with class weights
        self.add_sums(sums, self.loss_sum(logits, target), logits, target)
        loss = self.running(sums)["loss"]
        cm = confusion_matrix(y_true, y_pred.numpy(), self.num_labels)
        metrics = {"loss": loss, **classification_metrics(cm, self.label_names)}
        say(f"accuracy {metrics['accuracy']:.4f} | macro-F1 {metrics['macro_f1']:.4f} | loss {loss:.4f} | "
            f"{metrics['examples']} examples in {elapsed:.1f}s ({metrics['examples'] / max(elapsed, 1e-9):.1f}/s)")
        say("")
        say(format_report(metrics))
        say("")
        say("confusion matrix (rows: true label, columns: predicted label)")
        say(format_confusion(metrics))
        return metrics, cm

    def predict_truth(self, got, where: str) -> tuple:
        """(each text's true class id, or None where it has none; notes): what predict scores against."""
        from encoderfit.serve.report import true_ids

        return true_ids(got, self.label_names, where)

    def predict_outputs(self, got, logits: torch.Tensor, truth) -> tuple:
        """(a table for a terminal of a given width, JSON records, the accuracy line or None, the counts line)."""
        from encoderfit.serve.report import (
            accuracy_line,
            format_table,
            prediction_records,
            shown,
        )

        scores, predicted = self.decode(logits)
        records = prediction_records(got.texts, self.label_names, scores, predicted, truth, got.pairs)
        scored = accuracy_line(truth, predicted, got.label_column) if truth is not None else None
        counts = predicted.bincount(minlength=len(self.label_names)).tolist()
        return (lambda width: format_table(shown(got), self.label_names, scores, predicted, width), records, scored,
                ", ".join(f"{name} {c}" for name, c in zip(self.label_names, counts)))

    # ------------------------------------------------------------ the data's part
    @classmethod
    def build(cls, label_names, class_weights=None, threshold=None) -> "SingleLabelClassification":
        return cls(label_names, class_weights)

    @classmethod
    def label_names_of(cls, train, raw, where: str) -> list:
        from encoderfit.data.labels import _label_names

        return _label_names(train, raw.feature)

    @classmethod
    def encode(cls, ds, names: list, raw, where: str):
        from encoderfit.data.labels import _encode_labels

        return _encode_labels(ds, names, raw.feature, where)

    @classmethod
    def file_labels(cls, ds, raw, where: str):
        """The label names (integer labels as their decimal strings), for matching to a checkpoint's."""
        from encoderfit.data.columns import column
        from encoderfit.data.labels import _label_kind, _unique_labels, refuse_fractions

        values = _unique_labels(ds, where)
        kind = _label_kind(values, where)
        if kind == "float":
            refuse_fractions(values, where, "a classifier")  # a classifier's labels are classes
        names = [str(int(v)) if kind == "int" else v for v in column(ds, "label_raw")]
        return ds.remove_columns("label_raw").add_column("label_raw", names)

    @classmethod
    def from_encoded(cls, values: list, names: list) -> list:
        """Encoded labels (class ids) back to what ``file_labels`` gives (names)."""
        return [str(names[i]) for i in values]

    @classmethod
    def label_stats(cls, train, validation, names: list, raw) -> dict:
        from encoderfit.data.labels import _counts

        return {"train_label_counts": _counts(train, len(names)),
                "validation_label_counts": _counts(validation, len(names))}

    @classmethod
    def describe_labels(cls, names: list) -> str:
        return f"labels {', '.join(map(str, names))}"

    @classmethod
    def hold_out(cls, train, names: list, fraction: float, seed: int, where: str) -> tuple:
        """A seeded split stratified by label: every label on both sides."""
        import datasets

        from encoderfit.data.columns import column
        from encoderfit.data.splits import _stratified_split
        from encoderfit.utils import UserError

        if len(names) < 2:
            raise UserError(f"only one label class in {where} ({names[0]!r}): a classifier needs at least two")
        train = train.cast_column("labels", datasets.ClassLabel(names=names))
        counts = torch.bincount(torch.tensor(column(train, "labels")), minlength=len(names))
        if int(counts.min()) < 2:
            raise UserError(f"label {names[int(counts.argmin())]!r} has fewer than 2 examples in {where}: "
                            f"too few to hold some out for validation")
        n, k = len(train), len(names)
        held, kept = math.ceil(fraction * n), math.floor((1 - fraction) * n)  # as datasets splits
        if held < k or kept < k:  # a stratified split needs every label on both sides
            raise UserError(f"--validation_fraction {fraction} of {n} examples holds out {held} and "
                            f"trains on {kept}: each side needs at least {k} (one per label); use a fraction from "
                            f"{k / n:.3g} to {1 - k / n:.3g}, or give a --validation_file")
        train, validation = _stratified_split(train, fraction, seed)
        return train, validation, "stratified"

    @classmethod
    def check_training_labels(cls, train, where: str, num_samples) -> None:
        from encoderfit.data.columns import column
        from encoderfit.utils import UserError

        if len(set(column(train, "labels"))) < 2:
            raise UserError(f"only one label class in the training examples of {where}"
                            + (" (try a larger --num_samples)" if num_samples else ""))

    @classmethod
    def resolve_weights(cls, spec, names: list, info: dict):
        from encoderfit.tasks.weights import resolve_class_weights

        return resolve_class_weights(spec, names, info.get("train_label_counts", []))
