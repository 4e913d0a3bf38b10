"""The task contract: what the engine, the tools and the checkpoint ask of every task shape.

The step's metric sums are one fixed-size device tensor per step (``new_sums`` / ``add_sums``), so they add up
over batches, all-reduce over ranks in one call, and can be recorded inside a CUDA graph (no host sync, no
data-dependent shapes). ``metrics`` turns reduced sums into numbers; a metric that sums cannot give (Spearman's
rank correlation) comes from the evaluation's per-example outputs, gathered once per evaluation
(``collects_outputs``).

A task shape is one module: a subclass of ``Task`` that fills in every abstract method below (the engine's, the
tools' and the data's), plus one line in ``registry.py``. The class-level hooks (``label_names_of``,
``encode``, ``hold_out``, ...) serve the data path, which settles the task before a task object exists.
"""
from __future__ import annotations

import abc
import math
from typing import Optional

import torch

TASK_KINDS = ("auto", "single_label", "multi_label", "regression")


TUNE = "tune"  # --threshold tune
PER_LABEL = "per_label"  # --threshold per_label


CONFIG_EXTRA_KEYS = ("class_weights", "pos_weight", "multi_label_threshold")  # every task's config_extras keys


def _logit(p: float) -> float:
    return math.log(p / (1 - p))  # sigmoid(x) >= p <=> x >= logit(p)


def _sums_tensor(size: int, device: torch.device) -> torch.Tensor:
    # float64 so that sums over many batches stay exact (counts below 2**53; MPS has no float64)
    return torch.zeros(size, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)


class Task(abc.ABC):
    """The contract of a task shape, and what every task shares: the checkpoint's record of it, the table of
    metrics, a random hold-out split."""

    name = ""
    problem_type = ""
    title = ""                  # how messages name the shape: "single-label", "multi-label", "regression"
    weighs_classes = True       # --class_weights applies
    decides_by_threshold = False  # --threshold applies (a sigmoid per label)
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
        from encoderfit.metrics import shown_metric

        return " ".join(f"{short} {shown_metric(stats[key], fmt[0] if fmt else '.4f')}"
                        for key, short, *fmt in self._shown if key in stats)

    def setup_lines(self) -> list:
        """What the run says about the task before training (class weights, a tuned threshold)."""
        return []

    # ------------------------------------------------------------ the engine's part (see the module docstring)
    @property
    @abc.abstractmethod
    def sums_size(self) -> int:
        """The length of the step's metric-sums tensor."""

    @abc.abstractmethod
    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The batch's summed (not averaged) loss, in float32; the step divides by the normalizers' sum."""

    @abc.abstractmethod
    def add_sums(self, sums: torch.Tensor, loss_sum: torch.Tensor, logits: torch.Tensor,
                 labels: torch.Tensor) -> None:
        """Add one batch to ``sums`` in place, on the device, without reading anything back."""

    @abc.abstractmethod
    def running(self, sums: torch.Tensor) -> dict:
        """Loss, the cheap metrics and the example count of reduced sums (one host sync)."""

    @abc.abstractmethod
    def metrics(self, sums: torch.Tensor, outputs: Optional[torch.Tensor] = None) -> dict:
        """Every metric of reduced sums (and of gathered ``outputs`` where the task collects them)."""

    # ------------------------------------------------------------ the tools' part
    @abc.abstractmethod
    def decode(self, logits: torch.Tensor) -> tuple:
        """(scores, decisions) of float32 logits."""

    @abc.abstractmethod
    def predictions(self, logits: torch.Tensor) -> list:
        """Per example: {"label", "score", "scores"}, what ``Classifier.predict`` returns."""

    @abc.abstractmethod
    def evaluation_report(self, logits: torch.Tensor, labels: list, *, where: str, elapsed: float, say) -> tuple:
        """(metrics, confusion matrix or None) of ``logits`` against a labelled file's ``labels`` (as
        ``file_labels`` gives them), the lines evaluate prints given to ``say``."""

    @abc.abstractmethod
    def predict_truth(self, got, where: str) -> tuple:
        """(what a labelled table given to predict is scored against, or None; notes)."""

    @abc.abstractmethod
    def predict_outputs(self, got, logits: torch.Tensor, truth) -> tuple:
        """(a table for a terminal of a given width, JSON records, the scoring line or None, the counts line)."""

    def check_labels(self, labels: list, where: str) -> None:
        """Refuse a labelled file's labels (as ``file_labels`` gives them) that this checkpoint cannot score,
        before any inference runs."""

    def describe_task(self) -> str:
        """The task as the tools' header line shows it."""
        return self.describe_labels(self.label_names)

    # ------------------------------------------------------------ the data's part (class-level: before a task exists)
    @classmethod
    @abc.abstractmethod
    def build(cls, label_names, class_weights=None, threshold=0.5) -> "Task":
        """The task of a run: its labels, the loss's weights (``resolve_weights``), a decision threshold."""

    @classmethod
    @abc.abstractmethod
    def from_encoded(cls, values: list, names: list) -> list:
        """Encoded labels (what ``encode`` made) back to what ``file_labels`` gives."""

    @classmethod
    @abc.abstractmethod
    def label_names_of(cls, train, raw, where: str) -> list:
        """The label names of the training split (its ``label_raw`` column, given as ``raw`` says)."""

    @classmethod
    @abc.abstractmethod
    def encode(cls, ds, names: list, raw, where: str):
        """``label_raw`` -> ``labels``, what the loss takes (class ids, multi-hot rows, float targets)."""

    @classmethod
    @abc.abstractmethod
    def file_labels(cls, ds, raw, where: str):
        """A labelled file as evaluation reads it: ``label_raw`` as the task compares it with a checkpoint's
        labels (label names, lists of names, float targets)."""

    @classmethod
    @abc.abstractmethod
    def label_stats(cls, train, validation, names: list, raw) -> dict:
        """What data.json records about the labels of both splits (counts, or the targets' statistics)."""

    @classmethod
    @abc.abstractmethod
    def describe_labels(cls, names: list) -> str:
        """The labels as the data line shows them."""

    @classmethod
    def hold_out(cls, train, names: list, fraction: float, seed: int, where: str) -> tuple:
        """(train, validation, how it was split) when the data has no validation split: a seeded random one."""
        from encoderfit.utils import UserError

        n = len(train)
        held, kept = math.ceil(fraction * n), math.floor((1 - fraction) * n)
        if held < 1 or kept < 1:
            raise UserError(f"--validation_fraction {fraction} of {n} examples leaves nothing to "
                            f"{'validate' if held < 1 else 'train'} on: give more data or a --validation_file")
        parts = train.train_test_split(test_size=fraction, seed=seed)
        return parts["train"], parts["test"], "random"

    @classmethod
    def check_training_labels(cls, train, where: str, num_samples: Optional[int]) -> None:
        """Refuse training labels the task cannot learn from (a single class, a constant target)."""

    @classmethod
    def resolve_weights(cls, spec: Optional[str], names: list, info: dict) -> Optional[list]:
        """--class_weights as the task's loss takes them, from the training split's ``info``."""
        from encoderfit.utils import UserError

        if spec is not None:
            raise UserError(f"--class_weights weigh classes: this data is a {cls.title} task")
        return None
