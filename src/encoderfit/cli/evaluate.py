"""Evaluate a fine-tuned checkpoint on its run's validation split, or on a labelled file (a test set).

    python training/evaluate.py --checkpoint checkpoints/RUN/final      # the run's own validation split
    python training/evaluate.py --checkpoint checkpoints/RUN/final --output eval.json --plot cm.png
    python training/evaluate.py --checkpoint checkpoints/RUN/final --validation_file test.csv    # or --data test.csv
    python training/evaluate.py --checkpoint checkpoints/RUN/final --train_file train.csv --label_column stars

With no data flag, the data flags the checkpoint's run recorded are used (its config.json), so the
split is the one that run validated on; a flag given here replaces the recorded one. A checkpoint
with no run beside it is evaluated on the default dataset. The data flags are training's, and the
validation split is made the same way: the same source, --validation_fraction, --split_seed and
--num_samples hold out the same examples. With --validation_file (alone, or --data FILE, or
beside --train_file), every row of that file is evaluated. Label names of the data are matched to the checkpoint's; labels it does
not know are an error. Prints accuracy, macro-F1, a per-class table (precision, recall,
F1, support) and the confusion matrix; --output writes them as JSON, --plot draws the
confusion matrix (each label's F1 for multi-label, predicted against true for a regression) as a PNG. --max_length defaults to the one the checkpoint was trained with.

A checkpoint trained on text pairs reads the two text columns it was trained on (or those
named with --text_column and --text_pair_column). A regression checkpoint is scored by
Pearson's and Spearman's correlations, MSE and MAE.
"""
import sys
from pathlib import Path


import argparse
import dataclasses
from typing import Optional

# numpy, torch, datasets and the model load inside the functions: --help and bad flags answer at once
from encoderfit.serve import inference
from encoderfit.utils import UserError, atomic_write_json, run_tool


def _data_fields() -> list:
    """Training's data flags (the config fields marked ``data``), with training's types, defaults and help."""
    from encoderfit.config import TrainConfig, fields_marked, flag_type

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    return [(name, flag_type(name), fields[name].default, fields[name].metadata["help"],
             fields[name].metadata.get("choices")) for name in fields_marked("data")]


def build_parser() -> inference.ToolParser:
    parser = inference.ToolParser(description=__doc__.split("\n\n")[0],
                                  formatter_class=inference.HelpFormatter)
    for name, typ, default, help_text, choices in _data_fields():
        if name == "validation_file":
            help_text = ("Labelled file to evaluate, every row of it: alone, or with the --train_file of the "
                         "run (same formats as training).")
        elif default is not None:
            help_text += f" Default: the checkpoint's run's, else {default}."
        # None: not given, so the run's recorded value (or training's default) applies (fill_data_defaults)
        parser.add_argument(f"--{name}", type=typ, default=None, help=help_text,
                            **({"choices": choices} if choices else {}))
    parser.add_argument("--data", metavar="FILE", help="Another name for --validation_file.")
    inference.add_inference_flags(
        parser, max_length_help="Tokens per model input, longer texts as --long_texts says (default: the --max_length the checkpoint "
                                "was trained with if its run recorded it, else 512 or the model's limit).")
    parser.add_argument("--output", metavar="FILE.json", help="Write the metrics as JSON here.")
    parser.add_argument("--plot", metavar="FILE.png", help="Draw a PNG here: the confusion matrix (single-label), "
                        "each label's F1 with its support (multi-label), or predicted against true scores "
                        "(regression).")
    return parser


SOURCE_FLAGS = ("train_file", "validation_file", "dataset", "data")


def fill_data_defaults(args) -> None:
    """Training's default for each data flag not given (None); those given, or taken from a run, stay."""
    for name, _, default, _, _ in _data_fields():
        if getattr(args, name, None) is None:
            setattr(args, name, default)


def follow_run(args, ckpt: Path) -> Optional[list]:
    """With no source flag given (--train_file, --validation_file or --data, --dataset), take the data flags
    the checkpoint's run recorded (each flag given here stays), so the data is the run's own validation split;
    returns the flags given here that differ from the run's (empty: the run's split exactly), or None where no
    run is recorded beside the checkpoint (or a source was given).
    A run that trained on data handed to fit() in memory, or on a file no longer there, is refused by name."""
    if any(getattr(args, name, None) for name in SOURCE_FLAGS):
        return None
    recorded = (inference.run_record(ckpt) or {}).get("config")
    if not isinstance(recorded, dict):
        return None
    run = inference.run_directory(ckpt)
    if (inference.run_record(ckpt, "data.json") or {}).get("source") == "the training data given to fit()":
        raise UserError(f"the run {run} trained on data handed to fit() in memory, which it cannot read again: "
                        f"pass the data to evaluate (--validation_file FILE, or evaluate(checkpoint, dataframe))")
    for name in ("train_file", "validation_file"):
        value = recorded.get(name)
        if value and not Path(value).is_file():
            raise UserError(f"the run {run} trained with --{name} {value}, which is not there now (run from another "
                            f"directory, or moved?): give the data with --train_file or --validation_file")
    changed = []
    for name, _, _, _, _ in _data_fields():
        if getattr(args, name, None) is None:
            setattr(args, name, recorded.get(name))
        elif getattr(args, name) != recorded.get(name):
            changed.append(f"--{name}")
    return changed


def _check(args) -> None:
    inference.check_positive(args, "batch_size", "max_length", "num_samples")
    if args.validation_fraction is not None and not 0 < args.validation_fraction < 1:
        raise UserError(f"--validation_fraction must be in (0, 1), got {args.validation_fraction}")
    from encoderfit.config import SEED_RANGE

    if args.split_seed is not None and not SEED_RANGE[0] <= args.split_seed <= SEED_RANGE[1]:  # numpy's seeding would fail with a traceback
        raise UserError(f"--split_seed must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got "
                        f"{args.split_seed}")
    if args.data:
        if args.validation_file and args.validation_file != args.data:
            raise UserError("--data is another name for --validation_file: give one of them")
        args.validation_file = args.data
    if args.dataset and args.train_file:
        raise UserError("give either --dataset or --train_file, not both")
    if args.dataset and args.validation_file:
        raise UserError("give either --dataset or --validation_file, not both")
    for flag in ("output", "plot"):  # before any work, as every check here
        inference.check_output_path(flag, getattr(args, flag))
    if args.plot and Path(args.plot).suffix.lower() != ".png":
        raise UserError(f"--plot writes a PNG: give a file name ending in .png, got {args.plot}")


def load_validation(args, shape=None, text_columns: Optional[list] = None):
    """The validation split (``data.LabelledFile``: texts, second texts of pairs, label names or targets,
    split info), made as training makes it, or every row of --validation_file when it comes without
    --train_file. ``text_columns`` are the checkpoint's (where it recorded them): a single-text checkpoint
    reads one text even where the data has pair columns. ``shape``: the checkpoint's task class (default:
    single-label)."""
    import datasets

    from encoderfit.tasks.single_label import SingleLabelClassification

    from encoderfit.data.columns import NO_PAIR, column
    from encoderfit.data.sources import DataSource
    from encoderfit.data.splits import ColumnChoice, LabelledFile, load_labelled_file, load_labelled_splits

    shape = shape or SingleLabelClassification

    fill_data_defaults(args)
    datasets.disable_progress_bars()
    if getattr(args, "data", None) and not args.validation_file:
        args.validation_file = args.data
    text_column, pair_column = args.text_column, getattr(args, "text_pair_column", None)
    pair_model = bool(text_columns) and len(text_columns) == 2
    if not pair_column:
        if pair_model and not text_column:  # the columns a pair model was trained on
            text_column, pair_column = text_columns
        elif not pair_model:  # a single-text model (or one from before pairs, which recorded none): one text
            pair_column = NO_PAIR
    if args.validation_file and not args.train_file:
        columns = ColumnChoice(text_column, pair_column, args.label_column, args.label_separator, args.label_columns)
        return load_labelled_file(args.validation_file, shape, columns=columns, quoting=args.quoting,
                                  subset=(args.num_samples, args.split_seed))
    source = DataSource.from_settings(args, text_column=text_column, text_pair_column=pair_column)
    splits = load_labelled_splits(source, validation_fraction=args.validation_fraction, split_seed=args.split_seed,
                                  num_samples=args.num_samples, task=shape.name)
    val = splits.validation
    pairs = column(val, "text_pair") if "text_pair" in val.column_names else None
    labels = shape.from_encoded(column(val, "labels"), [str(n) for n in splits.label_names])
    return LabelledFile(column(val, "text"), pairs, labels, splits.info)


def validation_sha256(texts: list, pairs: Optional[list] = None) -> str:
    """The fingerprint training records for its held-out examples (data.json's validation_sha256)."""
    from encoderfit import data

    return data.validation_sha256(data.example_keys(texts, pairs))


def _training_split_sha(ckpt: Path):
    return (inference.run_record(ckpt, "data.json") or {}).get("validation_sha256")


def run(args) -> int:
    _check(args)
    record, cm = evaluate_checkpoint(args, say=lambda line: print(line, flush=True))
    written = []
    if args.output:
        written.append(_write(args.output, lambda p: atomic_write_json(p, record)))
    if args.plot:
        from encoderfit.cli.plot import plot_evaluation

        name = _checkpoint_name(Path(record["checkpoint"]))
        written.append(_write(args.plot, lambda p: plot_evaluation(record, cm, p, name)))
    if written:
        print()
        for path in written:
            print(f"wrote {path}")
    return 0


def evaluation_data(args, say=print) -> tuple:
    """(the checkpoint directory, the labelled data to score it on, what ``follow_run`` returned): the data the
    flags name, or with no source flag the checkpoint's run's own validation split; the labels read as the
    checkpoint's training read them where the data allows."""
    ckpt = inference.resolve_checkpoint(args.checkpoint)  # fail fast, before the data is read
    from encoderfit.tasks.registry import task_class_for_problem_type

    followed = follow_run(args, ckpt)
    for flag in ("train_split", "validation_split"):
        if getattr(args, flag, None) and not args.dataset:
            raise UserError(f"--{flag} names a split of --dataset, and this data is not a --dataset: give "
                            f"--validation_file FILE to evaluate other data")
    shape = task_class_for_problem_type(inference.checkpoint_problem_type(ckpt))
    recorded = inference.checkpoint_label_format(ckpt)
    taken = {}
    if recorded and not (args.label_separator or args.label_columns):  # the labels as training read them,
        # unless the data says otherwise (below); a --label_column given stays
        taken = {flag: value for flag, value in recorded.items() if not (flag == "label_column" and args.label_column)}
    if args.label_columns and shape.name == "multi_label":  # a label without its column would count as never true
        from encoderfit.serve.inference import checkpoint_label_names

        known = checkpoint_label_names(ckpt)
        given = {c.strip() for c in args.label_columns.split(",") if c.strip()}
        missing = [n for n in known if n not in given]
        if missing:
            raise UserError(f"--label_columns names no column for the checkpoint's label(s) {', '.join(missing)}: "
                            f"give a 0/1 column for each label it predicts ({', '.join(known)})")
    text_columns = inference.checkpoint_text_columns(ckpt, recorded_only=True)
    if taken:
        plain = argparse.Namespace(**vars(args))
        for flag, value in taken.items():
            setattr(args, flag, value)
        try:
            got = load_validation(args, shape, text_columns)
            say("note: labels read as the checkpoint was trained: " + " ".join(f"--{f} {v!r}" for f, v in taken.items()))
        except UserError as recorded_failed:  # other data (label lists, other columns): read as given
            try:
                got = load_validation(plain, shape, text_columns)
            except UserError:
                raise recorded_failed from None
            args.__dict__.update(vars(plain))
    else:
        got = load_validation(args, shape, text_columns)
    return ckpt, got, followed


def evaluate_checkpoint(args, say=print) -> tuple:
    """(the report: metrics, the data's description and the checkpoint's settings, as --output writes it; the
    confusion matrix or None). ``say`` receives what the command prints."""
    device, amp_dtype = inference.setup_device(args)
    ckpt, got, followed = evaluation_data(args, say)
    info = got.info
    clf = inference.load_classifier(ckpt, device, args.runtime)
    if clf.takes_pairs != (got.pairs is not None):
        raise UserError(f"this checkpoint was trained on {'pairs of texts' if clf.takes_pairs else 'single texts'} "
                        f"and the data has {'pairs' if got.pairs is not None else 'one text per row'}: name the "
                        f"columns with --text_column and --text_pair_column")
    clf.task.check_labels(got.labels, info.get("source", "the data"))  # before any inference runs
    max_length = inference.resolve_max_length(args.max_length, clf, fallback=inference.trained_max_length(clf.path))
    long_texts = inference.resolve_long_texts(args, clf, max_length)

    sha = validation_sha256(got.texts, got.pairs)
    trained_sha = _training_split_sha(clf.path)
    same_split = None if trained_sha is None else sha == trained_sha
    for note in info.get("notes", []):
        say(f"note: {note}")
    say(f"checkpoint {clf.path} | {clf.task.describe_task()} | device {device} | "
        f"{inference.describe_runtime(args.runtime, amp_dtype)} | max_length {max_length} | long texts: "
        f"{long_texts.describe(max_length)}")
    split_line = f"data: {info.get('validation', info.get('source'))} | {len(got.texts)} examples"
    if got.pairs is not None:
        split_line += " (text pairs)"
    if same_split is True:
        split_line += " | the same examples the checkpoint's training run validated on"
    elif same_split is False and followed == []:  # the run's own flags, and yet other examples: the data changed
        split_line += (" | note: not the examples the run validated on, though read with its data flags (has the "
                       "data changed since?)")
    elif same_split is False:
        split_line += " | other examples than the run validated on (a test set, or other split flags)"
    say(split_line)

    logits, elapsed = inference.logits_with_progress(clf, got.texts, desc="evaluating", batch_size=args.batch_size,
                                                     max_length=max_length, amp_dtype=amp_dtype, pairs=got.pairs,
                                                     long_texts=long_texts)
    metrics, cm = clf.task.evaluation_report(logits, got.labels, where=info.get("source", "the data"),
                                             elapsed=elapsed, say=say)
    record = {"checkpoint": str(clf.path), "task": clf.task.name, "label_names": list(clf.label_names),
              "runtime": args.runtime, "max_length": max_length, "long_texts": long_texts.record(), **metrics,
              "data": {key: info.get(key) for key in ("source", "validation", "split_seed",
                                                      "validation_fraction", "num_samples", "rows_read")}
              | {"examples": len(got.texts), "validation_sha256": sha, "same_split_as_training": same_split}}
    return record, cm


def _checkpoint_name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}" if path.name == "final" else path.name


def _write(target: str, write) -> Path:
    path = Path(target)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    except OSError as exc:
        raise UserError(f"cannot write {target}: {exc.strerror or exc}") from None
    return path


def main(argv=None) -> int:
    return run_tool(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
