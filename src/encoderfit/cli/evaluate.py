"""Evaluate a fine-tuned checkpoint on the validation split that training holds out, or on a labelled file.

    python training/evaluate.py --checkpoint checkpoints/RUN/final
    python training/evaluate.py --checkpoint checkpoints/RUN/final --num_samples 300 --output eval.json --plot cm.png
    python training/evaluate.py --checkpoint checkpoints/RUN/final --train_file train.csv --label_column stars
    python training/evaluate.py --checkpoint checkpoints/RUN/final --validation_file test.csv    # or --data test.csv

The data flags are training's, with the same defaults, and the validation split is made
the same way: the default dataset (or a --train_file without --validation_file) gives the
same held-out examples for the same --validation_fraction, --split_seed and --num_samples.
With --validation_file (alone, or --data FILE, or beside --train_file), every row of that
file is evaluated. Label names of the data are matched to the checkpoint's; labels it does
not know are an error. Prints accuracy, macro-F1, a per-class table (precision, recall,
F1, support) and the confusion matrix; --output writes them as JSON, --plot draws the
confusion matrix as a PNG. --max_length defaults to the one the checkpoint was trained with.

A checkpoint trained on text pairs reads the two text columns it was trained on (or those
named with --text_column and --text_pair_column). A regression checkpoint is scored by
Pearson's and Spearman's correlations, MSE and MAE.
"""
import sys
from pathlib import Path


import dataclasses
import json
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
        parser.add_argument(f"--{name}", type=typ, default=default, help=help_text,
                            **({"choices": choices} if choices else {}))
    parser.add_argument("--data", metavar="FILE", help="Another name for --validation_file.")
    inference.add_inference_flags(
        parser, max_length_help="Tokens per model input, longer texts as --long_texts says (default: the --max_length the checkpoint "
                                "was trained with if its run recorded it, else 512 or the model's limit).")
    parser.add_argument("--output", metavar="FILE.json", help="Write the metrics as JSON here.")
    parser.add_argument("--plot", metavar="FILE.png", help="Draw the confusion matrix as a PNG here.")
    return parser


def _check(args) -> None:
    inference.check_positive(args, "batch_size", "max_length", "num_samples")
    if not 0 < args.validation_fraction < 1:
        raise UserError(f"--validation_fraction must be in (0, 1), got {args.validation_fraction}")
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


def load_validation(args, kind: str = "single_label", text_columns: Optional[list] = None):
    """The validation split (``data.LabelledFile``: texts, second texts of pairs, label names or targets,
    split info), made as training makes it, or every row of --validation_file when it comes without
    --train_file. ``text_columns`` are the checkpoint's (where it recorded them): a single-text checkpoint
    reads one text even where the data has pair columns."""
    import datasets

    from encoderfit.data.columns import NO_PAIR, column
    from encoderfit.data.sources import DataSource
    from encoderfit.data.splits import LabelledFile, load_labelled_file, load_labelled_splits

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
        return load_labelled_file(args.validation_file, text_column=text_column, label_column=args.label_column,
                                  quoting=args.quoting, num_samples=args.num_samples, split_seed=args.split_seed,
                                  text_pair_column=pair_column, regression=kind == "regression",
                                  multi_label=kind == "multi_label", label_separator=args.label_separator,
                                  label_columns=args.label_columns)
    source = DataSource.from_settings(args, text_column=text_column, text_pair_column=pair_column)
    splits = load_labelled_splits(source, validation_fraction=args.validation_fraction, split_seed=args.split_seed,
                                  num_samples=args.num_samples, task=kind)
    val = splits.validation
    pairs = column(val, "text_pair") if "text_pair" in val.column_names else None
    if kind == "regression":
        labels = column(val, "labels")
    elif kind == "multi_label":
        labels = [[n for n, on in zip(splits.label_names, row) if on] for row in column(val, "labels")]
    else:
        names = [str(n) for n in splits.label_names]
        labels = [names[i] for i in column(val, "labels")]
    return LabelledFile(column(val, "text"), pairs, labels, splits.info)


def map_labels(labels: list, label2id: dict, where: str):
    """The checkpoint's class ids of the data's label names, a numpy array (UserError for names it does not know)."""
    import numpy as np

    unknown = sorted(set(labels) - set(label2id))
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise UserError(f"the data has labels the checkpoint does not know: {shown} "
                        f"(it knows: {', '.join(label2id)}) in {where}")
    return np.array([label2id[name] for name in labels], dtype=np.int64)


def validation_sha256(texts: list, pairs: Optional[list] = None) -> str:
    """The fingerprint training records for its held-out examples (data.json's validation_sha256)."""
    from encoderfit import data

    return data.validation_sha256(data.example_keys(texts, pairs))


def _training_split_sha(ckpt: Path):
    try:
        return json.loads((ckpt.parent / "data.json").read_text()).get("validation_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def run(args) -> int:
    _check(args)
    record, cm = evaluate_checkpoint(args, say=lambda line: print(line, flush=True))
    written = []
    if args.output:
        written.append(_write(args.output, lambda p: atomic_write_json(p, record)))
    if args.plot:
        from encoderfit.cli.plot import plot_confusion_matrix

        ckpt = Path(record["checkpoint"])
        title = (f"{_checkpoint_name(ckpt)}: accuracy {record['accuracy']:.3f}, "
                 f"macro-F1 {record['macro_f1']:.3f} (n={record['examples']})")
        written.append(_write(args.plot, lambda p: plot_confusion_matrix(cm, record["label_names"], p, title=title)))
    if written:
        print()
        for path in written:
            print(f"wrote {path}")
    return 0


def evaluate_checkpoint(args, say=print) -> tuple:
    """(the report: metrics, the data's description and the checkpoint's settings, as --output writes it; the
    confusion matrix or None). ``say`` receives what the command prints."""
    device, amp_dtype = inference.setup_device(args)
    ckpt = inference.resolve_checkpoint(args.checkpoint)  # fail fast, before the data is read
    problem = inference.checkpoint_problem_type(ckpt)
    kind = {"regression": "regression", "multi_label_classification": "multi_label"}.get(problem, "single_label")
    regression = kind == "regression"
    if kind != "single_label" and args.plot:
        raise UserError(f"--plot draws a confusion matrix, and this is a {kind.replace('_', '-')} checkpoint: "
                        f"leave --plot out")
    got = load_validation(args, kind, inference.checkpoint_text_columns(ckpt, recorded_only=True))
    info = got.info
    clf = inference.load_classifier(ckpt, device)
    if clf.takes_pairs != (got.pairs is not None):
        raise UserError(f"this checkpoint was trained on {'pairs of texts' if clf.takes_pairs else 'single texts'} "
                        f"and the data has {'pairs' if got.pairs is not None else 'one text per row'}: name the "
                        f"columns with --text_column and --text_pair_column")
    max_length = inference.resolve_max_length(args.max_length, clf, fallback=inference.trained_max_length(clf.path))
    long_texts = inference.resolve_long_texts(args, clf, max_length)
    y_true = None if kind != "single_label" else map_labels(got.labels, clf.label2id, info.get("source", "the data"))
    if kind == "multi_label":
        map_labels([x for row in got.labels for x in row], clf.label2id, info.get("source", "the data"))

    sha = validation_sha256(got.texts, got.pairs)
    trained_sha = _training_split_sha(clf.path)
    same_split = None if trained_sha is None else sha == trained_sha
    for note in info.get("notes", []):
        say(f"note: {note}")
    shape = f"regression of {clf.label_names[0]!r}" if regression else f"labels {', '.join(clf.label_names)}"
    say(f"checkpoint {clf.path} | {shape} | device {device} | "
        f"{'bf16 autocast' if amp_dtype else 'fp32'} | max_length {max_length} | long texts: "
        f"{long_texts.describe(max_length)}")
    split_line = f"data: {info.get('validation', info.get('source'))} | {len(got.texts)} examples"
    if got.pairs is not None:
        split_line += " (text pairs)"
    if same_split is True:
        split_line += " | the same examples the checkpoint's training run validated on"
    elif same_split is False:
        split_line += (" | note: not the examples the checkpoint's training run validated on"
                       " (other data flags than training's?)")
    say(split_line)

    logits, elapsed = inference.logits_with_progress(clf, got.texts, desc="evaluating", batch_size=args.batch_size,
                                                     max_length=max_length, amp_dtype=amp_dtype, pairs=got.pairs,
                                                     long_texts=long_texts)
    if regression:
        metrics, cm = _regression_report(clf, logits, got.labels, elapsed, say), None
    elif kind == "multi_label":
        metrics, cm = _multi_label_report(clf, logits, got.labels, elapsed, say), None
    else:
        metrics, cm = _classification_report(clf, logits, y_true, elapsed, say)
    record = {"checkpoint": str(clf.path), "task": clf.task.name, "label_names": list(clf.label_names),
              "max_length": max_length, "long_texts": long_texts.record(), **metrics,
              "data": {key: info.get(key) for key in ("source", "validation", "split_seed",
                                                      "validation_fraction", "num_samples", "rows_read")}
              | {"examples": len(got.texts), "validation_sha256": sha, "same_split_as_training": same_split}}
    return record, cm


def _classification_report(clf, logits, y_true, elapsed: float, say) -> tuple:
    """(metrics, confusion matrix), printed: accuracy, macro-F1, loss, the per-class table, the matrix."""
    import torch

    from encoderfit.metrics import classification_metrics, confusion_matrix

    _, y_pred = clf.task.decode(logits)
    labels = torch.from_numpy(y_true)
    sums = clf.task.new_sums(torch.device("cpu"))  # the task's own sums: a weighted mean with class weights
    clf.task.add_sums(sums, clf.task.loss_sum(logits, labels), logits, labels)
    loss = clf.task.running(sums)["loss"]
    cm = confusion_matrix(y_true, y_pred.numpy(), len(clf.label_names))
    metrics = {"loss": loss, **classification_metrics(cm, clf.label_names)}
    say(f"accuracy {metrics['accuracy']:.4f} | macro-F1 {metrics['macro_f1']:.4f} | loss {loss:.4f} | "
          f"{metrics['examples']} examples in {elapsed:.1f}s ({metrics['examples'] / max(elapsed, 1e-9):.1f}/s)")
    say("")
    say(inference.format_report(metrics))
    say("")
    say("confusion matrix (rows: true label, columns: predicted label)")
    say(inference.format_confusion(metrics))
    return metrics, cm


def _multi_label_report(clf, logits, label_lists: list, elapsed: float, say) -> dict:
    """Multi-label metrics at the checkpoint's threshold, from the task's own sums, printed with a per-label table."""
    import torch

    from encoderfit.tasks.multi_label import multi_label_metrics

    task = clf.task
    y = torch.zeros(len(label_lists), task.num_labels)
    for i, row in enumerate(label_lists):
        for name in row:
            y[i, clf.label2id[name]] = 1.0
    sums = task.new_sums(torch.device("cpu"))
    task.add_sums(sums, task.loss_sum(logits, y), logits, y)
    m = task.metrics(sums)
    per = multi_label_metrics(sums[3:].reshape(3, task.num_labels), clf.label_names)["per_label"]
    metrics = {"examples": len(label_lists), "threshold": task.threshold, "loss": m["loss"],
               "micro_f1": m["micro_f1"], "macro_f1": m["macro_f1"], "subset_accuracy": m["subset_accuracy"],
               "per_label": per}
    say(f"micro-F1 {m['micro_f1']:.4f} | macro-F1 {m['macro_f1']:.4f} | subset accuracy {m['subset_accuracy']:.4f} | "
          f"loss {m['loss']:.4f} | threshold {task.threshold:g} | {len(label_lists)} examples in {elapsed:.1f}s")
    say("")
    width = max(9, *(len(n) for n in clf.label_names))
    say(f"{'label':<{width}}  precision  recall      f1  support  predicted")
    for name in clf.label_names:
        r = per[name]
        say(f"{name:<{width}}  {r['precision']:>9.4f}  {r['recall']:>6.4f}  {r['f1']:>6.4f}  {r['support']:>7d}"
              f"  {r['predicted']:>9d}")
    return metrics


def _regression_report(clf, logits, targets: list, elapsed: float, say) -> dict:
    """The regression metrics, from the task's own sums (as training's evaluation computes them), printed."""
    import torch

    task = clf.task
    y = torch.tensor(targets, dtype=torch.float32)
    sums = task.new_sums(torch.device("cpu"))
    task.add_sums(sums, task.loss_sum(logits, y), logits, y)
    m = task.metrics(sums, task.outputs(logits, y))
    metrics = {"examples": len(targets), "loss": m["loss"], "mse": m["mse"], "mae": m["mae"],
               "pearson": m["pearson"], "spearman": m["spearman"],
               "mean_target": float(y.double().mean()), "mean_prediction": float(logits.double().mean())}
    say(f"pearson {m['pearson']:.4f} | spearman {m['spearman']:.4f} | mse {m['mse']:.4f} | mae {m['mae']:.4f} | "
          f"{len(targets)} examples in {elapsed:.1f}s ({len(targets) / max(elapsed, 1e-9):.1f}/s)")
    say(f"mean target {metrics['mean_target']:.4f} | mean prediction {metrics['mean_prediction']:.4f}")
    return metrics


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
