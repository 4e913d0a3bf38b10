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
present, with bf16 autocast on GPUs that run it natively (fp16 on older CUDA GPUs). --max_length defaults to the one the
checkpoint was trained with (as in encoderfit evaluate), else 512 or the model's limit.

A checkpoint trained on text pairs classifies pairs: two texts per pair on the command line
with --pairs, or a table with two text columns (found by the training data's names or
training's pair names, or named with --text_column and --text_pair_column); records then
carry "text_pair". A regression checkpoint prints a score per text ({"text", "score"}), and
a labelled table is scored by MSE, MAE and Pearson's correlation.
"""
import sys
from pathlib import Path


import shutil

# inference imports torch only inside its functions: --help and bad flags answer at once
from encoderfit.serve import inference
from encoderfit.utils import UserError, atomic_write_bytes, json_text, run_tool


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


def run(args) -> int:
    inference.check_positive(args, "batch_size", "max_length")
    inference.check_output_path("output", args.output)  # before any work: a path that cannot be written
    got = _gather_texts(args)
    texts = got.texts
    device, amp_dtype = inference.setup_device(args)
    clf = inference.load_classifier(args.checkpoint, device, args.runtime)
    truth, label_notes = clf.task.predict_truth(got, args.input)
    max_length = inference.resolve_max_length(args.max_length, clf, fallback=inference.trained_max_length(clf.path))
    long_texts = inference.resolve_long_texts(args, clf, max_length)
    shape = clf.task.describe_task()
    what = "pair(s)" if got.pairs is not None else "text(s)"
    for note in got.notes + label_notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"checkpoint {clf.path} | {shape} | device {device} | "
          f"{inference.describe_runtime(args.runtime, amp_dtype)} | max_length {max_length} | long texts: "
          f"{long_texts.describe(max_length)} | {len(texts)} {what}",
          file=sys.stderr, flush=True)

    logits, elapsed = inference.logits_with_progress(clf, texts, desc="classifying", batch_size=args.batch_size,
                                                     max_length=max_length, amp_dtype=amp_dtype, pairs=got.pairs,
                                                     long_texts=long_texts)
    table, records, scored, counts = clf.task.predict_outputs(got, logits, truth)
    # the scoring line goes with the summary: on stdout, except where stdout holds the JSON lines
    if args.output is None:
        print(table(shutil.get_terminal_size((100, 24)).columns))
        if scored:
            print(scored)
        return 0
    payload = "".join(json_text(r, ensure_ascii=False) + "\n" for r in records)
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
