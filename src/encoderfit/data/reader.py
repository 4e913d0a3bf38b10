"""The one table reader: .csv/.tsv (Python's csv module, with a quoting check), .jsonl/.json and .parquet,
for training and the tools alike."""
from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets

from encoderfit.utils import UserError
from encoderfit.utils import root_message as _root_message

FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


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
