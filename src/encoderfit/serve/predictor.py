"""``Classifier``: a trained checkpoint in Python, predicting labels (with probabilities) or scores.

    clf = Classifier.load("checkpoints/RUN/best")
    clf.predict(["a warm, funny film", "a dull mess"])            # single texts
    clf.predict(["A man sleeps."], pairs=["A person rests."])     # a pair checkpoint: the second texts

Texts longer than the checkpoint's ``max_length`` are handled as it was trained (truncated, head and tail,
or windows whose logits are pooled); its task decodes the logits (softmax and argmax, a sigmoid per label
at the recorded threshold, or the score itself).
"""
from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from encoderfit.serve import inference
from encoderfit.utils import PRECISIONS, UserError, autocast_dtype, detect_device


@dataclass(frozen=True)
class Prediction:
    """One example's prediction. Single-label: ``label`` and its probability ``score``; multi-label: the list of
    labels at or above the threshold and their probabilities; regression: the predicted score as both.
    ``scores``: every label's probability (regression: the target's name and the score)."""
    label: Union[str, list, float]
    score: Union[float, list]
    scores: dict = field(default_factory=dict)


def _as_texts(value, what: str) -> list:
    """One text (a string) or a sequence of them, as a list; a table or a mapping is refused by name (iterating
    it would give its column names), and so is anything that is not a sequence."""
    if isinstance(value, str):
        return [value]
    kind = type(value).__name__
    if isinstance(value, dict) or kind in ("DataFrame", "Dataset", "DatasetDict"):
        raise UserError(f"{what} must be a list of strings, got a {kind}: pass its text column, e.g. "
                        f"df['text'].tolist()")
    try:
        return list(value)
    except TypeError:
        raise UserError(f"{what} must be a string or a list of strings, got {kind}") from None


class Classifier:
    """A fine-tuned checkpoint (a run's ``final/`` or ``best/``, or the run directory) ready to predict."""

    def __init__(self, loaded: inference.Classifier, *, max_length: int, amp_dtype, batch_size: int):
        self._clf, self.max_length, self._amp_dtype, self.batch_size = loaded, max_length, amp_dtype, batch_size

    @classmethod
    def load(cls, path, *, device: str = "auto", precision: str = "auto", max_length: Optional[int] = None,
             batch_size: int = 64, runtime: str = "torch") -> "Classifier":
        """Load a checkpoint on ``device`` (auto: CUDA, then MPS, then CPU). ``max_length``: tokens per input
        (default: the one the checkpoint was trained with, else 512 or the model's limit). ``runtime``: "torch",
        or "onnx" / "onnx-int8" for its ONNX export (``export_onnx``) in ONNX Runtime on the CPU."""
        if device not in ("auto", "cpu", "cuda", "mps") and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise UserError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
        if precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if path is None or not isinstance(path, (str, os.PathLike)):
            raise UserError(f"Classifier.load needs a checkpoint directory (a path), got {type(path).__name__}")
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool)):
                raise UserError(f"{name} must be an integer, got {value!r}")
        if batch_size <= 0 or (max_length is not None and max_length <= 0):
            raise UserError("--batch_size and --max_length must be positive")
        if runtime not in inference.RUNTIMES:
            raise UserError(f"runtime must be one of {', '.join(inference.RUNTIMES)}, got {runtime!r}")
        if runtime == "torch":
            dev = detect_device(device)
            amp = autocast_dtype(dev, precision)
        else:
            dev, amp = inference.onnx_device(runtime, device, precision)
        loaded = inference.load_classifier(path, dev, runtime)
        length = inference.resolve_max_length(max_length, loaded, fallback=inference.trained_max_length(loaded.path))
        loaded.long_texts.check(length)
        return cls(loaded, max_length=length, amp_dtype=amp, batch_size=batch_size)

    @property
    def label_names(self) -> list:
        return list(self._clf.label_names)

    @property
    def task(self) -> str:
        """The task shape: single_label, multi_label or regression."""
        return self._clf.task.name

    @property
    def path(self) -> Path:
        return self._clf.path

    @property
    def takes_pairs(self) -> bool:
        return self._clf.takes_pairs

    def logits(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None):
        """Float32 logits, one row per text (a torch tensor on the CPU)."""
        texts = _as_texts(texts, "texts")
        if pairs is not None:
            pairs = _as_texts(pairs, "pairs")
        if self._clf.takes_pairs and pairs is None:
            raise UserError("this checkpoint classifies pairs of texts: pass the second texts as pairs=[...]")
        if not self._clf.takes_pairs and pairs is not None:
            raise UserError("this checkpoint was trained on single texts, not pairs: leave pairs out")
        if pairs is not None and len(pairs) != len(texts):
            raise UserError(f"pairs must give one second text per text: {len(texts)} texts, {len(pairs)} pairs")
        bad = next((i for i, t in enumerate(texts + (pairs or [])) if not isinstance(t, str)), None)
        if bad is not None:
            raise UserError(f"texts must be strings, got {type((texts + (pairs or []))[bad]).__name__}")
        return inference.predict_logits(self._clf, texts, batch_size=self.batch_size, max_length=self.max_length,
                                        amp_dtype=self._amp_dtype, pairs=pairs)

    def predict(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None) -> list:
        """A ``Prediction`` per text, in order."""
        return [Prediction(**p) for p in self._clf.task.predictions(self.logits(texts, pairs))]

    def __repr__(self) -> str:
        return (f"Classifier({str(self.path)!r}, task={self.task}, labels={self.label_names}, "
                f"max_length={self.max_length})")
