"""What evaluation and prediction print: tables of per-class metrics, the confusion matrix, label checks."""
from __future__ import annotations

import math
from typing import Sequence

from encoderfit.metrics import shown_metric, undefined_correlation
from encoderfit.utils import UserError


def known_ids(labels: Sequence[str], label_names: Sequence[str], where: str):
    """The checkpoint's class ids of the data's label names, a numpy array (UserError for names it does not know)."""
    import numpy as np

    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise UserError(f"the data has labels the checkpoint does not know: {shown} "
                        f"(it knows: {', '.join(label_names)}) in {where}")
    return np.array([index[name] for name in labels], dtype=np.int64)


def format_report(metrics: dict) -> str:
    """The per-class table, with a macro-average row."""
    names = metrics["labels"]
    width = max(9, *(len(n) for n in names))
    lines = [f"{'label':<{width}}  precision  recall      f1  support"]
    for name in names:
        m = metrics["per_class"][name]
        lines.append(f"{name:<{width}}  {m['precision']:>9.4f}  {m['recall']:>6.4f}  {m['f1']:>6.4f}"
                     f"  {m['support']:>7d}")
    lines.append(f"{'macro avg':<{width}}  {metrics['macro_precision']:>9.4f}  {metrics['macro_recall']:>6.4f}"
                 f"  {metrics['macro_f1']:>6.4f}  {metrics['examples']:>7d}")
    return "\n".join(lines)


def format_confusion(metrics: dict, max_name: int = 12) -> str:
    """The confusion matrix as a text table: rows true labels, columns predicted labels."""
    names = metrics["labels"]
    cm = metrics["confusion_matrix"]
    short = [n if len(n) <= max_name else n[:max_name - 1] + "~" for n in names]
    corner = "true \\ predicted"
    first = max(len(corner), *(len(n) for n in names))
    cols = [max(len(s), *(len(str(row[j])) for row in cm)) for j, s in enumerate(short)]
    lines = [f"{corner:<{first}}  " + "  ".join(f"{s:>{w}}" for s, w in zip(short, cols))]
    for name, row in zip(names, cm):
        lines.append(f"{name:<{first}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(row, cols)))
    return "\n".join(lines)


# ---------------------------------------------------------------- predict's tables, records and scores

def true_ids(got, label_names: list, where: str) -> tuple:
    """Each text's true class id (None where it has no label), or None when there is nothing to score."""
    if got.labels is None:
        return None, []
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted({v for v in got.labels if v is not None} - set(index))
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        if got.label_named:  # asked for: an error, as in evaluate.py
            raise UserError(f"the data has labels the checkpoint does not know: {shown} "
                            f"(it knows: {', '.join(label_names)}) in {where}")
        return None, [f"not scoring against column {got.label_column!r} of {where}: it has labels the checkpoint "
                      f"does not know ({shown}; it knows {', '.join(label_names)})"]
    ids = [None if v is None else index[v] for v in got.labels]
    unlabelled = sum(1 for v in ids if v is None)
    if unlabelled == len(ids):
        return None, [f"column {got.label_column!r} of {where} has no labels: nothing to score"]
    return ids, ([f"{unlabelled} text(s) without a label are not counted in the accuracy"] if unlabelled else [])


def shown(got) -> list:
    """Each input as a table shows it: a pair as 'first ||| second'."""
    if got.pairs is None:
        return got.texts
    return [f"{a} ||| {b}" for a, b in zip(got.texts, got.pairs)]


def _cut(text: str, room: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= room else flat[:room - 3] + "..."


def format_table(texts, label_names, probs, predicted, width: int) -> str:
    """probability | label | text (whitespace collapsed, cut to fit ``width`` columns)."""
    best = predicted.tolist()
    lw = max(5, *(len(n) for n in label_names))
    room = max(20, width - (6 + 2 + lw + 2))
    lines = [f"{'prob':>6}  {'label':<{lw}}  text"]
    for text, k, row in zip(texts, best, probs.tolist()):
        lines.append(f"{row[k]:>6.4f}  {label_names[k]:<{lw}}  {_cut(text, room)}")
    return "\n".join(lines)


def format_label_sets(texts, chosen, width: int) -> str:
    """labels (each with its probability) | text: a multi-label checkpoint's decisions ('-' for none)."""
    shown = [", ".join(c) or "-" for c in chosen]
    lw = max(len("labels (probability)"), *(len(x) for x in shown))
    room = max(20, width - lw - 2)
    return "\n".join([f"{'labels (probability)':<{lw}}  text"] + [f"{x:<{lw}}  {_cut(t, room)}" for x, t in zip(shown, texts)])


def format_scores(texts, scores, width: int) -> str:
    """score | text: a regression checkpoint's output."""
    values = [f"{v:.4f}" for v in scores.tolist()]
    sw = max(5, *(len(v) for v in values))
    room = max(20, width - sw - 2)
    return "\n".join([f"{'score':>{sw}}  text"] + [f"{v:>{sw}}  {_cut(t, room)}" for v, t in zip(values, texts)])


def prediction_records(texts, label_names, probs, predicted, true_ids=None, pairs=None) -> list:
    records = []
    for i, (text, row, k) in enumerate(zip(texts, probs.tolist(), predicted.tolist())):
        record = {"text": text, **({"text_pair": pairs[i]} if pairs is not None else {}),
                  "label": label_names[k], "score": row[k], "probabilities": dict(zip(label_names, row))}
        if true_ids is not None:
            record["true_label"] = None if true_ids[i] is None else label_names[true_ids[i]]
        records.append(record)
    return records


def accuracy_line(true_ids, predicted, column: str) -> str:
    pairs = [(t, p) for t, p in zip(true_ids, predicted.tolist()) if t is not None]
    correct = sum(1 for t, p in pairs if t == p)
    return (f"accuracy {correct / len(pairs):.4f} | {correct} of {len(pairs)} labelled text(s) correct "
            f"(label column {column!r})")


def true_scores(got, where: str) -> tuple:
    """Each text's target (None where it has none) for a regression checkpoint, or None with a note."""
    if got.labels is None:
        return None, []
    values = []
    for row, v in enumerate(got.labels, start=1):
        try:
            number = None if v is None else float(v)
        except ValueError:
            number = math.nan
        if number is not None and not math.isfinite(number):  # 'n/a', 'nan', 'inf': no score to compare with
            if got.label_named:
                raise UserError(f"row {row} of {where} has {v!r} in column {got.label_column!r}, not a finite "
                                f"number: a regression checkpoint scores against numbers (leave the field empty for "
                                f"a text without a target)")
            return None, [f"not scoring against column {got.label_column!r} of {where}: row {row} has {v!r}, not "
                          f"a finite number"]
        values.append(number)
    if all(v is None for v in values):
        return None, [f"column {got.label_column!r} of {where} has no labels: nothing to score"]
    return values, []


def regression_line(targets, scores, column: str) -> str:
    import torch

    from encoderfit.tasks.regression import pearson_from_sums

    kept = [(t, s) for t, s in zip(targets, scores.tolist()) if t is not None]
    y = torch.tensor([t for t, _ in kept], dtype=torch.float64)
    p = torch.tensor([s for _, s in kept], dtype=torch.float64)
    pearson = pearson_from_sums(len(kept), float(y.sum()), float(p.sum()), float((y * y).sum()),
                                 float((p * p).sum()), float((y * p).sum()))
    return (f"mse {float(((p - y) ** 2).mean()):.4f} | mae {float((p - y).abs().mean()):.4f} | pearson "
            f"{shown_metric(pearson)} | {len(kept)} labelled text(s) (label column {column!r})"
            + ("" if math.isfinite(pearson) else f" | {undefined_correlation(y, p)}"))
