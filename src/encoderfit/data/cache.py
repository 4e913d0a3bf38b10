"""Tokenization, once per node, cached on disk under a key of everything it depends on."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import datasets

from encoderfit.data import batches
from encoderfit.data.columns import column
from encoderfit.data.sources import DataSource
from encoderfit.data.splits import LabelledSplits, load_labelled_splits
from encoderfit.engine.distributed import ProcessContext
from encoderfit.modeling.long_texts import DOC, LongTexts
from encoderfit.utils import UserError

CACHE_FORMAT = 5  # bump when the cached layout or what goes into it changes


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
        from encoderfit import __version__  # another release may read labels otherwise: its own entries

        key_fields = {"format": CACHE_FORMAT, "version": __version__, "source": source.fingerprint(),
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
