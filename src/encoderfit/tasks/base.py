"""The task contract: what the engine, the tools and the checkpoint ask of every task shape.

The step's metric sums are one fixed-size device tensor per step (``new_sums`` / ``add_sums``), so they add up
over batches, all-reduce over ranks in one call, and can be recorded inside a CUDA graph (no host sync, no
data-dependent shapes). ``metrics`` turns reduced sums into numbers; a metric that sums cannot give (Spearman's
rank correlation) comes from the evaluation's per-example outputs, gathered once per evaluation
(``collects_outputs``).
"""
from __future__ import annotations
import math
from typing import Optional
import torch


TASK_KINDS = ("auto", "single_label", "multi_label", "regression")


TUNE = "tune"  # --threshold tune


CONFIG_EXTRA_KEYS = ("class_weights", "pos_weight", "multi_label_threshold")  # every task's config_extras keys


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
