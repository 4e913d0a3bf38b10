"""What differs by task, in one place: label encoding, the loss, the metric sums, decoding.

A task is chosen once from the data and the flags (``choose_task``), recorded in the checkpoint
(the model config's ``problem_type`` and ``id2label``; ``record()`` in the training state) and
passed to the engine, the CUDA graphs and the tools, which never ask which task they run.

The step's metric sums are one fixed-size device tensor per step (``new_sums`` / ``add_sums``),
so they add up over batches, all-reduce over ranks in one call, and can be recorded inside a
CUDA graph (no host sync, no data-dependent shapes). ``metrics`` turns reduced sums into numbers;
a metric that sums cannot give (Spearman's rank correlation) comes from the evaluation's
per-example outputs, gathered once per evaluation (``collects_outputs``).

The tasks:
- ``SingleLabelClassification``: one label out of K; optional class weights in the loss;
- ``MultiLabelClassification``: any number of K labels per example: a sigmoid per label, binary
  cross-entropy, micro- and macro-F1 and subset accuracy at a decision threshold;
- ``Regression``: one score per text (or pair), MSE loss, Pearson and Spearman correlations.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from training.metrics import macro_f1

TASK_KINDS = ("auto", "single_label", "multi_label", "regression")
TUNE = "tune"  # --threshold tune
CONFIG_EXTRA_KEYS = ("class_weights", "pos_weight", "multi_label_threshold")  # every task's config_extras keys
TUNE_GRID = tuple(i / 100 for i in range(1, 100))  # the thresholds a tuned multi-label run chooses from


def _logit(p: float) -> float:
    return math.log(p / (1 - p))  # sigmoid(x) >= p <=> x >= logit(p)


def _sums_tensor(size: int, device: torch.device) -> torch.Tensor:
    # float64 so that sums over many batches stay exact (counts below 2**53; MPS has no float64)
    return torch.zeros(size, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)


class Task:
    """What every task shares: the checkpoint's record of it, and the table of metrics."""

    name = ""
    problem_type = ""
    best_metrics: dict = {}     # validation metrics that can pick the best checkpoint, and which way is better
    default_metric = "loss"     # --metric_for_best when it is not given
    summary_metrics: tuple = ()  # the columns of the end-of-run table (each a key of ``metrics``)
    collects_outputs = False    # evaluation gathers (prediction, target) per example for ``metrics``
    normalizer_differs_by_rank = False  # the step's normalizer must be summed over ranks (class weights)

    def __init__(self, label_names):
        self.label_names = [str(n) for n in label_names]

    def to(self, device: torch.device) -> "Task":
        """Move what the loss holds (class weights) to the training device, once, before any step."""
        return self

    def model_config(self) -> dict:
        """What the model config must carry, so ``pipeline()`` and the tools decode the same way."""
        id2label = dict(enumerate(self.label_names))
        return {"num_labels": self.num_labels, "id2label": id2label,
                "label2id": {name: i for i, name in id2label.items()}, "problem_type": self.problem_type}

    def record(self) -> dict:
        return {"task": self.name, "label_names": list(self.label_names)}

    def config_extras(self) -> dict:
        """Attributes the model config keeps beside the standard ones (set after loading, saved with it)."""
        return {}

    def normalizer(self, batch) -> float:
        """What a batch adds to the divisor of a step's loss (a host number, read without a sync):
        the mean over a step's examples is the summed loss over the sum of these."""
        return batch.num_examples

    def new_sums(self, device: torch.device) -> torch.Tensor:
        return _sums_tensor(self.sums_size, device)

    def outputs(self, logits: torch.Tensor, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-example (prediction, target) rows of an evaluation batch, for ``collects_outputs`` tasks."""
        return None

    output_width = 2  # the columns of ``outputs``

    def tune_on(self, outputs: Optional[torch.Tensor]) -> None:
        """Choose what the task decides by from an evaluation's gathered outputs (a tuned threshold)."""

    def restore(self, record: dict) -> None:
        """Take back what ``tune_on`` chose, from a checkpoint's ``record()``."""

    def describe(self, stats: dict) -> str:
        """The metrics as the epoch line shows them."""
        return " ".join(f"{short} {stats[key]:{fmt[0] if fmt else '.4f'}}"
                        for key, short, *fmt in self._shown if key in stats)


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


class MultiLabelClassification(Task):
    """Any subset of K labels: one sigmoid per label and binary cross-entropy (the mean over examples and
    labels, as ``BCEWithLogitsLoss``); a label is predicted where its probability reaches ``threshold``.
    Metrics: micro-F1 (over every label decision), macro-F1 (the mean of per-label F1 over the labels that
    occur or are predicted), subset accuracy (every label of the example right), per-label counts."""

    name = "multi_label"
    problem_type = "multi_label_classification"
    best_metrics = {"micro_f1": 1, "macro_f1": 1, "subset_accuracy": 1, "loss": -1}
    default_metric = "micro_f1"
    summary_metrics = ("micro_f1", "macro_f1", "subset_accuracy", "loss")
    _shown = (("loss", "loss"), ("micro_f1", "micro-f1"), ("macro_f1", "macro-f1"), ("subset_accuracy", "exact"),
              ("threshold", "threshold", ".2f"))
    _LOSS, _COUNT, _EXACT = range(3)  # then tp, fp, fn per label

    def __init__(self, label_names, threshold=0.5, pos_weight: Optional[Sequence[float]] = None):
        super().__init__(label_names)
        self.num_labels = len(self.label_names)
        # "tune": one threshold for every label, chosen at each evaluation as the one that maximizes the
        # validation micro-F1 (the evaluation then gathers every example's logits)
        self.tune = threshold == TUNE
        self.collects_outputs = self.tune
        self.threshold = 0.5 if self.tune else float(threshold)
        # a device tensor, not a Python number: a recorded CUDA graph reads the current threshold
        self._logit_threshold = torch.tensor(_logit(self.threshold))
        self.pos_weight = None if pos_weight is None else [float(w) for w in pos_weight]
        weight = None if pos_weight is None else torch.tensor(self.pos_weight, dtype=torch.float32)
        self._criterion = torch.nn.BCEWithLogitsLoss(reduction="sum", pos_weight=weight)  # a module: tests wrap it

    def to(self, device: torch.device) -> "MultiLabelClassification":
        self._criterion.to(device)
        self._logit_threshold = self._logit_threshold.to(device)
        return self

    def set_threshold(self, threshold: float) -> None:
        """Decide at ``threshold`` from now on (in place: recorded graphs see it)."""
        self.threshold = float(threshold)
        self._logit_threshold.fill_(_logit(self.threshold))

    def config_extras(self) -> dict:
        return {"multi_label_threshold": self.threshold,
                **({"pos_weight": self.pos_weight} if self.pos_weight is not None else {})}

    def record(self) -> dict:
        return {**super().record(), "threshold": self.threshold, "tuned": self.tune, "pos_weight": self.pos_weight}

    def restore(self, record: dict) -> None:
        if self.tune and "threshold" in record:  # the threshold the last evaluation chose
            self.set_threshold(record["threshold"])

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed BCE; with ``pos_weight`` each label's positive term is multiplied by its weight (as
        ``BCEWithLogitsLoss(pos_weight=...)``), so the mean still divides by examples x labels."""
        if self._criterion.pos_weight is not None and self._criterion.pos_weight.device != logits.device:
            self._criterion.to(logits.device)  # the tools evaluate on their own device
        return self._criterion(logits.float(), labels.float())

    def normalizer(self, batch) -> float:
        return batch.num_examples * self.num_labels  # BCEWithLogitsLoss's mean: over every label decision

    @property
    def sums_size(self) -> int:
        return 3 + 3 * self.num_labels

    @torch.no_grad()
    def add_sums(self, sums: torch.Tensor, loss_sum: torch.Tensor, logits: torch.Tensor,
                 labels: torch.Tensor) -> None:
        k = self.num_labels
        pred, true = logits.float() >= self._logit_threshold.to(logits.device), labels >= 0.5
        sums[self._LOSS] += loss_sum.detach().to(sums.dtype)
        sums[self._COUNT] += labels.shape[0]
        sums[self._EXACT] += (pred == true).all(dim=-1).sum().to(sums.dtype)
        sums[3:3 + k] += (pred & true).sum(dim=0).to(sums.dtype)
        sums[3 + k:3 + 2 * k] += (pred & ~true).sum(dim=0).to(sums.dtype)
        sums[3 + 2 * k:] += (~pred & true).sum(dim=0).to(sums.dtype)

    def running(self, sums: torch.Tensor) -> dict:
        loss_sum, count, exact = sums[:3].tolist()
        if count == 0:
            return {"loss": float("nan"), "subset_accuracy": float("nan"), "count": 0}
        return {"loss": loss_sum / (count * self.num_labels), "subset_accuracy": exact / count, "count": int(count)}

    @property
    def output_width(self) -> int:
        return 2 * self.num_labels  # the logits, then the 0/1 targets

    def outputs(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.cat([logits.detach().float(), labels.float()], dim=1)

    def tune_on(self, outputs: torch.Tensor) -> None:
        """With ``--threshold tune``: the threshold of TUNE_GRID that maximizes micro-F1 over ``outputs``
        (ties go to the one nearest 0.5). Every rank gathers the same outputs, so all choose the same."""
        if not self.tune or outputs is None or not len(outputs):
            return
        logits, true = outputs[:, :self.num_labels], outputs[:, self.num_labels:] >= 0.5
        scores = []
        for t in TUNE_GRID:
            pred = logits >= _logit(t)
            tp = float((pred & true).sum())
            den = 2 * tp + float((pred & ~true).sum()) + float((~pred & true).sum())
            scores.append((2 * tp / den if den else 0.0, -abs(t - 0.5), t))
        self.set_threshold(max(scores)[2])

    def metrics(self, sums: torch.Tensor, outputs=None) -> dict:
        """From reduced sums; where the evaluation gathered every example's logits (a tuned threshold),
        the decisions are counted again from them at the current threshold."""
        out = self.running(sums)
        k = self.num_labels
        counts = sums[3:].reshape(3, k).cpu().double()
        if outputs is not None and len(outputs):
            pred, true = outputs[:, :k] >= _logit(self.threshold), outputs[:, k:] >= 0.5
            counts = torch.stack([(pred & true).sum(0), (pred & ~true).sum(0), (~pred & true).sum(0)]).double()
            out["subset_accuracy"] = float((pred == true).all(dim=1).double().mean())
        out.update(multi_label_metrics(counts, self.label_names))
        out.pop("per_label")
        if self.tune:
            out["threshold"] = self.threshold
        return out

    def decode(self, logits: torch.Tensor) -> tuple:
        """(a probability per label, the 0/1 decisions at the threshold)."""
        probs = logits.float().sigmoid()
        return probs, (logits.float() >= self._logit_threshold.to(logits.device)).long()


def multi_label_metrics(counts: torch.Tensor, label_names) -> dict:
    """Micro- and macro-F1 and per-label precision, recall, F1 and support from per-label (tp, fp, fn) rows."""
    tp, fp, fn = (counts[i] for i in range(3))
    f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
    present = (tp + fp + fn) > 0  # labels that occur or are predicted, as macro-F1 of one label per example
    micro_den = float(2 * tp.sum() + fp.sum() + fn.sum())
    return {"micro_f1": float(2 * tp.sum()) / micro_den if micro_den else float("nan"),
            "macro_f1": float(f1[present].mean()) if bool(present.any()) else float("nan"),
            "per_label": {str(name): {"precision": float(tp[i] / (tp[i] + fp[i])) if tp[i] + fp[i] else 0.0,
                                      "recall": float(tp[i] / (tp[i] + fn[i])) if tp[i] + fn[i] else 0.0,
                                      "f1": float(f1[i]), "support": int(tp[i] + fn[i]),
                                      "predicted": int(tp[i] + fp[i])}
                          for i, name in enumerate(label_names)}}


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


def resolve_class_weights(spec: Optional[str], label_names: Sequence[str], counts: Sequence[int],
                          multi_label_examples: Optional[int] = None) -> Optional[list]:
    """--class_weights as one weight per label: 'balanced', a list in label order, or name=weight pairs
    (other labels weigh 1), from the training label counts. Single-label 'balanced' is scikit-learn's
    rule, n / (k * n_c). For a multi-label task (``multi_label_examples``: the training examples) the
    weights are ``pos_weight``, the factor on each label's positive term, and 'balanced' is
    (n - n_c) / n_c, negatives per positive, as torch's ``BCEWithLogitsLoss`` documents."""
    from training.utils import UserError

    if spec is None:
        return None
    names, k = [str(n) for n in label_names], len(label_names)
    if spec.strip() == "balanced":
        absent = [name for name, c in zip(names, counts) if c == 0]
        if absent:
            raise UserError(f"--class_weights balanced: label(s) {', '.join(absent)} have no training examples "
                            f"(a larger --num_samples, or explicit weights)")
        if multi_label_examples is None:
            return [sum(counts) / (k * c) for c in counts]
        n = multi_label_examples
        always = [name for name, c in zip(names, counts) if c >= n]
        if always:
            raise UserError(f"--class_weights balanced: every training example has label(s) {', '.join(always)}, "
                            f"so there are no negatives to balance against (explicit weights, or drop the label)")
        return [(n - c) / c for c in counts]
    parts = [p.strip() for p in spec.split(",")]
    try:
        if all("=" in p for p in parts):
            weights = [1.0] * k
            for part in parts:
                name, value = (x.strip() for x in part.rsplit("=", 1))
                if name not in names:
                    raise UserError(f"--class_weights names the label {name!r}, which the data does not have "
                                    f"(labels: {', '.join(names)})")
                weights[names.index(name)] = float(value)
        else:
            weights = [float(p) for p in parts]
    except ValueError:
        raise UserError(f"--class_weights must be 'balanced', numbers (1,3) or name=number pairs, got {spec!r}") from None
    if len(weights) != k:
        raise UserError(f"--class_weights gives {len(weights)} weight(s) for {k} labels ({', '.join(names)})")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise UserError(f"--class_weights must be positive finite numbers, got {spec!r}")
    return weights


def default_metric(task_name: str) -> str:
    """The --metric_for_best of a task that was not given one."""
    return {t.name: t.default_metric for t in (SingleLabelClassification, MultiLabelClassification, Regression)
            }.get(task_name, "accuracy")


def choose_task(kind: str, label_names, class_weights: Optional[Sequence[float]] = None,
                threshold=0.5) -> Task:
    """The task of a run: ``kind`` as the data path settled it ("single_label", "multi_label", "regression").
    ``class_weights`` are the loss's class weights, or a multi-label task's ``pos_weight``; ``threshold``
    is a number or ``TUNE``."""
    if kind == "regression":
        return Regression(label_names)
    if kind == "multi_label":
        return MultiLabelClassification(label_names, threshold, pos_weight=class_weights)
    return SingleLabelClassification(label_names, class_weights)


def task_from_model_config(config, label_names) -> Task:
    """The task a checkpoint was trained for, from its model config's ``problem_type``."""
    kind: Optional[str] = getattr(config, "problem_type", None)
    if kind == Regression.problem_type or (kind is None and len(label_names) == 1):  # transformers' convention
        if len(label_names) != 1:
            from training.utils import UserError
            raise UserError(f"this checkpoint is a regression with {len(label_names)} outputs; these tools "
                            f"handle one score per text")
        return Regression(label_names)
    if kind == MultiLabelClassification.problem_type:
        return MultiLabelClassification(label_names, getattr(config, "multi_label_threshold", 0.5),
                                        pos_weight=getattr(config, "pos_weight", None))
    if kind not in (None, SingleLabelClassification.problem_type):
        from training.utils import UserError
        raise UserError(f"this checkpoint was trained for {kind}, which these tools do not handle yet")
    return SingleLabelClassification(label_names, getattr(config, "class_weights", None))
