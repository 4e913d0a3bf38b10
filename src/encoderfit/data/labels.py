"""Raw label values -> what a task trains on: class ids, multi-hot rows or float targets; label names."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import datasets
import numpy as np
import torch

from encoderfit.data.columns import column
from encoderfit.data.reader import _INT, _NUMBER
from encoderfit.utils import UserError


def _unique_labels(ds: datasets.Dataset, where: str) -> list:
    """Distinct raw labels, read as Python values (JSON files may mix types that Arrow cannot compare)."""
    values = column(ds, "label_raw")
    listed = next((row for row, v in enumerate(values, start=1) if isinstance(v, (list, tuple))), None)
    if listed is not None:
        raise UserError(f"{where} has lists of labels (row {listed}: several labels per row), where one label per "
                        f"row is read here: lists are for a multi-label task (its checkpoint reads them too)")
    try:
        return list(dict.fromkeys(values))
    except TypeError:  # objects as labels
        raise UserError(f"labels in {where} must be integers or strings") from None


def _label_kind(values, where: str) -> str:
    """"int" or "str" (class labels), or "float": numbers (or texts of numbers) of which some have a fraction."""
    kinds = {("int" if isinstance(v, int) and not isinstance(v, bool) else
              "str" if isinstance(v, str) else type(v).__name__) for v in values}
    if kinds == {"int"}:
        return "int"
    if kinds == {"str"}:  # CSV reads 0.5 as text; JSON may hold "0" and "1" as class names
        numbers = all(_NUMBER.fullmatch(v) for v in values)
        return "float" if numbers and not all(float(v).is_integer() for v in values) else "str"
    if kinds <= {"float", "int"}:
        return "int" if all(float(v).is_integer() for v in values) else "float"
    raise UserError(f"labels in {where} must be all integers or all strings, found: {', '.join(sorted(kinds))}")


def refuse_fractions(values, where: str, flag: str = "--task single_label") -> None:
    """Class labels are classes: numbers with a fraction among them are an error that says what to do."""
    fraction = next((v for v in values if not float(v).is_integer()), None)
    raise UserError(f"labels in {where} are numbers with a fraction (found: {fraction!r}), and {flag} "
                    f"needs class labels: use --task regression (or auto) for a score, or check --label_column")


def first_word(values) -> Optional[str]:
    """The first label that is text, not a number (what a regression cannot take), or None."""
    return next((v for v in values if isinstance(v, str) and not _NUMBER.fullmatch(v)), None)


@dataclass(frozen=True)
class RawLabels:
    """How a data set gives its labels: the label column's name and feature (a ``ClassLabel`` names the classes),
    and, for several labels per row, the string they are separated by or the 0/1 columns they come from."""
    column: str
    feature: object = None
    separator: Optional[str] = None
    columns: Optional[str] = None  # --label_columns, as given

    @property
    def class_label(self) -> bool:
        return isinstance(self.feature, datasets.ClassLabel)

    def lists(self, ds: datasets.Dataset, where: str) -> Optional[list]:
        """Each row's labels as a list where the data gives several per row, else None."""
        return _label_lists(ds, self.separator, where)

    @property
    def format(self) -> str:
        """How several labels per row were given: columns, separator or lists."""
        return "columns" if self.columns else "separator" if self.separator else "lists"


LABEL_COLUMNS = "__labels__"  # the list column that --label_columns' 0/1 columns become


def _labels_from_columns(ds: datasets.Dataset, spec: str, where: str) -> datasets.Dataset:
    """--label_columns a,b,c: one 0/1 column per label -> a column of label-name lists."""
    names = [c.strip() for c in spec.split(",") if c.strip()]
    missing = [c for c in names if c not in ds.column_names]
    if missing:
        raise UserError(f"--label_columns: column(s) {', '.join(missing)} not found in {where} "
                        f"(columns: {', '.join(ds.column_names)})")
    if len(set(names)) != len(names):
        raise UserError(f"--label_columns names a column twice: {spec}")
    lists = [[] for _ in range(len(ds))]
    for name in names:
        for row, v in enumerate(ds[name]):
            if isinstance(v, str) and _NUMBER.fullmatch(v):  # a column of text (one 'yes' in it) reads '1' as text
                v = float(v)
            if isinstance(v, bool) or (isinstance(v, (int, float)) and v in (0, 1)):
                if v:
                    lists[row].append(name)
            else:
                raise UserError(f"--label_columns: row {row + 1} of {where} has {v!r} in column {name!r}, "
                                f"where 0 or 1 is expected")
    return ds.add_column(LABEL_COLUMNS, lists)


def _label_lists(ds: datasets.Dataset, separator: Optional[str], where: str) -> Optional[list]:
    """Each row's labels as a list where the labels are several per row (a list column, or strings split
    at ``separator``), else None. Labels are names (integers as their decimal strings), stripped."""
    raw = column(ds, "label_raw")
    if separator is not None:  # an empty field: no label
        listed = next((row for row, v in enumerate(raw, start=1) if isinstance(v, (list, tuple))), None)
        if listed is not None:
            raise UserError(f"row {listed} of {where} has a list of labels, and --label_separator splits labels "
                            f"given as one string: leave --label_separator out")
        raw = ["" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in raw]
        return [[x.strip() for x in v.split(separator) if x.strip()] for v in raw]
    if not any(isinstance(v, (list, tuple)) for v in raw):
        return None
    out = []
    for row, v in enumerate(raw, start=1):
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, (str, int)) and not isinstance(x, bool)
                                                       for x in v):
            raise UserError(f"row {row} of {where} has the label {v!r}: a column of label lists needs a list of "
                            f"names (or integers) in every row")
        out.append([x.strip() if isinstance(x, str) else str(x) for x in v if not (isinstance(x, str) and not x.strip())])
    return out


def _multi_hot(ds: datasets.Dataset, lists: list, names: list, where: str) -> datasets.Dataset:
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({x for row in lists for x in row} - set(index))
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise UserError(f"labels in {where} that the training data does not have: {shown}")
    targets = []
    for row in lists:
        hot = [0.0] * len(names)
        for x in row:
            hot[index[x]] = 1.0
        targets.append(hot)
    return ds.remove_columns("label_raw").add_column("labels", targets)


def _sorted_names(values) -> list:
    """Label names in order: integers numerically, then text."""
    return sorted(set(values), key=lambda n: (0, int(n), "") if _INT.fullmatch(n) else (1, 0, n))


def _regression_targets(ds: datasets.Dataset, where: str) -> datasets.Dataset:
    """label_raw -> float ``labels``; a label that is not a finite number is an error naming its row."""
    values = column(ds, "label_raw")
    targets = []
    for row, v in enumerate(values, start=1):
        try:
            number = float(v)
        except (TypeError, ValueError):
            raise UserError(f"row {row} of {where} has the label {v!r}, not a number (--task regression)") from None
        if not math.isfinite(number):
            raise UserError(f"row {row} of {where} has the label {v!r}: a regression target must be finite")
        targets.append(number)
    return ds.remove_columns("label_raw").add_column("labels", targets)


def _label_names(train: datasets.Dataset, label_feature) -> list:
    if isinstance(label_feature, datasets.ClassLabel):
        return list(label_feature.names)
    values = _unique_labels(train, "the training data")
    kind = _label_kind(values, "the training data")
    if kind == "int":
        return [str(v) for v in sorted(int(v) for v in values)]
    return sorted(values)


def _encode_labels(ds: datasets.Dataset, names: list, label_feature, where: str) -> datasets.Dataset:
    """Map raw labels to ids 0..K-1 (string labels and non-contiguous integers alike)."""
    if isinstance(label_feature, datasets.ClassLabel):
        return ds.rename_column("label_raw", "labels")
    index = {name: i for i, name in enumerate(names)}
    values = _unique_labels(ds, where)
    kind = _label_kind(values, where)
    if kind == "float":
        refuse_fractions(values, where)
    keyed = [str(int(v)) if kind == "int" else v for v in values]
    unknown = sorted({k for k in keyed if k not in index})
    if unknown:
        shown = ", ".join(map(str, unknown[:5])) + (" ..." if len(unknown) > 5 else "")
        raise UserError(f"labels in {where} that the training data does not have: {shown}")
    to_id = lambda v: index[str(int(v)) if kind == "int" else v]  # noqa: E731
    return ds.map(lambda b: {"labels": [to_id(v) for v in b["label_raw"]]}, batched=True,
                  remove_columns=["label_raw"], keep_in_memory=True)


def strip_labels(labels: list, where: str, notes: list) -> list:
    """String labels without surrounding whitespace ('pos ' is 'pos'), with a note naming what changed."""
    if not all(isinstance(v, str) for v in labels):
        return labels
    stripped = [v.strip() for v in labels]
    changed = sum(1 for a, b in zip(labels, stripped) if a != b)
    if changed:
        variants: dict = {}
        for raw in dict.fromkeys(labels):
            variants.setdefault(raw.strip(), []).append(raw)
        groups = [f"{', '.join(repr(v) for v in sorted(vs, key=lambda v: (v != name, v)))} -> {name!r}"
                  for name, vs in sorted(variants.items()) if vs != [name]]
        shown = "; ".join(groups[:5]) + (" ..." if len(groups) > 5 else "")
        notes.append(f"labels of {where} that differ only by surrounding whitespace are merged, stripped: "
                     f"{shown} ({changed} row(s))")
    return stripped if changed else labels  # the same list: the caller need not rewrite the column


def _target_stats(ds: datasets.Dataset) -> dict:

    y = np.asarray(column(ds, "labels"), dtype=np.float64)
    return {"mean": float(y.mean()), "std": float(y.std()), "min": float(y.min()), "max": float(y.max())}


def _counts(ds: datasets.Dataset, k: int) -> list:
    """Examples per label (for multi-label: examples that have the label)."""
    labels = column(ds, "labels")
    if labels and isinstance(labels[0], list):
        return [int(x) for x in torch.tensor(labels).sum(dim=0).tolist()]
    return torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=k).tolist()
