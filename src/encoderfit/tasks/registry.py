"""The task shapes by name: the one place that maps a name (a flag, a checkpoint's problem_type) to a task."""
from __future__ import annotations

from typing import Optional, Sequence

from encoderfit.tasks.base import Task
from encoderfit.tasks.multi_label import MultiLabelClassification
from encoderfit.tasks.regression import Regression
from encoderfit.tasks.single_label import SingleLabelClassification

TASKS = {cls.name: cls for cls in (SingleLabelClassification, MultiLabelClassification, Regression)}


def default_metric(task_name: str) -> str:
    """The --metric_for_best of a task that was not given one."""
    return TASKS.get(task_name, SingleLabelClassification).default_metric


def choose_task(kind: str, label_names, class_weights: Optional[Sequence[float]] = None,
                threshold=0.5) -> Task:
    """The task of a run: ``kind`` as the data path settled it (a name of ``TASKS``). ``class_weights`` are the
    loss's class weights, or a multi-label task's ``pos_weight``; ``threshold`` is a number or ``TUNE``."""
    return TASKS[kind].build(label_names, class_weights, threshold)


def task_class(name: str) -> type:
    """The task shape of a name (--task, data.json's and the checkpoint's record)."""
    return TASKS[name]


def task_class_for_problem_type(problem_type: Optional[str], outputs: int = 0) -> type:
    """The task shape of a model config's ``problem_type`` (None: transformers' convention, a regression for
    one output, else single-label)."""
    if problem_type is None:
        return Regression if outputs == 1 else SingleLabelClassification
    return next((cls for cls in TASKS.values() if cls.problem_type == problem_type), SingleLabelClassification)


def detect_task(requested: str, train, raw, where: str) -> type:
    """The task shape the training labels call for: ``requested`` (--task) checked against them, or for "auto"
    multi-label where rows hold several labels, regression where the labels are numbers with fractions, and
    single-label classification otherwise."""
    from encoderfit.data.labels import (
        _label_kind,
        _unique_labels,
        first_word,
        refuse_fractions,
    )
    from encoderfit.utils import UserError

    if raw.lists(train, where) is not None:
        if requested not in ("auto", MultiLabelClassification.name):
            raise UserError(f"{where} has several labels per row (a list, --label_separator or --label_columns): "
                            f"a multi-label task, not --task {requested}")
        return MultiLabelClassification
    if requested == MultiLabelClassification.name:
        raise UserError("--task multi_label needs several labels per row: a label column of lists (JSON Lines, "
                        "Parquet), --label_separator or --label_columns")
    if raw.class_label and requested == "auto":
        return SingleLabelClassification
    values = _unique_labels(train, where)
    kind = _label_kind(values, where)
    if requested == "auto" and kind == "str":
        _refuse_scores_mixed_with_text(train, values, where)
    if requested == "auto":
        return Regression if kind == "float" else SingleLabelClassification
    if requested == SingleLabelClassification.name and kind == "float":
        refuse_fractions(values, where)
    word = first_word(values)
    if requested == Regression.name and kind == "str" and word is not None:
        raise UserError(f"--task regression needs numbers as labels, {where} has {word!r}: check --label_column")
    return TASKS[requested]


def _refuse_scores_mixed_with_text(train, values, where: str) -> None:
    """Numbers with fractions (scores) beside a few texts such as ``nan`` or ``n/a``: neither classes nor a clean
    regression, so an error naming the first row that is not a finite number (not a 20-class classifier)."""
    from encoderfit.data.columns import column
    from encoderfit.data.reader import _NUMBER
    from encoderfit.utils import UserError

    numbers = [v for v in values if _NUMBER.fullmatch(v)]
    if not any(not float(v).is_integer() for v in numbers) or len(numbers) < len(values) / 2:
        return
    for row, v in enumerate(column(train, "label_raw"), start=1):
        if not _NUMBER.fullmatch(v):
            raise UserError(f"row {row} of {where} has the label {v!r}, not a finite number, among numeric scores: "
                            f"fix or drop that row (or pass --task single_label to train on the values as class "
                            f"names)")


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
