"""Inference with a fine-tuned checkpoint: shared by predict.py and evaluate.py.

- ``load_classifier``: a checkpoint directory -> model, tokenizer and label names, with
  every way it can be wrong reported as a ``UserError`` (one line, exit code 2);
- ``predict_logits``: batched, length-sorted inference that returns float32 logits in
  input order, through the tokenization, collation and forward pass training uses
  (``training/batches.py``); the checkpoint's task decodes them;
- ``read_input`` / ``read_texts``: texts (and labels, where a table has them) from a .txt file (one
  per line), a table file or standard input; .csv/.tsv through training's reader (``data.read_delimited``);
- the command-line pieces the tools share (flags, their checks, the error handling).

torch and numpy are imported inside the functions that use them: the tools parse their flags, and
answer --help and argument errors, before anything heavy loads.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from encoderfit.modeling.long_texts import DOC, LongTexts
from encoderfit.utils import (  # noqa: F401
    HelpFormatter,
    ToolParser,
    UserError,
    PRECISIONS,
    autocast_dtype,
    precision_name,
    detect_device,
)

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

DEFAULT_MAX_LENGTH = 512
# Models whose position table has (padding_idx + 1) extra rows in front of the usable positions.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "bart", "mbart", "data2vec-text",
                     "xlm-roberta-xl", "roberta-prelayernorm", "ibert", "luke", "mpnet"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TABLE_FORMATS = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


# ---------------------------------------------------------------- the checkpoint

@dataclass
class Classifier:
    model: torch.nn.Module
    tokenizer: object
    label_names: list  # index = class id
    path: Path
    device: torch.device
    max_positions: int  # the longest input the model takes, in tokens
    task: object        # training/tasks.py: decodes the logits, computes the loss
    text_columns: list = field(default_factory=lambda: ["text"])  # the training data's; two for a pair task
    long_texts: LongTexts = LongTexts()  # what training did with texts over --max_length (config.json's long_texts)

    @property
    def label2id(self) -> dict:
        return {name: i for i, name in enumerate(self.label_names)}

    @property
    def takes_pairs(self) -> bool:
        return len(self.text_columns) == 2


def checkpoint_text_columns(path, recorded_only: bool = False) -> Optional[list]:
    """The text column(s) a checkpoint was trained on, from its config.json (read before the model loads:
    the tools know whether to read pairs before they read their input). ["text"] where not recorded
    (None with ``recorded_only``)."""
    from encoderfit.modeling.model import TEXT_COLUMNS_KEY

    try:
        value = json.loads((resolve_checkpoint(path) / "config.json").read_text(encoding="utf-8")).get(TEXT_COLUMNS_KEY)
    except (OSError, ValueError, AttributeError, UserError):  # loading the model says what is wrong
        value = None
    if isinstance(value, list) and len(value) in (1, 2):
        return [str(c) for c in value]
    return None if recorded_only else ["text"]


def checkpoint_label_format(path) -> dict:
    """How the checkpoint's training data gave several labels per row ({"label_separator": ..., "label_columns":
    ...}, from its config.json), or {} where it recorded nothing (one label per row, or lists)."""
    try:
        value = json.loads((resolve_checkpoint(path) / "config.json").read_text(encoding="utf-8")).get("label_format")
    except (OSError, ValueError, AttributeError, UserError):
        value = None
    return {k: v for k, v in value.items() if v} if isinstance(value, dict) else {}


def checkpoint_label_names(path) -> list:
    """The checkpoint's label names in output order (config.json's id2label), read without loading the model."""
    try:
        id2label = json.loads((resolve_checkpoint(path) / "config.json").read_text(encoding="utf-8")).get("id2label")
    except (OSError, ValueError, AttributeError, UserError):
        return []
    return [str(id2label[k]) for k in sorted(id2label, key=int)] if isinstance(id2label, dict) else []


def checkpoint_problem_type(path) -> str:
    """The checkpoint's problem_type (config.json), read without loading the model."""
    try:
        value = json.loads((resolve_checkpoint(path) / "config.json").read_text(encoding="utf-8")).get("problem_type")
    except (OSError, ValueError, AttributeError, UserError):
        return "single_label_classification"
    return value or "single_label_classification"


def resolve_checkpoint(path) -> Path:
    """The checkpoint directory (a run directory is taken to mean its ``final/``)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint not found: {path}")
    if not p.is_dir():
        raise UserError(f"checkpoint is not a directory: {path}")
    if _is_model_config(p / "config.json"):
        return p
    if _is_model_config(p / "final" / "config.json"):  # a run directory: its config.json is the run's record
        return p / "final"
    raise UserError(f"{path} is not a model checkpoint (no model config.json): pass a run's final/ directory")


def _is_model_config(path: Path) -> bool:
    try:
        return "model_type" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def _is_classifier_config(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def model_max_positions(config, tokenizer) -> int:
    """The longest input, in tokens, that both the model and the tokenizer allow."""
    limits = []
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        if getattr(config, "model_type", None) in _OFFSET_POSITIONS:
            pad = getattr(config, "pad_token_id", None)
            positions -= (1 if pad is None else pad) + 1
        limits.append(positions)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 1_000_000:  # unset is a huge sentinel
        limits.append(tok_limit)
    return min(limits) if limits else DEFAULT_MAX_LENGTH


RUNTIMES = ("torch", "onnx", "onnx-int8")


def load_classifier(path, device: torch.device, runtime: str = "torch") -> Classifier:
    """A fine-tuned sequence classifier and its tokenizer, in eval mode on ``device``. ``runtime``: the PyTorch
    model, or its ONNX export (``encoderfit export``: onnx/model.onnx, or the int8 copy) run by ONNX Runtime on
    the CPU, with the checkpoint's own config and tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    if runtime not in RUNTIMES:
        raise UserError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    ckpt = resolve_checkpoint(path)
    try:
        config = AutoConfig.from_pretrained(ckpt)
    except Exception as exc:  # ValueError (unknown model type), OSError, JSON errors
        raise UserError(f"cannot read the model config in {ckpt}: {_one_line(exc)}") from None
    if not _is_classifier_config(config):
        arch = ", ".join(config.architectures or []) or "unknown"
        raise UserError(f"{ckpt} is not a text-classification checkpoint (architecture: {arch}): "
                        f"fine-tune it first with train_single.py")
    if runtime != "torch":
        from encoderfit.serve.onnx import OnnxModel

        model = OnnxModel.load(ckpt, config, int8=runtime == "onnx-int8")
    elif not any((ckpt / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"{ckpt} has no model weights ({' or '.join(WEIGHT_FILES[::2])})")
    else:
        model = _load_torch_model(ckpt)

    from encoderfit.modeling.model import check_tokenizer_files, tokenizer_is_empty

    check_tokenizer_files(ckpt, f"the checkpoint {ckpt}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
    except Exception as exc:
        raise UserError(f"cannot load the tokenizer in {ckpt}: {_one_line(exc)}") from None
    if tokenizer_is_empty(tokenizer):
        raise UserError(f"the tokenizer in {ckpt} has only special tokens ({len(tokenizer)}): every word would be "
                        f"unknown; copy the tokenizer files of the model it was trained from into it")

    id2label = model.config.id2label or {}
    num_labels = model.config.num_labels
    names = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(num_labels)]
    if len(set(names)) != len(names):
        raise UserError(f"{ckpt} has duplicate label names in its config: {', '.join(names)}")
    from encoderfit.tasks.registry import task_from_model_config

    task = task_from_model_config(model.config, names)
    model.to(device).eval()
    return Classifier(model, tokenizer, names, ckpt, device, model_max_positions(model.config, tokenizer), task,
                      checkpoint_text_columns(ckpt), LongTexts.from_record(getattr(model.config, "long_texts", None)))


def run_directory(ckpt: Path) -> Optional[Path]:
    """The training run a checkpoint belongs to (RUN/final, RUN/best or RUN/checkpoints/step-N), found by the
    run's own config.json (a ``config`` record, not a model's settings); None for a checkpoint on its own."""
    ckpt = Path(ckpt).resolve()  # a sweep's best/ is a link into its trial
    for run in (ckpt.parent, ckpt.parent.parent):
        with contextlib.suppress(Exception):
            if isinstance(json.loads((run / "config.json").read_text(encoding="utf-8"))["config"], dict):
                return run
    return None


def run_record(ckpt: Path, name: str = "config.json") -> Optional[dict]:
    """A JSON record of the checkpoint's run (config.json: the resolved config; data.json: the data), or None."""
    run = run_directory(ckpt)
    if run is None:
        return None
    with contextlib.suppress(OSError, ValueError):
        value = json.loads((run / name).read_text(encoding="utf-8"))
        return value if isinstance(value, dict) else None
    return None


def _load_torch_model(ckpt: Path):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # no load report or weight-loading bar: problems are checked below
    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(ckpt, output_loading_info=True)
    except Exception as exc:
        raise UserError(f"cannot load the model in {ckpt}: {_one_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # e.g. a base model's weights under a classifier config: the head would be random
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise UserError(f"{ckpt} is not a trained classifier: weights missing for {shown}")
    return model


def trained_max_length(ckpt: Path) -> Optional[int]:
    """The --max_length the checkpoint was trained with, if its run recorded it (else None)."""
    value = ((run_record(ckpt) or {}).get("config") or {}).get("max_length")
    if isinstance(value, int) and value > 0:
        return value
    state = ckpt / "training_state.pt"
    if state.is_file():
        with contextlib.suppress(Exception):
            import torch
            from torch.torch_version import TorchVersion

            # mmap: only the small config is read, not the optimizer's tensors
            with torch.serialization.safe_globals([TorchVersion]):
                loaded = torch.load(state, map_location="cpu", weights_only=True, mmap=True)
            value = loaded["config"]["max_length"]
            if isinstance(value, int) and value > 0:
                return value
    return None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


# ---------------------------------------------------------------- batched inference

def predict_logits(clf: Classifier, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 512,
                   amp_dtype: Optional[torch.dtype] = None, on_batch: Optional[Callable[[int], None]] = None,
                   pairs: Optional[Sequence[str]] = None, long_texts: Optional[LongTexts] = None) -> torch.Tensor:
    """Float32 logits ``[len(texts), num_labels]`` on the CPU, row i for ``texts[i]`` (with ``pairs[i]``,
    the second text of a pair, tokenized as training tokenized pairs).

    Texts are tokenized a chunk at a time (texts over ``max_length`` tokens as ``long_texts`` says, by
    default as the checkpoint was trained: under ``windows`` a text's row is its windows' logits, pooled),
    sorted by length inside the chunk, and padded per batch to the batch's longest row, so little compute
    goes to padding; the rows are put back in input order. ``on_batch(n)`` is called as ``n`` more texts
    are done (for a progress bar).
    """
    import torch

    with torch.no_grad():
        return _predict_logits(clf, texts, pairs, batch_size, max_length, amp_dtype, on_batch,
                               long_texts or clf.long_texts)


def _predict_logits(clf, texts, pairs, batch_size, max_length, amp_dtype, on_batch, long_texts):
    import torch

    from encoderfit.data.batches import PadCollator, forward_logits
    from encoderfit.modeling.long_texts import pool

    device = clf.device
    n = len(texts)
    out = torch.empty(n, clf.task.num_labels, dtype=torch.float32)
    if n == 0:
        return out
    collate = PadCollator(clf.tokenizer, 8 if device.type == "cuda" else None)
    chunk = batch_size * 32
    for c0 in range(0, n, chunk):
        second = None if pairs is None else [str(t) for t in pairs[c0:c0 + chunk]]
        enc = long_texts.encode(clf.tokenizer, [str(t) for t in texts[c0:c0 + chunk]], max_length, second)
        docs = enc.pop(DOC, None)  # windows: the text (in this chunk) of each row
        rows = [dict(zip(enc.keys(), values)) for values in zip(*enc.values())]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
        batches = [order[b0:b0 + batch_size] for b0 in range(0, len(order), batch_size)]
        collated = (collate([rows[i] for i in idx]) for idx in batches)
        chunk_out = torch.empty(len(rows), clf.task.num_labels, dtype=torch.float32)
        for idx, (_, logits) in zip(batches, forward_logits(clf.model, collated, device=device, amp_dtype=amp_dtype)):
            chunk_out[torch.tensor(idx)] = logits.float().cpu()
            if on_batch is not None and docs is None:
                on_batch(len(idx))
        if docs is None:
            out[c0:c0 + len(rows)] = chunk_out
            continue
        ids, pooled, _ = pool(chunk_out, torch.tensor(docs), long_texts.pooling)
        out[ids + c0] = pooled
        if on_batch is not None:
            on_batch(len(ids))
    return out


def progress_bar(total: int, desc: str):
    """A progress bar on stderr for a person at a terminal; None otherwise."""
    if not sys.stderr.isatty() or total < 1000:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="text", dynamic_ncols=True, leave=False)


# ---------------------------------------------------------------- reading texts

_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # one text per line: str.splitlines would also split on U+2028 & co.


@dataclass
class InputTexts:
    """What a tool reads: the texts, and where the input is a table with a label column, each text's label."""
    texts: list
    labels: Optional[list] = None  # one per text: its label name (as text), None for a row without one
    label_column: Optional[str] = None
    label_named: bool = False      # --label_column named it (else it was found by name)
    notes: list = field(default_factory=list)
    pairs: Optional[list] = None   # the second text of each pair, for a checkpoint trained on pairs


def read_texts(path: str, text_column: Optional[str] = None, quoting: str = "auto") -> tuple:
    """Texts from ``path`` and a note about skipped rows (or None); see ``read_input``."""
    got = read_input(path, text_column, quoting=quoting, labels=False)
    return got.texts, "; ".join(got.notes) or None


def read_input(path: str, text_column: Optional[str] = None, label_column: Optional[str] = None, *,
               quoting: str = "auto", labels: bool = True, text_columns: Sequence[str] = ("text",),
               text_pair_column: Optional[str] = None) -> InputTexts:
    """Texts (and labels) from ``path``.

    ``.txt`` (or ``-`` for standard input): one text per line, blank lines skipped.
    ``.csv``/``.tsv``/``.jsonl``/``.json``/``.parquet``: the text column, named or found by the
    names training looks for; rows with a blank text (empty, whitespace or invisible characters
    only) are skipped and counted. With ``labels``, a label column, named or found as training
    finds it, gives each text its label (stripped of surrounding whitespace, as in training).
    .csv/.tsv are read by training's reader, with its ``quoting`` (``data.read_delimited``).
    ``text_columns`` are the checkpoint's (``checkpoint_text_columns``): two for a pair checkpoint, whose
    input is then a table with two text columns (found by those names, by training's pair names, or
    named with ``text_column`` and ``text_pair_column``).
    """
    takes_pairs = len(text_columns) == 2
    if text_pair_column and not takes_pairs:
        raise UserError("--text_pair_column: this checkpoint was trained on single texts, not pairs")
    if takes_pairs and (path == "-" or Path(path).suffix.lower() == ".txt"):
        raise UserError(f"this checkpoint classifies pairs of texts ({' + '.join(text_columns)}): give a table file "
                        f"(.csv, .tsv, .jsonl, .parquet) with two text columns, or two texts per pair with --pairs")
    if path == "-":
        return _text_lines(sys.stdin.read(), "standard input", text_column, label_column)
    p = Path(path)
    if not p.exists():
        raise UserError(f"input file not found: {path}")
    if p.is_dir():
        raise UserError(f"input file is a directory: {path}")
    suffix = p.suffix.lower()
    if suffix == ".txt":
        try:
            content = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read {path}: {_one_line(exc)}") from None
        return _text_lines(content, path, text_column, label_column)
    if suffix not in TABLE_FORMATS:
        raise UserError(f"unknown input format {p.suffix!r} for {path}: use .txt (one text per line), "
                        f".csv, .tsv, .jsonl/.json or .parquet")
    # training's names, reader and checks (imported here: training.data loads datasets)
    from encoderfit.data.columns import (
        LABEL_CANDIDATES,
        TEXT_CANDIDATES,
        check_distinct_columns,
        check_text_values,
        find_pair_columns,
        is_blank_text,
    )
    from encoderfit.data.labels import strip_labels

    columns, values_of, notes = _read_table(p, suffix, quoting)
    if not columns:
        raise UserError(f"no texts to classify in {path} (the file is empty)")
    trained = [c for c in text_columns if c in columns]  # the training data's names, where this table has them
    found = find_pair_columns(columns, text_column, None) if takes_pairs else None
    if takes_pairs and not text_column and len(trained) == 2:
        found = tuple(trained)
    col = text_column or (found[0] if found else trained[0] if trained and trained[0] == text_columns[0] else None)
    col = _find_column(columns, col, TEXT_CANDIDATES, "text", path)
    pair_col = None
    if takes_pairs:
        pair_col = text_pair_column or (found[1] if found and found[0] == col else None)
        if pair_col is None:
            raise UserError(f"this checkpoint classifies pairs of texts ({' + '.join(text_columns)}): name the second "
                            f"text column of {path} with --text_pair_column (columns: {', '.join(columns)})")
        pair_col = _find_column(columns, pair_col, (), "text pair", path)
    label_col = _find_column(columns, label_column, LABEL_CANDIDATES, "label", path, required=bool(label_column)) \
        if labels or label_column else None
    check_distinct_columns(col, pair_col, label_col, path, columns)
    raw = values_of(col)
    check_text_values(raw, col, path, columns)
    raw_pairs = values_of(pair_col) if pair_col else [""] * len(raw)
    if pair_col:
        check_text_values(raw_pairs, pair_col, path, columns, "text pair")
    raw_labels = values_of(label_col) if label_col is not None else [None] * len(raw)
    texts, pairs, kept_labels, skipped, invisible = [], [], [], 0, 0
    for value, second, label in zip(raw, raw_pairs, raw_labels):
        row = [v if isinstance(v, str) else (None if _is_missing(v) else str(v)) for v in (value, second)]
        present = row if pair_col else row[:1]
        if any(t is None or is_blank_text(t) for t in present):
            skipped += 1
            invisible += all(t is not None and bool(t.strip()) for t in present)
        else:
            texts.append(row[0])
            pairs.append(row[1])
            kept_labels.append(_label_name(label))
    if not texts:
        raise UserError(f"no texts to classify in {path}")
    if skipped:
        detail = f" ({invisible} of them only control, format or zero-width characters)" if invisible else ""
        notes.append(f"skipped {skipped} row(s) with an empty text in {path}{detail}")
    pairs = pairs if pair_col else None
    if label_col is None:
        return InputTexts(texts, notes=notes, pairs=pairs)
    present = [i for i, v in enumerate(kept_labels) if v is not None]
    stripped = strip_labels([kept_labels[i] for i in present], path, notes)
    for i, name in zip(present, stripped):
        kept_labels[i] = name
    return InputTexts(texts, kept_labels, label_col, bool(label_column), notes, pairs)


def _find_column(columns: list, wanted: Optional[str], candidates, what: str, path, required: bool = True):
    if wanted:
        if wanted not in columns:
            raise UserError(f"{what} column {wanted!r} not found in {path} (columns: {', '.join(columns) or 'none'})")
        return wanted
    lowered = {c.lower(): c for c in columns}
    found = next((lowered[c] for c in candidates if c in lowered), None)
    if found is None and required:
        raise UserError(f"no {what} column found in {path} (columns: {', '.join(columns) or 'none'}): "
                        f"name it with --{what}_column")
    return found


def _label_name(value) -> Optional[str]:
    """A label as a checkpoint names it: integer labels (2, 2.0) as their decimal string."""
    if _is_missing(value) or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _text_lines(content: str, where: str, text_column: Optional[str], label_column: Optional[str]) -> InputTexts:
    for flag, value in (("--text_column", text_column), ("--label_column", label_column)):
        if value:
            raise UserError(f"{flag} applies to table files (.csv, .tsv, .jsonl, .parquet), not to {where}")
    from encoderfit.data.columns import is_blank_text

    texts = _LINE_BREAK.split(content)
    if texts and texts[-1] == "":  # the line break that ends the last line
        texts.pop()
    kept = [t for t in texts if not is_blank_text(t)]
    if not kept:
        raise UserError(f"no texts to classify in {where}")
    skipped = len(texts) - len(kept)
    return InputTexts(kept, notes=[f"skipped {skipped} blank line(s) in {where}"] if skipped else [])


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _read_table(p: Path, suffix: str, quoting: str) -> tuple:
    """(column names, a function from a column name to its values, notes)."""
    if suffix in (".csv", ".tsv"):
        from encoderfit.data.reader import read_delimited

        table = read_delimited(p, quoting)
        return table.columns, table.column, list(table.notes)
    import pandas as pd  # a dependency of datasets

    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(p)
        else:
            with open(p, encoding="utf-8") as fh:
                head = fh.read(4096).lstrip()
            if not head:
                return [], None, []
            # .json may hold one array of objects; otherwise (and always for .jsonl) one object a line
            frame = pd.read_json(p, lines=not (suffix == ".json" and head.startswith("[")), dtype=False)
    except Exception as exc:
        raise UserError(f"cannot read {p} as {suffix[1:].upper()}: {_one_line(exc)}") from None
    return [str(c) for c in frame.columns], lambda name: frame[name].tolist(), []


def check_output_path(flag: str, value: Optional[str]) -> None:
    """Fail before any work where --FLAG cannot be written: a directory, or a path under a regular file."""
    if not value or value == "-":
        return
    path = Path(value)
    if path.is_dir():
        raise UserError(f"--{flag} is a directory: {value}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--{flag} {value}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"--{flag} {value}: cannot write in {parent} (permission denied)")
            return


# ---------------------------------------------------------------- command-line pieces

def add_inference_flags(parser: argparse.ArgumentParser, *, max_length_help: str) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="A fine-tuned checkpoint: a run's final/ directory (or the run directory).")
    parser.add_argument("--batch_size", type=int, default=64, help="Texts per forward pass.")
    parser.add_argument("--max_length", type=int, default=None, help=max_length_help)
    parser.add_argument("--long_texts", default=None, choices=("truncate", "head_tail", "windows"),
                        help="Texts longer than --max_length (default: as the checkpoint was trained): truncate, "
                             "head_tail (the first --head_tokens and the last that fit) or windows (overlapping "
                             "windows, their logits pooled per text).")
    parser.add_argument("--head_tokens", type=int, default=None,
                        help="head_tail: tokens kept from the start (default: the checkpoint's, else a quarter of "
                             "those that fit).")
    parser.add_argument("--stride", type=int, default=None,
                        help="windows: tokens neighbouring windows share (default: the checkpoint's, else a quarter).")
    parser.add_argument("--window_pooling", default=None, choices=("mean", "max"),
                        help="windows: mean or max of the windows' logits (default: the checkpoint's, else mean).")
    parser.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N,mps}",
                        help="auto: CUDA, then Apple MPS, then CPU.")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto: bf16 autocast on GPUs that run it natively, fp16 on older CUDA GPUs, else fp32.")
    parser.add_argument("--runtime", default="torch", choices=RUNTIMES,
                        help="torch: the PyTorch checkpoint; onnx / onnx-int8: its ONNX export (encoderfit export "
                             "--int8) in ONNX Runtime on the CPU.")


def check_positive(args, *names) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name} must be positive, got {value}")


def setup_device(args) -> tuple:
    """(device, autocast dtype or None) from --device, --precision and --runtime (ONNX: the CPU, in fp32)."""
    dev = args.device
    if not (dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise UserError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {dev!r}")
    runtime = getattr(args, "runtime", "torch")
    if runtime != "torch":
        return onnx_device(runtime, dev, args.precision)
    device = detect_device(dev)
    return device, autocast_dtype(device, args.precision)


def describe_runtime(runtime: str, amp_dtype) -> str:
    return {"onnx": "ONNX Runtime, fp32", "onnx-int8": "ONNX Runtime, int8 weights"}.get(
        runtime, f"{precision_name(amp_dtype)} autocast" if amp_dtype else "fp32")


def onnx_device(runtime: str, device: str, precision: str) -> tuple:
    """ONNX Runtime runs the export on the CPU as it was exported: a GPU or bf16 asked for is refused."""
    import torch

    if device not in ("auto", "cpu"):
        raise UserError(f"--runtime {runtime} runs on the CPU: leave --device out (or give --device cpu)")
    if precision in ("bf16", "fp16"):
        raise UserError(f"--runtime {runtime} runs the export as written (fp32, or int8 weights): leave --precision "
                        f"out")
    return torch.device("cpu"), None


def resolve_max_length(requested: Optional[int], clf: Classifier, fallback: Optional[int] = None) -> int:
    """--max_length if given (checked against the model's limit), else ``fallback``, else min(512, limit)."""
    if requested is not None:
        if requested > clf.max_positions:
            raise UserError(f"--max_length {requested} is more than this model takes ({clf.max_positions} tokens)")
        return requested
    return min(fallback or DEFAULT_MAX_LENGTH, clf.max_positions)


def resolve_long_texts(args, clf: Classifier, max_length: int) -> LongTexts:
    """The checkpoint's long-text setting with the tool's flags over it. Another --long_texts than the
    checkpoint's starts from that mode's defaults; a flag of another mode is an error, not ignored."""
    from dataclasses import replace

    recorded = clf.long_texts
    mode = args.long_texts or recorded.mode
    setting = recorded if mode == recorded.mode else LongTexts(mode)
    for flag, field_name, needs in (("head_tokens", "head_tokens", "head_tail"), ("stride", "stride", "windows"),
                                    ("window_pooling", "pooling", "windows")):
        value = getattr(args, flag)
        if value is None:
            continue
        if mode != needs:
            raise UserError(f"--{flag} applies to --long_texts {needs}; this run uses --long_texts {mode}"
                            + ("" if args.long_texts else " (the checkpoint's)"))
        setting = replace(setting, **{field_name: value})
    for flag, value, fits in (("stride", setting.stride, lambda v: 0 <= v < max_length // 2),
                              ("head_tokens", setting.head_tokens, lambda v: 0 <= v < max_length)):
        if getattr(args, flag) is None and value is not None and not fits(value):  # the checkpoint's, not a flag
            raise UserError(f"the checkpoint was trained with --{flag} {value}, which does not fit --max_length "
                            f"{max_length}: pass a --{flag} that does (below "
                            f"{max_length // 2 if flag == 'stride' else max_length}), or a longer --max_length")
    setting.check(max_length)
    return setting


def logits_with_progress(clf, texts: list, *, desc: str, batch_size: int, max_length: int, amp_dtype,
                         pairs: Optional[list] = None, long_texts: Optional[LongTexts] = None):
    """``predict_logits`` with a progress bar on a terminal; returns (logits, seconds)."""
    bar = progress_bar(len(texts), desc)
    t0 = time.perf_counter()
    logits = predict_logits(clf, texts, batch_size=batch_size, max_length=max_length, amp_dtype=amp_dtype,
                            on_batch=bar.update if bar else None, pairs=pairs, long_texts=long_texts)
    if bar:
        bar.close()
    return logits, time.perf_counter() - t0


