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
    best_metrics = {"pearson": 1, "spearman": 1, "mse": -1, "mae": -1, "loss": -1}
    default_metric = "pearson"
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
        out["pearson"] = _pearson_from_sums(n, sy, sp, syy, spp, syp)
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


def _pearson_from_sums(n, sy, sp, syy, spp, syp) -> float:
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
