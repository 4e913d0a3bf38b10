"""A source -> cleaned train/validation splits with labels encoded (and one labelled file, as evaluation
reads it); fingerprints that say which examples a split holds."""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field, replace
from typing import Optional

import datasets
import numpy as np
from datasets.utils.stratify import stratified_shuffle_split_generate_indices

from encoderfit.data.columns import (
    _pick_columns,
    _standardize,
    check_text_values,
    column,
    is_blank_text,
    is_missing,
)
from encoderfit.data.labels import (
    LABEL_COLUMNS,
    RawLabels,
    _labels_from_columns,
    _unique_labels,
    strip_labels,
)
from encoderfit.data.reader import _load_file
from encoderfit.data.sources import DataSource
from encoderfit.utils import UserError


def content_fingerprint(ds: datasets.Dataset) -> str:
    """A hash of a split's examples in order (texts, second texts and labels): what a resume must find unchanged."""
    digest = hashlib.sha256()
    for text, label in zip(example_keys(ds), column(ds, "labels")):
        digest.update(f"{label}\x1f{text}\x1e".encode())
    return digest.hexdigest()


def example_keys(ds_or_texts, pairs: Optional[list] = None) -> list:
    """Each example's text, or ``text + "\\x1f" + second text`` for a pair: what identifies it."""
    if isinstance(ds_or_texts, datasets.Dataset):
        texts = column(ds_or_texts, "text")
        pairs = column(ds_or_texts, "text_pair") if "text_pair" in ds_or_texts.column_names else None
    else:
        texts = ds_or_texts
    return list(texts) if pairs is None else [f"{a}\x1f{b}" for a, b in zip(texts, pairs)]


def validation_sha256(keys: list) -> str:
    """Which examples were held out (the ``example_keys`` of the split, in any order)."""
    return hashlib.sha256("\0".join(sorted(keys)).encode()).hexdigest()


@dataclass
class LabelledSplits:
    train: datasets.Dataset  # columns: text, labels (int ids)
    validation: datasets.Dataset
    label_names: list
    info: dict = field(default_factory=dict)  # what a person needs to know about how the data was made


def _clean(ds: datasets.Dataset, where: str, notes: list, columns: tuple, all_columns,
           empty_label_ok: bool = False) -> datasets.Dataset:
    """Rows without a label are an error; string labels are stripped; rows with a blank text (empty,
    whitespace, invisible characters only; either text of a pair) are dropped and counted; a text column
    of numbers is an error. ``columns`` are the file's (text, text pair or None, label) names."""
    labels = column(ds, "label_raw")
    missing = [] if empty_label_ok else [i for i, v in enumerate(labels) if is_missing(v)]
    if missing:
        raise UserError(f"{len(missing)} row(s) in {where} have no label (first: row {missing[0] + 1})")
    text_fields = [("text", columns[0])] + ([("text_pair", columns[1])] if columns[1] else [])
    texts = {name: column(ds, name) for name, _ in text_fields}
    for name, col in text_fields:
        check_text_values(texts[name], col, where, all_columns, "text pair" if name == "text_pair" else "text")
    stripped = strip_labels(labels, where, notes)
    if stripped is not labels:
        ds = ds.remove_columns("label_raw").add_column("label_raw", stripped)
    keep, invisible = [], 0
    for i, row in enumerate(zip(*texts.values())):
        if all(isinstance(t, str) and not is_blank_text(t) for t in row):
            keep.append(i)
        elif all(isinstance(t, str) and t.strip() for t in row):
            invisible += 1
    dropped = len(ds) - len(keep)
    if dropped:
        detail = (f" ({invisible} of them only control, format or zero-width characters)" if invisible else "")
        what = "either text" if columns[1] else "text"
        notes.append(f"dropped {dropped} row(s) of {where} with empty or missing {what}{detail}")
        ds = ds.select(keep)
    if len(ds) == 0:
        raise UserError(f"no row of {where} has a text: is --text_column the right column?")
    return ds


def _subset(ds: datasets.Dataset, n: Optional[int], seed: int) -> datasets.Dataset:
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def _stratified_split(ds: datasets.Dataset, fraction: float, seed: int) -> tuple:
    """``ds.train_test_split(test_size=fraction, seed=seed, stratify_by_column="labels")``'s (train, test), the
    same rows in the same order (its sizes, its generator, its function), but with the labels read in one go:
    datasets reads them one row at a time there (2.5 s of 12,752 rows on a laptop core, against 0.01 s)."""
    n_test = math.ceil(fraction * len(ds))
    labels = np.asarray(column(ds, "labels"))
    train, test = next(stratified_shuffle_split_generate_indices(labels, len(ds) - n_test, n_test,
                                                                 rng=np.random.default_rng(seed)))
    return ds.select(train), ds.select(test)


def load_labelled_splits(source: DataSource, *, validation_fraction: float, split_seed: int,
                         num_samples: Optional[int], task: str = "auto") -> LabelledSplits:
    """Load a source into train/validation splits: ``text`` (and ``text_pair``), and ``labels`` as the task
    shape encodes them, with the label names. ``task``: --task ("auto" or a task name); the shape settled from
    the labels is ``info["task"]``, and its class does everything that differs by task here."""
    from encoderfit.tasks.registry import detect_task

    notes: list = []
    # files: per local file, the rows read and how (data.json's rows_read, quoting)
    train, validation, where, files = source.load(notes)
    if len(train) == 0:
        raise UserError(f"no examples in {where}")

    if source.label_columns:
        train = _labels_from_columns(train, source.label_columns, where)
        if validation is not None:
            validation = _labels_from_columns(validation, source.label_columns,
                                              source.validation_name or f"the validation split of {where}")
        source = replace(source, label_column=LABEL_COLUMNS)
    columns = _pick_columns(train, source, where)
    raw = RawLabels(columns[2], train.features[columns[2]], source.label_separator, source.label_columns)
    separated = source.label_separator is not None
    train = _clean(_standardize(train, columns), where, notes, columns, train.column_names, separated)
    if raw.class_label and -1 in _unique_labels(train, where):
        unlabelled = [i for i, v in enumerate(column(train, "label_raw")) if v == -1]
        notes.append(f"dropped {len(unlabelled)} row(s) of {where} labelled -1 (no gold label)")
        drop = set(unlabelled)
        train = train.select([i for i in range(len(train)) if i not in drop])
    shape = detect_task(task, train, raw, where)
    names = shape.label_names_of(train, raw, where)
    train = shape.encode(train, names, raw, where)

    if validation is not None:
        vwhere = source.validation_name or f"the validation split of {where}"
        for col in columns:
            if col is not None and col not in validation.column_names:
                raise UserError(f"column {col!r} not found in {vwhere} (columns: {', '.join(validation.column_names)})")
        validation = _clean(_standardize(validation, columns), vwhere, notes, columns, validation.column_names,
                            separated)
        if len(validation) and raw.class_label and -1 in _unique_labels(validation, vwhere):
            raise UserError(f"{vwhere} has no labels (-1): pass a labelled --validation_file")
        validation = shape.encode(validation, names, raw, vwhere)
        split_info = {"validation": vwhere}
    else:
        train, validation, how = shape.hold_out(train, names, validation_fraction, split_seed, where)
        split_info = {"validation": f"{how} {validation_fraction:.0%} of {where}",
                      "split_seed": split_seed, "validation_fraction": validation_fraction}

    train = _subset(train, num_samples, split_seed)
    validation = _subset(validation, num_samples, split_seed)
    if len(train) == 0:
        raise UserError(f"no training examples left in {where}")
    if len(validation) == 0:
        raise UserError("no validation examples: give a larger dataset or a --validation_file")
    shape.check_training_labels(train, where, num_samples)

    info = {
        "source": where, **split_info, "num_samples": num_samples, "task": shape.name,
        "text_columns": [c for c in columns[:2] if c is not None],
        "train_examples": len(train), "validation_examples": len(validation),
        "label_names": names,
        **shape.label_stats(train, validation, names, raw),
        # identifies exactly which examples were held out, so two runs can be checked to share a split
        "validation_sha256": validation_sha256(example_keys(validation)),
        # the examples themselves, in order: a resume refuses data that changed since its checkpoint
        "fingerprint": {"train": content_fingerprint(train), "validation": content_fingerprint(validation),
                        "train_examples": len(train), "validation_examples": len(validation)},
        "notes": notes,
    }
    if files:  # the rows each file gave (before empty texts were dropped), to compare with the file
        info["rows_read"] = {path: f["rows"] for path, f in files.items()}
        info["quoting"] = {path: f["quoting"] for path, f in files.items() if f["quoting"]}
    return LabelledSplits(train, validation, names, info)


@dataclass(frozen=True)
class ColumnChoice:
    """The column flags of a labelled file: which columns hold the text, the second text, the label(s)."""
    text: Optional[str] = None
    pair: Optional[str] = None
    label: Optional[str] = None
    label_separator: Optional[str] = None
    label_columns: Optional[str] = None


@dataclass
class LabelledFile:
    """Every row of one labelled file, as evaluation reads it."""
    texts: list
    pairs: Optional[list]  # the second texts of a pair task, else None
    labels: list           # label names (integer labels as their decimal strings), or float targets
    info: dict


def load_labelled_file(path, shape, *, columns: ColumnChoice, quoting: str = "auto",
                       subset: tuple = (None, 42)) -> LabelledFile:
    """Every row of one labelled file (or in-memory data), as evaluation reads it for a checkpoint of task
    ``shape``: labels as ``shape.file_labels`` gives them, for matching to the checkpoint's. ``subset``:
    (num_samples, split_seed), the seeded subset training would take of a validation file."""
    notes: list = []
    if isinstance(path, (str, os.PathLike)):
        path = os.fspath(path)
        ds, read = _load_file(path, quoting, notes)
    else:  # a DataFrame or a datasets.Dataset given to evaluate()
        from encoderfit.data.sources import _as_dataset

        ds, path = _as_dataset(path, "the data given to evaluate()"), "the data given to evaluate()"
        read = {"rows": len(ds), "quoting": None}
    source = DataSource("files", text_column=columns.text, label_column=columns.label, quoting=quoting,
                        text_pair_column=columns.pair)
    if columns.label_columns:
        ds = _labels_from_columns(ds, columns.label_columns, path)
        source = replace(source, label_column=LABEL_COLUMNS)
    picked = _pick_columns(ds, source, path)
    raw = RawLabels(picked[2], ds.features[picked[2]], columns.label_separator, columns.label_columns)
    ds = _clean(_standardize(ds, picked), path, notes, picked, ds.column_names, columns.label_separator is not None)
    num_samples, split_seed = subset
    ds = _subset(shape.file_labels(ds, raw, path), num_samples, split_seed)
    info = {"source": path, "validation": f"every row of {path}", "num_samples": num_samples,
            "rows_read": {path: read["rows"]}, "notes": notes}
    if read["quoting"]:
        info["quoting"] = {path: read["quoting"]}
    if num_samples:
        info["split_seed"] = split_seed
    return LabelledFile(column(ds, "text"), column(ds, "text_pair") if picked[1] else None, column(ds, "label_raw"),
                        info)