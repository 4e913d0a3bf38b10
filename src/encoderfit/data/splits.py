"""A source -> cleaned train/validation splits with labels encoded (and one labelled file, as evaluation
reads it); fingerprints that say which examples a split holds."""
from __future__ import annotations
import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import Optional
import datasets
import numpy as np
from datasets.utils.stratify import stratified_shuffle_split_generate_indices
import torch
from encoderfit.utils import UserError
from encoderfit.data.columns import _pick_columns, _standardize, check_text_values, column, is_blank_text, is_missing
from encoderfit.data.labels import LABEL_COLUMNS, _counts, _encode_labels, _label_kind, _label_lists, _label_names, _labels_from_columns, _multi_hot, _regression_targets, _sorted_names, _target_stats, _unique_labels, resolve_task, strip_labels
from encoderfit.data.reader import _load_file
from encoderfit.data.sources import DataSource


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
        check_text_values(texts[name], col, where, all_columns)
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
    """Load a source into train/validation splits: ``text`` (and ``text_pair``), and ``labels``: class ids
    with label names, or float targets for a regression (``task``: "auto", "single_label", "regression";
    the one settled is ``info["task"]``)."""
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
    label_feature = train.features[columns[2]]
    separated = source.label_separator is not None
    train = _clean(_standardize(train, columns), where, notes, columns, train.column_names, separated)
    if isinstance(label_feature, datasets.ClassLabel) and -1 in _unique_labels(train, where):
        unlabelled = [i for i, v in enumerate(column(train, "label_raw")) if v == -1]
        notes.append(f"dropped {len(unlabelled)} row(s) of {where} labelled -1 (no gold label)")
        drop = set(unlabelled)
        train = train.select([i for i in range(len(train)) if i not in drop])
    lists = _label_lists(train, source.label_separator, where)
    if lists is not None:
        if task not in ("auto", "multi_label"):
            raise UserError(f"{where} has several labels per row (a list, --label_separator or --label_columns): "
                            f"a multi-label task, not --task {task}")
        task = "multi_label"
    elif task == "multi_label":
        raise UserError(f"--task multi_label needs several labels per row: a label column of lists (JSON Lines, "
                        f"Parquet), --label_separator or --label_columns")
    else:
        task = "single_label" if isinstance(label_feature, datasets.ClassLabel) and task == "auto" else \
            resolve_task(task, _unique_labels(train, where), where)
    regression, multi = task == "regression", task == "multi_label"
    if multi:
        names = [c.strip() for c in source.label_columns.split(",") if c.strip()] if source.label_columns \
            else _sorted_names(x for row in lists for x in row)
        if not names:
            raise UserError(f"no labels in {where}: every row's label list is empty")
        train = _multi_hot(train, lists, names, where)
    elif regression:
        names = [columns[2]]  # one output, named after the target column
        train = _regression_targets(train, where)
    else:
        names = _label_names(train, label_feature)
        train = _encode_labels(train, names, label_feature, where)

    if validation is not None:
        vwhere = source.validation_name or f"the validation split of {where}"
        for col in columns:
            if col is not None and col not in validation.column_names:
                raise UserError(f"column {col!r} not found in {vwhere} (columns: {', '.join(validation.column_names)})")
        validation = _clean(_standardize(validation, columns), vwhere, notes, columns, validation.column_names,
                            separated)
        if len(validation) and isinstance(label_feature, datasets.ClassLabel) \
                and -1 in _unique_labels(validation, vwhere):
            raise UserError(f"{vwhere} has no labels (-1): pass a labelled --validation_file")
        if multi:
            vlists = _label_lists(validation, source.label_separator, vwhere)
            if vlists is None:
                raise UserError(f"{vwhere} has one label per row and the training data several: give both as lists")
            validation = _multi_hot(validation, vlists, names, vwhere)
        else:
            validation = _regression_targets(validation, vwhere) if regression else \
                _encode_labels(validation, names, label_feature, vwhere)
        split_info = {"validation": vwhere}
    elif regression or multi:
        n = len(train)
        held, kept = math.ceil(validation_fraction * n), math.floor((1 - validation_fraction) * n)
        if held < 1 or kept < 1:
            raise UserError(f"--validation_fraction {validation_fraction} of {n} examples leaves nothing to "
                            f"{'validate' if held < 1 else 'train'} on: give more data or a --validation_file")
        parts = train.train_test_split(test_size=validation_fraction, seed=split_seed)
        train, validation = parts["train"], parts["test"]
        split_info = {"validation": f"random {validation_fraction:.0%} of {where}",
                      "split_seed": split_seed, "validation_fraction": validation_fraction}
    else:
        if len(names) < 2:
            raise UserError(f"only one label class in {where} ({names[0]!r}): a classifier needs at least two")
        train = train.cast_column("labels", datasets.ClassLabel(names=names))
        counts = torch.bincount(torch.tensor(column(train, "labels")), minlength=len(names))
        if int(counts.min()) < 2:
            raise UserError(f"label {names[int(counts.argmin())]!r} has fewer than 2 examples in {where}: "
                            f"too few to hold some out for validation")
        n, k = len(train), len(names)
        held, kept = math.ceil(validation_fraction * n), math.floor((1 - validation_fraction) * n)  # as datasets splits
        if held < k or kept < k:  # a stratified split needs every label on both sides
            raise UserError(f"--validation_fraction {validation_fraction} of {n} examples holds out {held} and "
                            f"trains on {kept}: each side needs at least {k} (one per label); use a fraction from "
                            f"{k / n:.3g} to {1 - k / n:.3g}, or give a --validation_file")
        train, validation = _stratified_split(train, validation_fraction, split_seed)
        split_info = {"validation": f"stratified {validation_fraction:.0%} of {where}",
                      "split_seed": split_seed, "validation_fraction": validation_fraction}

    train = _subset(train, num_samples, split_seed)
    validation = _subset(validation, num_samples, split_seed)
    if len(train) == 0:
        raise UserError(f"no training examples left in {where}")
    if len(validation) == 0:
        raise UserError("no validation examples: give a larger dataset or a --validation_file")
    if not multi and len(set(column(train, "labels"))) < 2:
        what = "target value" if regression else "label class"
        raise UserError(f"only one {what} in the training examples of {where}"
                        + (" (try a larger --num_samples)" if num_samples else ""))

    info = {
        "source": where, **split_info, "num_samples": num_samples, "task": task,
        "text_columns": [c for c in columns[:2] if c is not None],
        "train_examples": len(train), "validation_examples": len(validation),
        "label_names": names,
        **({"train_targets": _target_stats(train), "validation_targets": _target_stats(validation)} if regression
           else {"train_label_counts": _counts(train, len(names)),
                 "validation_label_counts": _counts(validation, len(names))}),
        **({"label_format": "columns" if source.label_columns else "separator" if source.label_separator
            else "lists"} if multi else {}),
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


@dataclass
class LabelledFile:
    """Every row of one labelled file, as evaluation reads it."""
    texts: list
    pairs: Optional[list]  # the second texts of a pair task, else None
    labels: list           # label names (integer labels as their decimal strings), or float targets
    info: dict


def load_labelled_file(path: str, *, text_column: Optional[str], label_column: Optional[str], quoting: str = "auto",
                       num_samples: Optional[int] = None, split_seed: int = 42,
                       text_pair_column: Optional[str] = None, regression: bool = False, multi_label: bool = False,
                       label_separator: Optional[str] = None, label_columns: Optional[str] = None) -> LabelledFile:
    """Every row of one labelled file, as evaluation reads it. Label names are the data's own, for matching
    to a checkpoint's (float targets with ``regression``); ``num_samples`` takes the seeded subset training
    would take of a validation file."""
    notes: list = []
    ds, read = _load_file(path, quoting, notes)
    source = DataSource("files", text_column=text_column, label_column=label_column, quoting=quoting,
                        text_pair_column=text_pair_column)
    if label_columns:
        ds = _labels_from_columns(ds, label_columns, path)
        source = replace(source, label_column=LABEL_COLUMNS)
    columns = _pick_columns(ds, source, path)
    ds = _clean(_standardize(ds, columns), path, notes, columns, ds.column_names, label_separator is not None)
    if multi_label:
        lists = _label_lists(ds, label_separator, path)
        if lists is None:
            raise UserError(f"{path} has one label per row, and the checkpoint is multi-label: give a column of "
                            f"label lists, --label_separator or --label_columns")
        ds = ds.remove_columns("label_raw").add_column("label_raw", lists)
        ds = _subset(ds, num_samples, split_seed)
        labels = column(ds, "label_raw")
    elif regression:
        ds = _regression_targets(ds, path)
        ds = _subset(ds, num_samples, split_seed)
        labels = column(ds, "labels")
    else:
        values = _unique_labels(ds, path)
        kind = _label_kind(values, path)
        if kind == "float":
            resolve_task("single_label", values, path)  # a classifier's labels are classes: the error says so
        ds = _subset(ds, num_samples, split_seed)
        labels = [str(int(v)) if kind == "int" else v for v in column(ds, "label_raw")]
    info = {"source": path, "validation": f"every row of {path}", "num_samples": num_samples,
            "rows_read": {path: read["rows"]}, "notes": notes}
    if read["quoting"]:
        info["quoting"] = {path: read["quoting"]}
    if num_samples:
        info["split_seed"] = split_seed
    return LabelledFile(column(ds, "text"), column(ds, "text_pair") if columns[1] else None, labels, info)
