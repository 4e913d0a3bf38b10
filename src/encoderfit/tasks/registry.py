"""The task shapes by name: the one place that maps a name (a flag, a checkpoint's problem_type) to a task."""
from __future__ import annotations
import math
from typing import Optional, Sequence
from encoderfit.tasks.base import Task
from encoderfit.tasks.multi_label import MultiLabelClassification
from encoderfit.tasks.regression import Regression
from encoderfit.tasks.single_label import SingleLabelClassification


def resolve_class_weights(spec: Optional[str], label_names: Sequence[str], counts: Sequence[int],
                          multi_label_examples: Optional[int] = None) -> Optional[list]:
    """--class_weights as one weight per label: 'balanced', a list in label order, or name=weight pairs
    (other labels weigh 1), from the training label counts. Single-label 'balanced' is scikit-learn's
    rule, n / (k * n_c). For a multi-label task (``multi_label_examples``: the training examples) the
    weights are ``pos_weight``, the factor on each label's positive term, and 'balanced' is
    (n - n_c) / n_c, negatives per positive, as torch's ``BCEWithLogitsLoss`` documents."""
    from encoderfit.utils import UserError

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
            from encoderfit.utils import UserError
            raise UserError(f"this checkpoint is a regression with {len(label_names)} outputs; these tools "
                            f"handle one score per text")
        return Regression(label_names)
    if kind == MultiLabelClassification.problem_type:
        return MultiLabelClassification(label_names, getattr(config, "multi_label_threshold", 0.5),
                                        pos_weight=getattr(config, "pos_weight", None))
    if kind not in (None, SingleLabelClassification.problem_type):
        from encoderfit.utils import UserError
        raise UserError(f"this checkpoint was trained for {kind}, which these tools do not handle yet")
    return SingleLabelClassification(label_names, getattr(config, "class_weights", None))
