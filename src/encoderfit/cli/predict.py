"""Classify texts with a fine-tuned checkpoint: label and probability for each text.

    python training/predict.py --checkpoint checkpoints/RUN/final "a warm, funny film" "a dull mess"
    python training/predict.py --checkpoint checkpoints/RUN/final --input reviews.txt     # one text per line
    python training/predict.py --checkpoint checkpoints/RUN/final --input reviews.csv --output predictions.jsonl
    python training/predict.py --checkpoint checkpoints/RUN/final --input reviews.jsonl --text_column body
    cat reviews.txt | python training/predict.py --checkpoint checkpoints/RUN/final --input -
    python training/predict.py --checkpoint checkpoints/RUN/final --input test.csv --label_column stars
    python training/predict.py --checkpoint checkpoints/PAIRS/final --pairs "A man sleeps." "A person rests."

Prints a table (probability, label, text) in input order, or with --output FILE writes
one JSON line per text: {"text": ..., "label": ..., "score": ..., "probabilities": {label: p}}
(--output - writes them to standard output). Table files (.csv, .tsv, .jsonl/.json, .parquet)
have their text column found by name (text, sentence, review, ...) or named with --text_column;
.csv/.tsv are read as training reads them (--quoting). A table with a label column (found by
name as in training: label, category, class, ..., or named with --label_column) is also scored:
the accuracy against the checkpoint's label names is printed, and each record gets its
"true_label". Texts are batched (--batch_size) and sorted by length for speed; GPU when
present, with bf16 autocast on GPUs that support it. --max_length defaults to the one the
checkpoint was trained with (as in evaluate.py), else 512 or the model's limit.

A checkpoint trained on text pairs classifies pairs: two texts per pair on the command line
with --pairs, or a table with two text columns (found by the training data's names or
training's pair names, or named with --text_column and --text_pair_column); records then
carry "text_pair". A regression checkpoint prints a score per text ({"text", "score"}), and
a labelled table is scored by MSE, MAE and Pearson's correlation.
"""
import sys
from pathlib import Path


import json
import shutil

# inference imports torch only inside its functions: --help and bad flags answer at once
from encoderfit.serve import inference
from encoderfit.utils import UserError, atomic_write_bytes, run_tool


def build_parser() -> inference.ToolParser:
    parser = inference.ToolParser(description=__doc__.split("\n\n")[0],
                                  formatter_class=inference.HelpFormatter)
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="Texts to classify (or use --input).")
    parser.add_argument("--pairs", action="store_true",
                        help="The TEXT arguments are pairs, two by two (first text, second text, ...): for a "
                             "checkpoint trained on text pairs.")
    parser.add_argument("--input", metavar="FILE",
                        help="Texts from a file: .txt (one per line), .csv, .tsv, .jsonl/.json or .parquet; "
                             "- reads lines from standard input.")
    parser.add_argument("--text_column", help="Text column of a table file (default: found by name: text, "
                                              "sentence, review, content, ...).")
    parser.add_argument("--text_pair_column", help="Second text column of a table file, for a checkpoint trained on "
                                                   "text pairs (default: the training data's name, or found by "
                                                   "training's pair names: sentence2, hypothesis, ...).")
    parser.add_argument("--label_column", help="Label column of a table file, to score the predictions against "
                                               "(default: found by name as in training: label, category, "
                                               "class, ...; a file without one is only classified).")
    parser.add_argument("--quoting", default="auto", choices=_quoting_choices(),
                        help="Quoting of .csv/.tsv input, as in training: 'minimal' (standard CSV quoting), "
                             "'none' (quotes are ordinary characters, one row per line) or 'auto' (standard, "
                             "unless a stray quote says otherwise: see train_single.py --help).")
    parser.add_argument("--output", metavar="FILE",
                        help="Write JSON Lines here instead of printing a table (- for standard output).")
    inference.add_inference_flags(parser, max_length_help="Tokens per model input, longer texts as --long_texts says (default: the "
                                                          "--max_length the checkpoint was trained with if its "
                                                          "run recorded it, else 512 or the model's limit).")
    return parser


def _quoting_choices() -> tuple:
    """Training's --quoting choices (training/config.py: light to import, unlike training/data.py)."""
    import dataclasses

    from encoderfit.config import TrainConfig

    return next(f for f in dataclasses.fields(TrainConfig) if f.name == "quoting").metadata["choices"]


def _gather_texts(args) -> "inference.InputTexts":
    if args.texts and args.input:
        raise UserError("give texts on the command line or --input FILE, not both")
    columns = inference.checkpoint_text_columns(args.checkpoint)
    if args.pairs and len(columns) != 2:
        raise UserError("--pairs: this checkpoint was trained on single texts, not pairs")
    if args.input:
        if args.pairs:
            raise UserError("--pairs applies to texts on the command line; a table gives pairs as two columns")
        return inference.read_input(args.input, args.text_column, args.label_column, quoting=args.quoting,
                                    text_columns=columns, text_pair_column=args.text_pair_column)
    for flag in ("text_column", "text_pair_column", "label_column"):
        if getattr(args, flag):
            raise UserError(f"--{flag} needs --input FILE")
    if not args.texts:
        raise UserError("nothing to classify: give texts as arguments or --input FILE")
    from encoderfit.data.columns import is_blank_text

    if len(columns) == 2:
        if not args.pairs:
            raise UserError(f"this checkpoint classifies pairs of texts ({' + '.join(columns)}): give two texts per "
                            f"pair with --pairs, or --input a table with two text columns")
        if len(args.texts) % 2:
            raise UserError(f"--pairs takes texts two by two: got {len(args.texts)} texts, an odd number")
        pairs = list(zip(args.texts[::2], args.texts[1::2]))
        kept = [p for p in pairs if not (is_blank_text(p[0]) or is_blank_text(p[1]))]
        if not kept:
            raise UserError("nothing to classify: every pair given has an empty text")
        skipped = len(pairs) - len(kept)
        return inference.InputTexts([a for a, _ in kept], notes=[f"skipped {skipped} pair(s) with an empty text"]
                                    if skipped else [], pairs=[b for _, b in kept])

    kept = [t for t in args.texts if not is_blank_text(t)]
    if not kept:
        raise UserError("no texts to classify: every text given is empty")
    skipped = len(args.texts) - len(kept)
    return inference.InputTexts(kept, notes=[f"skipped {skipped} empty text(s)"] if skipped else [])


def _true_ids(got, label_names: list, where: str) -> tuple:
    """Each text's true class id (None where it has no label), or None when there is nothing to score."""
    if got.labels is None:
        return None, []
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted({v for v in got.labels if v is not None} - set(index))
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        if got.label_named:  # asked for: an error, as in evaluate.py
            raise UserError(f"the data has labels the checkpoint does not know: {shown} "
                            f"(it knows: {', '.join(label_names)}) in {where}")
        return None, [f"not scoring against column {got.label_column!r} of {where}: it has labels the checkpoint "
                      f"does not know ({shown}; it knows {', '.join(label_names)})"]
    ids = [None if v is None else index[v] for v in got.labels]
    unlabelled = sum(1 for v in ids if v is None)
    if unlabelled == len(ids):
        return None, [f"column {got.label_column!r} of {where} has no labels: nothing to score"]
    return ids, ([f"{unlabelled} text(s) without a label are not counted in the accuracy"] if unlabelled else [])


def _shown(got) -> list:
    """Each input as a table shows it: a pair as 'first ||| second'."""
    if got.pairs is None:
        return got.texts
    return [f"{a} ||| {b}" for a, b in zip(got.texts, got.pairs)]


def _cut(text: str, room: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= room else flat[:room - 3] + "..."


def format_table(texts, label_names, probs, predicted, width: int) -> str:
    """probability | label | text (whitespace collapsed, cut to fit ``width`` columns)."""
    best = predicted.tolist()
    lw = max(5, *(len(n) for n in label_names))
    room = max(20, width - (6 + 2 + lw + 2))
    lines = [f"{'prob':>6}  {'label':<{lw}}  text"]
    for text, k, row in zip(texts, best, probs.tolist()):
        lines.append(f"{row[k]:>6.4f}  {label_names[k]:<{lw}}  {_cut(text, room)}")
    return "\n".join(lines)


def format_label_sets(texts, chosen, width: int) -> str:
    """labels | text: a multi-label checkpoint's decisions ('-' for none)."""
    shown = [", ".join(c) or "-" for c in chosen]
    lw = max(6, *(len(x) for x in shown))
    room = max(20, width - lw - 2)
    return "\n".join([f"{'labels':<{lw}}  text"] + [f"{x:<{lw}}  {_cut(t, room)}" for x, t in zip(shown, texts)])


def format_scores(texts, scores, width: int) -> str:
    """score | text: a regression checkpoint's output."""
    values = [f"{v:.4f}" for v in scores.tolist()]
    sw = max(5, *(len(v) for v in values))
    room = max(20, width - sw - 2)
    return "\n".join([f"{'score':>{sw}}  text"] + [f"{v:>{sw}}  {_cut(t, room)}" for v, t in zip(values, texts)])


def prediction_records(texts, label_names, probs, predicted, true_ids=None, pairs=None) -> list:
    records = []
    for i, (text, row, k) in enumerate(zip(texts, probs.tolist(), predicted.tolist())):
        record = {"text": text, **({"text_pair": pairs[i]} if pairs is not None else {}),
                  "label": label_names[k], "score": row[k], "probabilities": dict(zip(label_names, row))}
        if true_ids is not None:
            record["true_label"] = None if true_ids[i] is None else label_names[true_ids[i]]
        records.append(record)
    return records


def _accuracy_line(true_ids, predicted, column: str) -> str:
    pairs = [(t, p) for t, p in zip(true_ids, predicted.tolist()) if t is not None]
    correct = sum(1 for t, p in pairs if t == p)
    return (f"accuracy {correct / len(pairs):.4f} | {correct} of {len(pairs)} labelled text(s) correct "
            f"(label column {column!r})")


def _true_scores(got, where: str) -> tuple:
    """Each text's target (None where it has none) for a regression checkpoint, or None with a note."""
    if got.labels is None:
        return None, []
    values = []
    for v in got.labels:
        try:
            values.append(None if v is None else float(v))
        except ValueError:
            if got.label_named:
                raise UserError(f"column {got.label_column!r} of {where} holds {v!r}, not a number: a regression "
                                f"checkpoint scores against numbers") from None
            return None, [f"not scoring against column {got.label_column!r} of {where}: {v!r} is not a number"]
    if all(v is None for v in values):
        return None, [f"column {got.label_column!r} of {where} has no labels: nothing to score"]
    return values, []


def _regression_line(targets, scores, column: str) -> str:
    import torch

    from encoderfit.tasks.regression import _pearson_from_sums

    kept = [(t, s) for t, s in zip(targets, scores.tolist()) if t is not None]
    y = torch.tensor([t for t, _ in kept], dtype=torch.float64)
    p = torch.tensor([s for _, s in kept], dtype=torch.float64)
    pearson = _pearson_from_sums(len(kept), float(y.sum()), float(p.sum()), float((y * y).sum()),
                                 float((p * p).sum()), float((y * p).sum()))
    return (f"mse {float(((p - y) ** 2).mean()):.4f} | mae {float((p - y).abs().mean()):.4f} | pearson "
            f"{pearson:.4f} | {len(kept)} labelled text(s) (label column {column!r})")


def _truth(got, clf, where: str) -> tuple:
    """(each text's true class id or target, or None; notes): what a labelled table is scored against."""
    if clf.task.name == "multi_label":
        return None, ([f"column {got.label_column!r} is not scored for a multi-label checkpoint: evaluate.py scores "
                       f"one"] if got.labels is not None and got.label_named else [])
    return _true_scores(got, where) if clf.task.name == "regression" else _true_ids(got, clf.label_names, where)


def _outputs(got, clf, logits, truth) -> tuple:
    """(a table for a terminal of a given width, JSON records, the scoring line or None, the counts line
    after --output): what the checkpoint's task makes of the logits."""
    scores, predicted = clf.task.decode(logits)
    if clf.task.name == "multi_label":
        chosen = [[n for n, on in zip(clf.label_names, row) if on] for row in predicted.tolist()]
        records = [{"text": t, **({"text_pair": got.pairs[i]} if got.pairs is not None else {}), "labels": chosen[i],
                    "probabilities": dict(zip(clf.label_names, scores[i].tolist()))}
                   for i, t in enumerate(got.texts)]
        counts = predicted.sum(dim=0).tolist()
        return (lambda width: format_label_sets(_shown(got), chosen, width), records, None,
                ", ".join(f"{name} {c}" for name, c in zip(clf.label_names, counts)))
    if clf.task.name == "regression":
        targets = truth
        records = [{"text": t, **({"text_pair": got.pairs[i]} if got.pairs is not None else {}), "score": v,
                    **({"true_score": targets[i]} if targets is not None else {})}
                   for i, (t, v) in enumerate(zip(got.texts, scores.tolist()))]
        scored = _regression_line(targets, scores, got.label_column) if targets is not None else None
        return (lambda width: format_scores(_shown(got), scores, width), records, scored,
                f"mean score {float(scores.mean()):.4f}")
    true_ids = truth
    records = prediction_records(got.texts, clf.label_names, scores, predicted, true_ids, got.pairs)
    scored = _accuracy_line(true_ids, predicted, got.label_column) if true_ids is not None else None
    counts = predicted.bincount(minlength=len(clf.label_names)).tolist()
    return (lambda width: format_table(_shown(got), clf.label_names, scores, predicted, width), records,
            scored, ", ".join(f"{name} {c}" for name, c in zip(clf.label_names, counts)))


def run(args) -> int:
    inference.check_positive(args, "batch_size", "max_length")
    inference.check_output_path("output", args.output)  # before any work: a path that cannot be written
    got = _gather_texts(args)
    texts = got.texts
    device, amp_dtype = inference.setup_device(args)
    clf = inference.load_classifier(args.checkpoint, device)
    truth, label_notes = _truth(got, clf, args.input)
    max_length = inference.resolve_max_length(args.max_length, clf, fallback=inference.trained_max_length(clf.path))
    long_texts = inference.resolve_long_texts(args, clf, max_length)
    shape = "regression" if clf.task.name == "regression" else f"labels {', '.join(clf.label_names)}" + (
        f" (multi-label, threshold {clf.task.threshold:g})" if clf.task.name == "multi_label" else "")
    what = "pair(s)" if got.pairs is not None else "text(s)"
    for note in got.notes + label_notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"checkpoint {clf.path} | {shape} | device {device} | "
          f"{'bf16 autocast' if amp_dtype else 'fp32'} | max_length {max_length} | long texts: "
          f"{long_texts.describe(max_length)} | {len(texts)} {what}",
          file=sys.stderr, flush=True)

    logits, elapsed = inference.logits_with_progress(clf, texts, desc="classifying", batch_size=args.batch_size,
                                                     max_length=max_length, amp_dtype=amp_dtype, pairs=got.pairs,
                                                     long_texts=long_texts)
    table, records, scored, counts = _outputs(got, clf, logits, truth)
    # the scoring line goes with the summary: on stdout, except where stdout holds the JSON lines
    if args.output is None:
        print(table(shutil.get_terminal_size((100, 24)).columns))
        if scored:
            print(scored)
        return 0
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if args.output == "-":
        sys.stdout.write(payload)
        if scored:
            print(scored, file=sys.stderr)
        return 0
    out = Path(args.output)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, payload.encode("utf-8"))
    except OSError as exc:
        raise UserError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    print(f"wrote {len(texts)} prediction(s) to {out} in {elapsed:.1f}s | {counts}")
    if scored:
        print(scored)
    return 0


def main(argv=None) -> int:
    return run_tool(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
