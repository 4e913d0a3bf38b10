"""What differs by task, in one place: one module per task shape on the contract of ``base.Task``, and the
registry (``registry.py``) that maps a name to its class.

A task is chosen once from the data and the flags, recorded in the checkpoint (the model config's
``problem_type`` and ``id2label``; ``Task.record()`` in the training state) and passed to the engine, the CUDA
graphs and the tools, which never ask which task they run.
"""
from encoderfit.tasks.base import CONFIG_EXTRA_KEYS, TASK_KINDS, TUNE, Task
from encoderfit.tasks.multi_label import (
                                      TUNE_GRID,
                                      MultiLabelClassification,
                                      multi_label_metrics,
)
from encoderfit.tasks.registry import (
                                      TASKS,
                                      choose_task,
                                      default_metric,
                                      detect_task,
                                      task_class,
                                      task_class_for_problem_type,
                                      task_from_model_config,
)
from encoderfit.tasks.regression import Regression, spearman
from encoderfit.tasks.single_label import SingleLabelClassification
from encoderfit.tasks.weights import resolve_class_weights

__all__ = ["CONFIG_EXTRA_KEYS", "MultiLabelClassification", "Regression", "SingleLabelClassification", "TASK_KINDS",
           "TUNE", "TUNE_GRID", "Task", "choose_task", "default_metric", "multi_label_metrics",
           "resolve_class_weights", "spearman", "task_from_model_config", "TASKS", "detect_task", "task_class",
           "task_class_for_problem_type"]
