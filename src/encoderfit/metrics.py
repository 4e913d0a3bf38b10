"""Classification metrics from a confusion matrix, one home for training and the tools.

Training keeps its running sums as device tensors (``training/tasks.py``) and reads them once per
log interval and per epoch; these functions turn a confusion matrix (rows: true label, columns:
predicted label) into accuracy, macro-F1 and per-class precision, recall and F1.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _per_class(cm: np.ndarray) -> tuple:
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    present = (support + predicted) > 0  # classes that occur or are predicted (scikit-learn's default)
    return tp, support, predicted, present


def macro_f1(confusion) -> float:
    """Mean F1 over the classes that occur or are predicted (rows: true, columns: predicted)."""
    tp, support, predicted, present = _per_class(np.asarray(confusion))
    f1 = 2 * tp / np.maximum(support + predicted, 1)
    return float(f1[present].mean()) if present.any() else float("nan")


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = number of examples of true class i predicted as class j."""
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.size} true labels but {y_pred.size} predictions")
    for name, y in (("true", y_true), ("predicted", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} class ids must be in [0, {num_classes})")
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes) \
        .reshape(num_classes, num_classes)


def classification_metrics(cm: np.ndarray, label_names: Sequence[str]) -> dict:
    """Accuracy, macro precision/recall/F1 and per-class precision/recall/F1/support from a confusion matrix.

    A class that is never predicted has precision 0, one without examples recall 0
    (as scikit-learn's ``zero_division=0``). Macro averages are taken over the classes
    that occur in the data or the predictions, as scikit-learn does by default.
    """
    cm = np.asarray(cm, dtype=np.int64)
    tp, support, predicted, present = _per_class(cm)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = 2 * tp / np.maximum(support + predicted, 1)  # = 2PR / (P + R), and 0 where both are 0
    total = int(cm.sum())

    def macro(values):
        return float(values[present].mean()) if present.any() else float("nan")

    return {
        "examples": total,
        "accuracy": float(tp.sum() / total) if total else float("nan"),
        "macro_precision": macro(precision),
        "macro_recall": macro(recall),
        "macro_f1": macro_f1(cm),
        "per_class": {str(name): {"precision": float(precision[i]), "recall": float(recall[i]),
                                  "f1": float(f1[i]), "support": int(support[i]), "predicted": int(predicted[i])}
                      for i, name in enumerate(label_names)},
        "labels": [str(n) for n in label_names],
        "confusion_matrix": cm.tolist(),
    }


def shown_metric(value, spec: str = ".4f") -> str:
    """A metric as the logs print it; an undefined one (NaN: a correlation of constant values) as ``n/a``."""
    return "n/a" if isinstance(value, float) and value != value else format(value, spec)


def undefined_correlation(targets, predictions) -> str:
    """Why a correlation of ``targets`` and ``predictions`` (sequences of numbers) is undefined."""
    t, p = np.asarray(targets, dtype=np.float64), np.asarray(predictions, dtype=np.float64)
    if len(t) < 2:
        return "Pearson and Spearman are undefined for fewer than 2 examples"
    if np.ptp(t) == 0:
        return f"Pearson and Spearman are undefined: the targets are all equal ({t[0]:g})"
    if np.ptp(p) == 0:
        return "Pearson and Spearman are undefined: the predictions are all equal"
    return "Pearson and Spearman are undefined"
