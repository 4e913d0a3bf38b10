"""The typed training config: the single source of truth for every flag.

Each field's ``help`` metadata becomes its ``--help`` text. The config is parsed
and validated once and never mutated; values derived at run time (world size,
global batch, ...) get their own names elsewhere.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from pathlib import Path
from dataclasses import dataclass, field
from typing import Optional, Union, get_type_hints

from encoderfit.modeling.long_texts import LongTexts
from encoderfit.utils import HelpFormatter, ToolParser, UserError

DEFAULT_MODEL = "default"


def _f(default, help: str, *, data: bool = False, cache: bool = False, must_match: bool = False, **extra):
    """A config field. ``data``: it says which examples a run sees (the tools take it too); ``cache``:
    the tokenized cache depends on it (data flags always do); ``must_match``: a resume needs it unchanged."""
    return field(default=default, metadata={"help": help, "data": data, "cache": cache or data,
                                            "must_match": must_match, **extra})


@dataclass(frozen=True)
class TrainConfig:
    # --- data ---
    dataset: Optional[str] = _f(None, "Hugging Face dataset name (needs network access). "
                                "Default: the bundled Rotten Tomatoes snippets (offline).", data=True, must_match=True)
    dataset_config: Optional[str] = _f(None, "Configuration name of --dataset, if it has several.", data=True, must_match=True)
    train_split: Optional[str] = _f(None, "--dataset's split to train on (default: train).", data=True,
                                    must_match=True)
    validation_split: Optional[str] = _f(None, "--dataset's split to validate on (default: validation, else valid, "
                                         "dev or test, said in a note; none of them, or 'none': a split of the "
                                         "training data is held out).", data=True, must_match=True)
    test_split: Optional[str] = _f(None, "--dataset's split to score best/ on once when the run ends, as "
                                   "--test_file does.")
    train_file: Optional[str] = _f(None, "Local training file: .csv, .tsv, .jsonl/.json or .parquet.", data=True, must_match=True)
    validation_file: Optional[str] = _f(None, "Local validation file (same formats). Without it, a seeded "
                                        "stratified split of the training data is held out.", data=True, must_match=True)
    test_file: Optional[str] = _f(None, "Labelled test file (same formats and columns as the training data): when "
                                  "the run ends, best/ is scored on it once, apart from model selection, into "
                                  "summary.json (test_metrics).")
    text_column: Optional[str] = _f(None, "Text column (auto-detected: text, sentence, review, content, ...).", data=True, must_match=True)
    text_pair_column: Optional[str] = _f(None, "Second text column of a pair task (entailment, paraphrase, "
                                         "relevance): the two texts are tokenized as a pair. Auto-detected from "
                                         "column pairs: sentence1/sentence2, question/sentence, premise/hypothesis, "
                                         "text_a/text_b, question1/question2, text1/text2, query/passage, question/passage, ... "
                                         "'none' turns the detection off.", data=True, must_match=True)
    label_column: Optional[str] = _f(None, "Label column (auto-detected: label, labels, category, class, ...). "
                                     "Integer or string class labels, or numbers for a regression.",
                                     data=True, must_match=True)
    label_separator: Optional[str] = _f(None, "Several labels per example in one text column, split at this "
                                        "string ('a|b'): a multi-label task.", data=True, must_match=True)
    label_columns: Optional[str] = _f(None, "Several labels per example as 0/1 columns, named with commas "
                                      "(toxic,obscene,insult): a multi-label task whose labels are those columns.",
                                      data=True, must_match=True)
    task: str = _f("auto", "single_label: one class per example (cross-entropy); multi_label: any number of "
                   "labels per example (a sigmoid each, binary cross-entropy; micro/macro-F1, subset accuracy); "
                   "regression: one score per example (MSE loss; Pearson, Spearman, MSE, MAE). 'auto': "
                   "multi_label for a label column of lists (JSON Lines, Parquet), --label_separator or "
                   "--label_columns; regression when the labels are numbers with fractions (0.4, 3.8); else "
                   "single_label. Integer scores (ratings 1-5) need --task regression.",
                   cache=True, must_match=True, choices=("auto", "single_label", "multi_label", "regression"))
    threshold: Union[float, str] = _f(0.5, "Multi-label: a label is predicted where its probability reaches "
                                      "this, or 'tune': at each evaluation the one threshold (for every label) "
                                      "of 0.01-0.99 that maximizes validation micro-F1, or 'per_label': then each "
                                      "label with at least 20 validation positives gets the threshold that "
                                      "maximizes its own F1 (the others keep the tuned one). Recorded in the "
                                      "checkpoint for encoderfit predict and evaluate.", must_match=True)
    quoting: str = _f("auto", "Quoting of .csv/.tsv files. 'minimal': standard CSV quoting (a quoted field may hold "
                      "delimiters and line breaks); 'none': quotes are ordinary characters, one row per line; "
                      "'auto': standard quoting, but a file it cannot read while every line has the header's "
                      "field count with plain quotes is read as 'none' (with a note), and a quoted field that "
                      "would swallow such lines is an error naming the line.",
                      data=True, must_match=True, choices=("auto", "minimal", "none"))
    validation_fraction: float = _f(0.1, "Fraction held out for validation when no validation split exists.", data=True, must_match=True)
    split_seed: int = _f(42, "Seed of the train/validation split (kept apart from --seed so runs with "
                         "different seeds are validated on the same examples).", data=True, must_match=True)
    num_samples: Optional[int] = _f(None, "Use only N training examples and at most N validation examples "
                                    "(a seeded random subset), for quick tests.", data=True, must_match=True)
    max_length: int = _f(128, "Tokens per model input; longer texts are handled as --long_texts says.",
                         cache=True, must_match=True)
    long_texts: str = _f("auto", "Texts longer than --max_length: 'head_tail' keeps their first --head_tokens "
                         "and the last that fit (as cheap as 'truncate', and more accurate on long texts: "
                         "README); 'truncate' keeps their first tokens (a pair loses tokens from its longer "
                         "text first); 'windows' reads all of them in overlapping windows of --max_length "
                         "tokens, each trained with the text's label, and pools the windows' logits per text "
                         "to evaluate and predict. head_tail and windows keep a pair's first text whole and cut "
                         "or window the second. 'auto': head_tail for single texts, truncate for pairs. "
                         "Recorded in the checkpoint for encoderfit predict and evaluate.",
                         cache=True, must_match=True, choices=("auto", "truncate", "head_tail", "windows"))
    head_tokens: Optional[int] = _f(None, "--long_texts head_tail: tokens kept from the start of a long text "
                                    "(default: a quarter of the text tokens kept, 31 of --max_length 128 "
                                    "with two special tokens; of a pair's second text, a quarter of what it "
                                    "keeps); the rest come from its end.",
                                    cache=True, must_match=True)
    stride: Optional[int] = _f(None, "--long_texts windows: tokens two neighbouring windows share (default: a "
                               "quarter of --max_length).", cache=True, must_match=True)
    window_pooling: Optional[str] = _f(None, "--long_texts windows: how a text's window logits become its logits "
                                       "at evaluation and prediction: mean (default) or max.",
                                       must_match=True, choices=("mean", "max"))
    cache_dir: Optional[str] = _f(None, "Where tokenized datasets are cached (default: CHECKPOINT_DIR/cache).")
    # --- model ---
    model: str = _f(DEFAULT_MODEL, "Hugging Face model name or local directory (default: 'default', the "
                    "bundled all-MiniLM-L6-v2, offline).", must_match=True)
    # --- optimisation ---
    epochs: int = _f(3, "Number of training epochs.", must_match=True)
    batch_size: int = _f(32, "Training batch size per process (under DDP the global batch is "
                         "batch_size x world size x grad_accum_steps).", must_match=True)
    eval_batch_size: Optional[int] = _f(None, "Evaluation batch size per process (default: 2 x batch_size).")
    learning_rate: float = _f(2e-5, "Peak learning rate of AdamW.", must_match=True)
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases and LayerNorm weights).", must_match=True)
    warmup_ratio: float = _f(0.06, "Fraction of optimizer steps spent in linear warmup; linear decay to 0 after.", must_match=True)
    max_grad_norm: float = _f(1.0, "Clip gradients to this global L2 norm (0 disables clipping).", must_match=True)
    grad_accum_steps: int = _f(1, "Accumulate gradients over this many micro-batches per optimizer step.", must_match=True)
    seed: int = _f(42, "Random seed (model head init, data order, dropout).", must_match=True)
    # --- device and speed ---
    device: str = _f("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.",
                     choices=("auto", "cpu", "cuda", "mps"))
    precision: str = _f("auto", "auto (bf16 autocast on GPUs that run bf16 natively, fp16 with loss scaling on older "
                        "CUDA GPUs such as T4 and V100, else fp32), bf16, fp16 or fp32. fp16 scales the loss "
                        "dynamically and skips a step whose gradients overflow, without a host sync.",
                        choices=("auto", "bf16", "fp16", "fp32"))
    cuda_graphs: str = _f("auto", "Record each training step (forward, backward, clipping, AdamW) once per batch "
                          "shape as a CUDA graph and replay it: lengths are padded to multiples of 32 so there are "
                          "few shapes; under torchrun the gradient all-reduce is recorded with the step. 'auto': on with "
                          "CUDA, without --grad_accum_steps or --skip_nonfinite; 'on' fails where it cannot serve.",
                          choices=("auto", "on", "off"))
    compile: str = _f("auto", "torch.compile the encoder's repeated layer once and run every layer with it (regional: "
                      "13 s for BERT-base on an H100, under a second when the compiled code is cached in "
                      "--cache_dir/compile); 'whole' compiles the whole model as one graph (minutes). 'auto': on for "
                      "CUDA runs of at least 20 million training tokens a process (epochs x examples x mean length, "
                      "over the processes under torchrun), where "
                      "the compile pays back; else off.",
                      choices=("auto", "on", "whole", "off"))
    unpadded: str = _f("off", "Train on unpadded batches: each batch's real tokens end to end in one row, attention "
                       "by variable-length flash attention, so no pad token reaches a kernel (but a short tail that "
                       "keeps the shapes few). Off by default: on an H200 it was no faster than length-grouped "
                       "padded batches (BENCHMARKS.md); it pays where batches would carry much padding "
                       "(--no_group_by_length). 'auto': on where it can run (a CUDA GPU of compute capability 8.0 or "
                       "newer, bf16, a BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA or DistilBERT encoder with a "
                       "head size of at most 256, a multiple of 8), else padded batches, and the run says why; "
                       "'on' fails where it cannot run. Evaluation stays padded.",
                       choices=("auto", "on", "off"))
    no_group_by_length: bool = _f(False, "Shuffle without grouping texts of similar length into batches "
                                  "(grouping cuts padding; batches stay shuffled).", must_match=True)
    num_workers: Optional[int] = _f(None, "DataLoader worker processes (default: 0 on CPU, 2 on GPU).")
    # --- output ---
    checkpoint_dir: str = _f("checkpoints/", "Directory under which each run gets its own directory.")
    run_name: Optional[str] = _f(None, "Name of this run's directory (default: a timestamp).")
    save_every_steps: int = _f(0, "Also save a resumable checkpoint every N optimizer steps (0: only at epoch "
                               "ends). Checkpoints go to RUN/checkpoints/step-N.")
    keep_checkpoints: int = _f(2, "Keep the newest N step checkpoints (older ones are deleted).")
    resume: Optional[str] = _f(None, "'auto' (the newest usable checkpoint of --run_name, or of the newest run; "
                               "a fresh start if there is none) or a checkpoint or run directory. Continues at "
                               "the exact next batch.")
    skip_nonfinite: bool = _f(False, "Skip optimizer steps whose loss is NaN or infinite (counted and reported) "
                              "instead of stopping. Costs a host sync per step.")
    class_weights: Optional[str] = _f(None, "Weigh each class's examples in the loss: 'balanced', or one weight "
                                      "per label in the order the run prints its labels (1,3) or by name "
                                      "(neg=1,pos=3; unnamed labels weigh 1). Single-label: class weights of "
                                      "the cross-entropy ('balanced': n_examples / (n_classes x n_class), as "
                                      "scikit-learn); the loss and val loss are then the weighted mean. "
                                      "Multi-label: pos_weight, the factor on each label's positive term "
                                      "('balanced': negatives / positives of the label).", must_match=True)
    metric_for_best: Optional[str] = _f(None, "Validation metric that picks the best checkpoint (saved as RUN/best). "
                                        "Default: accuracy (single-label), micro_f1 (multi-label), mse "
                                        "(regression).",
                                        choices=("accuracy", "macro_f1", "loss", "micro_f1", "subset_accuracy",
                                                 "pearson", "spearman", "mse", "mae"), must_match=True)
    early_stopping_patience: int = _f(0, "Stop after this many epochs without a better --metric_for_best "
                                      "(0: never stop early).")
    report_to: Optional[str] = _f(None, "Send the step and epoch metrics, the config and the final metrics to "
                                  "trackers: tensorboard, mlflow, wandb, several comma-separated (or none). The "
                                  "main process alone reports; MLflow and W&B take their usual environment "
                                  "variables (MLFLOW_TRACKING_URI, WANDB_PROJECT, WANDB_MODE=offline).")
    tensorboard: bool = _f(False, "Write TensorBoard event files to RUN/tensorboard (as --report_to tensorboard).")
    push_to_hub: Optional[str] = _f(None, "Upload RUN/final with its model card to this Hugging Face Hub repository "
                                    "(user/name) when the run ends (the main process alone). The login is checked "
                                    "before training starts (hf auth login, or HF_TOKEN).")
    hub_private: bool = _f(False, "Create the --push_to_hub repository as private.")
    log_every: int = _f(50, "Update the progress bar and step metrics every N optimizer steps.")
    no_progress: bool = _f(False, "Turn off the progress bar (on a terminal) and the plain progress lines that "
                                  "replace it in a log file.")

    @property
    def trackers(self) -> tuple:
        """The trackers to report to: --report_to's, and TensorBoard with --tensorboard."""
        from encoderfit.run.tracking import parse_report_to

        return parse_report_to(self.report_to, self.tensorboard)

    def __post_init__(self) -> None:
        """Each value checked (and a whole number given for a decimal one made a float) when the config is
        built, from flags or in Python alike: bad input is a UserError with the flag's one-line message."""
        _check_types(self)
        _validate(self)

    def replace(self, **settings) -> "TrainConfig":
        """A copy with ``settings`` changed (checked as a new config is), by flag name."""
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise UserError(f"unknown setting(s) {', '.join(unknown)} (see encoderfit train --help)")
        return dataclasses.replace(self, **settings)

    @classmethod
    def from_settings(cls, **settings) -> "TrainConfig":
        """A config from keyword settings named as the flags (the rest at their defaults)."""
        return cls().replace(**settings)

    @property
    def effective_eval_batch_size(self) -> int:
        return self.eval_batch_size or 2 * self.batch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def values_marked(self, mark: str) -> dict:
        """The fields whose metadata has ``mark`` set ("data", "cache", "must_match"), with their values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get(mark)}


def fields_marked(mark: str) -> tuple:
    """Names of the fields whose metadata has ``mark`` set: the lists are generated, not kept by hand."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get(mark))


SEED_RANGE = (0, 2 ** 32 - 1)  # what NumPy's seeding takes


def _check_types(cfg: TrainConfig) -> None:
    """Each field's value of the flag's type (``None`` where the default is None); paths may be ``PathLike``."""
    import os

    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None and f.default is None:
            continue
        typ = flag_type(f.name)
        if f.name == "threshold":
            if value in TUNED or (isinstance(value, (int, float)) and not isinstance(value, bool)):
                object.__setattr__(cfg, f.name, value if value in TUNED else float(value))
                continue
            raise UserError(f"--threshold must be a number in (0, 1), 'tune' or 'per_label', got {value!r}")
        if typ is str and isinstance(value, os.PathLike):
            object.__setattr__(cfg, f.name, os.fspath(value))
        elif typ is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            object.__setattr__(cfg, f.name, int(value))  # numpy's integers too
        elif typ is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
            object.__setattr__(cfg, f.name, float(value))
        elif not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise UserError(f"--{f.name} must be {_TYPE_WORDS.get(typ, typ.__name__)}, got {value!r}")
        choices = f.metadata.get("choices")
        if choices and f.name != "device" and getattr(cfg, f.name) not in choices:  # device: cuda:N too
            raise UserError(f"--{f.name} must be one of {', '.join(choices)}, got {value!r}")


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "True or False"}


def _validate(cfg: TrainConfig) -> None:
    for f in dataclasses.fields(cfg):  # nan or inf passes every comparison below: refuse it first
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{f.name} must be a finite number, got {value}")
    for flag in ("train_split", "validation_split", "test_split"):
        if getattr(cfg, flag) is not None and not cfg.dataset:
            raise UserError(f"--{flag} names a split of --dataset: give --dataset (files have --train_file, "
                            f"--validation_file and --test_file)")
    if cfg.test_split is not None and cfg.test_file is not None:
        raise UserError("give --test_file or --test_split, not both")
    if cfg.test_split is not None and cfg.test_split in (cfg.train_split or "train", cfg.validation_split):
        raise UserError(f"--test_split {cfg.test_split} is the split the run trains or validates on: a test set is "
                        f"held out from both")
    if cfg.report_to is not None:
        from encoderfit.run.tracking import parse_report_to

        parse_report_to(cfg.report_to)
    if cfg.push_to_hub is not None:
        from encoderfit.serve.hub import check_repo_id

        check_repo_id(cfg.push_to_hub)
    positive = ["epochs", "batch_size", "learning_rate", "max_length", "grad_accum_steps", "log_every"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ["eval_batch_size", "num_samples"]:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name} must be positive, got {value}")
    if cfg.save_every_steps < 0 or cfg.keep_checkpoints < 1:
        raise UserError("--save_every_steps must not be negative and --keep_checkpoints must be at least 1")
    if cfg.early_stopping_patience < 0:
        raise UserError(f"--early_stopping_patience must not be negative, got {cfg.early_stopping_patience}")
    if cfg.weight_decay < 0 or cfg.max_grad_norm < 0:
        raise UserError("--weight_decay and --max_grad_norm must not be negative")
    if not 0 <= cfg.warmup_ratio < 1:
        raise UserError(f"--warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if not 0 < cfg.validation_fraction < 1:
        raise UserError(f"--validation_fraction must be in (0, 1), got {cfg.validation_fraction}")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise UserError(f"--num_workers must not be negative, got {cfg.num_workers}")
    if cfg.dataset and cfg.train_file:
        raise UserError("give either --dataset or --train_file, not both")
    if cfg.validation_file and not cfg.train_file:
        raise UserError("--validation_file needs --train_file")
    if not SEED_RANGE[0] <= cfg.seed <= SEED_RANGE[1] or not SEED_RANGE[0] <= cfg.split_seed <= SEED_RANGE[1]:
        raise UserError(f"--seed and --split_seed must be integers from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got "
                        f"{cfg.seed} and {cfg.split_seed}")
    if cfg.run_name is not None:
        name = Path(cfg.run_name)
        if not cfg.run_name.strip() or name.is_absolute() or len(name.parts) != 1 or name.name in (".", ".."):
            raise UserError(f"--run_name must be a plain directory name inside --checkpoint_dir, got {cfg.run_name!r}")
    dev = cfg.device
    if not (dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise UserError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {dev!r}")
    if cfg.class_weights is not None and cfg.task == "regression":
        raise UserError("--class_weights weigh classes: a regression (--task regression) has none")
    if cfg.threshold not in TUNED and not 0 < cfg.threshold < 1:
        raise UserError(f"--threshold must be in (0, 1), 'tune' or 'per_label', got {cfg.threshold}")
    if cfg.label_separator is not None and cfg.label_columns is not None:
        raise UserError("give --label_separator (labels in one column) or --label_columns (one 0/1 column per "
                        "label), not both")
    for flag, mode in (("head_tokens", "head_tail"), ("stride", "windows"), ("window_pooling", "windows")):
        if getattr(cfg, flag) is not None and cfg.long_texts != mode:
            why = (" (auto is head_tail for single texts but truncate for pairs, so it is not enough)"
                   if cfg.long_texts == "auto" else "")
            raise UserError(f"--{flag} applies to --long_texts {mode}, not --long_texts {cfg.long_texts}{why}: "
                            f"pass --long_texts {mode}")
    LongTexts.from_config(cfg).check(cfg.max_length)
    if cfg.label_separator == "":
        raise UserError("--label_separator must not be empty")
    if cfg.label_columns is not None and not cfg.label_columns.strip(" ,"):
        raise UserError("--label_columns must name the 0/1 columns, separated by commas (toxic,obscene)")
    if cfg.label_columns is not None and cfg.label_column is not None:
        raise UserError("give --label_column (one column of labels) or --label_columns (one 0/1 column per label), "
                        "not both")
    if (cfg.label_separator or cfg.label_columns) and cfg.task in ("single_label", "regression"):
        raise UserError(f"--label_separator and --label_columns give several labels per example: a multi-label "
                        f"task, not --task {cfg.task}")


TUNED = ("tune", "per_label")  # --threshold chosen on validation: one for every label, or one per label


def _threshold(value: str):
    if value in TUNED:
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number in (0, 1), 'tune' or 'per_label', got {value!r}") from None


def flag_type(name: str) -> type:
    """The type a field's flag parses to (``Optional[X]`` -> ``X``)."""
    typ = get_type_hints(TrainConfig)[name]
    if getattr(typ, "__origin__", None) is not None:
        typ = next(a for a in typ.__args__ if a is not type(None))
    return typ


def flag_value(name: str, text: str):
    """A flag's value from its text, as the command line reads it (a sweep's trial values)."""
    typ = flag_type(name)
    if name == "threshold":
        return _threshold(text)
    try:
        return typ(text)
    except ValueError:
        raise UserError(f"argument --{name}: invalid {typ.__name__} value: {text!r}") from None


def build_parser(description: str = "") -> argparse.ArgumentParser:
    # argparse's own errors become one "error: ..." line (a UserError), like every other bad input
    parser = ToolParser(description=description, formatter_class=HelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        help_text = f.metadata["help"]
        typ = flag_type(f.name)
        if typ is bool:
            parser.add_argument(f"--{f.name}", action="store_true", help=help_text)
            continue
        kwargs = {"type": typ, "default": f.default, "help": help_text}
        if f.name == "device":  # cuda:N is allowed too, so validate by hand
            kwargs["metavar"] = "{auto,cpu,cuda,cuda:N,mps}"
        elif "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if f.name == "threshold":
            kwargs["type"], kwargs["metavar"] = _threshold, "{0..1,tune,per_label}"
        if f.name == "metric_for_best":  # "f1", its earlier name, still accepted
            kwargs["type"] = lambda value: "macro_f1" if value == "f1" else value
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


# where a run writes and whether it continues one are the command's own, never a config file's
NOT_FROM_FILE = ("run_name", "resume")


def config_file_flags(path: str) -> list:
    """A config file (JSON: flag names and values, or a run's own config.json) as the flags it stands for."""
    import json

    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"--config {path}: not a readable JSON file ({' '.join(str(exc).split())[:120]})") from None
    if isinstance(values, dict) and isinstance(values.get("config"), dict):
        values = values["config"]  # a run's config.json: the resolved config is under "config"
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a JSON object of flag names and values")
    if "model_type" in values or "architectures" in values:  # RUN/final/config.json: the model's, not the run's
        run_config = Path(path).parent.parent / "config.json"
        hint = f" such as {run_config}" if run_config.is_file() else " (RUN/config.json)"
        raise UserError(f"--config {path} is a model's config.json (transformers' settings): give the run's "
                        f"config.json{hint}, or a JSON file of flag names and values")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"--config {path}: unknown setting(s) {', '.join(unknown)}")
    flags = []
    for name, value in values.items():
        is_switch = flag_type(name) is bool
        if is_switch != isinstance(value, bool) and value is not None:  # JSON's true/false for a switch alone
            kind = _TYPE_WORDS.get(flag_type(name), "a value")
            want = "true or false" if is_switch else f"{kind}, not {json.dumps(value)}"
            raise UserError(f"--config {path}: {name} must be {want}" + (f", got {json.dumps(value)}" if is_switch
                                                                          else ""))
        if name in NOT_FROM_FILE or value is None or value is False:
            continue
        if isinstance(value, (list, dict)):
            raise UserError(f"--config {path}: {name} must be a single value, got {json.dumps(value)}")
        flags += [f"--{name}"] if value is True else [f"--{name}={value}"]  # = : a value may start with -
    return flags


def parse_config(argv=None, description: str = "") -> TrainConfig:
    """Parse and validate command-line flags into a frozen TrainConfig (UserError on bad values).

    ``--config FILE`` gives values first; flags on the command line override them."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(description)
    parser.add_argument("--config", metavar="FILE.json",
                        help="Take the settings from a JSON file of flag names and values, or a run's own "
                             "config.json (RUN/config.json), to re-run it; flags given here override the file's. "
                             f"{' and '.join('--' + n for n in NOT_FROM_FILE)} are not read from it.")
    known, _ = parser.parse_known_args(argv)
    if known.config:
        file_flags = config_file_flags(known.config)
        try:
            parser.parse_args(file_flags)
        except UserError as exc:
            raise UserError(f"--config {known.config}: {exc}".replace(" (see --help)", "")) from None
        argv = file_flags + argv
    args = vars(parser.parse_args(argv))
    args.pop("config")
    return TrainConfig(**args)  # checked as it is built
