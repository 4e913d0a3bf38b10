"""One score per example: MSE loss; Pearson, Spearman, MSE and MAE."""
from __future__ import annotations

import math
from typing import Optional

import torch

from encoderfit.tasks.base import Task


class Regression(Task):
    """One score per example: a single output, MSE loss; Pearson (from sums), Spearman (from the gathered
    predictions), MSE and MAE. ``label_names`` holds one name: the target column's."""

    name = "regression"
    problem_type = "regression"
    title = "regression"
    weighs_classes = False
    best_metrics = {"pearson": 1, "spearman": 1, "mse": -1, "mae": -1, "loss": -1}
    # MSE, not Pearson: Pearson ignores scale and offset, so it can choose an epoch whose scores are off by a
    # constant; MSE is never undefined (Pearson is, for a constant target). On the public VADER set both chose
    # the same epoch (BENCHMARKS.md)
    default_metric = "mse"
    summary_metrics = ("pearson", "spearman", "mse", "mae")
    collects_outputs = True
    num_labels = 1
    _shown = (("loss", "mse"), ("mae", "mae"), ("pearson", "pearson"), ("spearman", "spearman"))
    # the sums: squared error, count, absolute error, then the moments Pearson needs
    _SQ, _COUNT, _ABS, _Y, _P, _YY, _PP, _YP = range(8)
    sums_size = 8

    def __init__(self, label_names):
        super().__init__(label_names)
        if len(self.label_names) != 1:
            raise ValueError(f"a regression has one output, got names {self.label_names}")
        self._criterion = torch.nn.MSELoss(reduction="sum")  # a module: tests wrap its forward

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._criterion(logits.float().squeeze(-1), labels.float())

    @torch.no_grad()
    def add_sums(self, sums: torch.Tensor, loss_sum: torch.Tensor, logits: torch.Tensor,
                 labels: torch.Tensor) -> None:
        p, y = logits.detach().squeeze(-1).to(sums.dtype), labels.to(sums.dtype)
        sums[self._SQ] += loss_sum.detach().to(sums.dtype)
        sums[self._COUNT] += labels.numel()
        sums[self._ABS] += (p - y).abs().sum()
        sums[self._Y] += y.sum()
        sums[self._P] += p.sum()
        sums[self._YY] += (y * y).sum()
        sums[self._PP] += (p * p).sum()
        sums[self._YP] += (y * p).sum()

    def running(self, sums: torch.Tensor) -> dict:
        sq, count, absolute = sums[:3].tolist()
        if count == 0:
            return {"loss": float("nan"), "mae": float("nan"), "count": 0}
        return {"loss": sq / count, "mae": absolute / count, "count": int(count)}

    def metrics(self, sums: torch.Tensor, outputs: Optional[torch.Tensor] = None) -> dict:
        """MSE (= the loss), MAE, Pearson from the sums; Spearman from ``outputs`` (rows of prediction,
        target: every example once) where given."""
        out = self.running(sums)
        out["mse"] = out["loss"]
        _, n, _, sy, sp, syy, spp, syp = sums.tolist()
        out["pearson"] = pearson_from_sums(n, sy, sp, syy, spp, syp)
        out["spearman"] = spearman(outputs[:, 0], outputs[:, 1]) if outputs is not None and len(outputs) \
            else float("nan")
        return out

    def outputs(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.stack([logits.detach().float().squeeze(-1), labels.float()], dim=1)

    def decode(self, logits: torch.Tensor) -> tuple:
        """(score, score): the raw output is the prediction."""
        scores = logits.float().squeeze(-1)
        return scores, scores

    def predictions(self, logits: torch.Tensor) -> list:
        """Per example: the predicted score (as ``label`` and ``score``), named after the target column."""
        scores, _ = self.decode(logits)
        return [{"label": v, "score": v, "scores": {self.label_names[0]: v}} for v in scores.tolist()]

    def describe_task(self) -> str:
        return f"regression of {self.label_names[0]!r}"

    def evaluation_report(self, logits: torch.Tensor, labels: list, *, where: str, elapsed: float, say) -> tuple:
        """The regression metrics, from the task's own sums (as training's evaluation computes them)."""
        y = torch.tensor(labels, dtype=torch.float32)
        sums = self.new_sums(torch.device("cpu"))
        self.add_sums(sums, self.loss_sum(logits, y), logits, y)
        m = self.metrics(sums, self.outputs(logits, y))
        metrics = {"examples": len(labels), "loss": m["loss"], "mse": m["mse"], "mae": m["mae"],
                   "pearson": m["pearson"], "spearman": m["spearman"],
                   "mean_target": float(y.double().mean()), "mean_prediction": float(logits.double().mean())}
        from encoderfit.metrics import shown_metric, undefined_correlation

        say(f"pearson {shown_metric(m['pearson'])} | spearman {shown_metric(m['spearman'])} | mse {m['mse']:.4f} | "
            f"mae {m['mae']:.4f} | {len(labels)} examples in {elapsed:.1f}s ({len(labels) / max(elapsed, 1e-9):.1f}/s)")
        if math.isnan(m["pearson"]):
            say(f"note: {undefined_correlation(y, logits.squeeze(-1))}")
        say(f"mean target {metrics['mean_target']:.4f} | mean prediction {metrics['mean_prediction']:.4f}")
        return metrics, (y.tolist(), logits.squeeze(-1).tolist())  # what evaluate --plot draws: true, predicted

    def predict_truth(self, got, where: str) -> tuple:
        """(each text's target, or None where it has none; notes)."""
        from encoderfit.serve.report import true_scores

        return true_scores(got, where)

    def predict_outputs(self, got, logits: torch.Tensor, truth) -> tuple:
        """(a table of scores, JSON records, the MSE/MAE/Pearson line or None, the mean score)."""
        from encoderfit.serve.report import format_scores, regression_line, shown

        scores, _ = self.decode(logits)
        records = [{"text": t, **({"text_pair": got.pairs[i]} if got.pairs is not None else {}), "score": v,
                    **({"true_score": truth[i]} if truth is not None else {})}
                   for i, (t, v) in enumerate(zip(got.texts, scores.tolist()))]
        scored = regression_line(truth, scores, got.label_column) if truth is not None else None
        return (lambda width: format_scores(shown(got), scores, width), records, scored,
                f"mean score {float(scores.mean()):.4f}")

    # ------------------------------------------------------------ the data's part
    @classmethod
    def build(cls, label_names, class_weights=None, threshold=None) -> "Regression":
        return cls(label_names)

    @classmethod
    def label_names_of(cls, train, raw, where: str) -> list:
        return [raw.column]  # one output, named after the target column

    @classmethod
    def encode(cls, ds, names: list, raw, where: str):
        from encoderfit.data.labels import _regression_targets

        return _regression_targets(ds, where)

    @classmethod
    def file_labels(cls, ds, raw, where: str):
        """Float targets (a row that is not a finite number: an error naming it)."""
        return cls.encode(ds, [raw.column], raw, where).rename_column("labels", "label_raw")

    @classmethod
    def from_encoded(cls, values: list, names: list) -> list:
        return list(values)

    @classmethod
    def label_stats(cls, train, validation, names: list, raw) -> dict:
        from encoderfit.data.labels import _target_stats

        return {"train_targets": _target_stats(train), "validation_targets": _target_stats(validation)}

    @classmethod
    def describe_labels(cls, names: list) -> str:
        return f"task regression of {names[0]!r}"

    @classmethod
    def check_training_labels(cls, train, where: str, num_samples) -> None:
        from encoderfit.data.columns import column
        from encoderfit.utils import UserError

        if len(set(column(train, "labels"))) < 2:
            raise UserError(f"only one target value in the training examples of {where}"
                            + (" (try a larger --num_samples)" if num_samples else ""))


def pearson_from_sums(n, sy, sp, syy, spp, syp) -> float:
    if n < 2:
        return float("nan")
    cov, vy, vp = syp - sy * sp / n, syy - sy * sy / n, spp - sp * sp / n
    if vy <= 0 or vp <= 0:  # a constant target or a constant prediction: no correlation defined
        return float("nan")
    return max(-1.0, min(1.0, cov / math.sqrt(vy * vp)))


def spearman(predictions, targets) -> float:
    """Spearman's rank correlation: Pearson's of the ranks, ties given their average rank (pandas ranks)."""
    import numpy as np
    import pandas as pd  # a dependency of datasets

    ranks = [pd.Series(torch.as_tensor(v).double().cpu().numpy()).rank(method="average").to_numpy()
             for v in (predictions, targets)]
    if len(ranks[0]) < 2 or ranks[0].std() == 0 or ranks[1].std() == 0:
        return float("nan")
    return float(np.corrcoef(ranks[0], ranks[1])[0, 1])
