"""Classify texts with a fine-tuned checkpoint: label and probability for each text.

    python training/predict.py --checkpoint checkpoints/RUN/final "a warm, funny film" "a dull mess"
    python training/predict.py --checkpoint checkpoints/RUN/final --input reviews.txt     # one text per line
    python training/predict.py --checkpoint checkpoints/RUN/final --input reviews.csv --output predictions.jsonl
    python training/predict.py --checkpoint checkpoints/RUN/final --input reviews.jsonl --text_column body
    cat reviews.txt | python training/predict.py --checkpoint checkpoints/RUN/final --input -

Prints a table (probability, label, text) in input order, or with --output FILE writes
one JSON line per text: {"text": ..., "label": ..., "score": ..., "probabilities": {label: p}}
(--output - writes them to standard output). Table files (.csv, .tsv, .jsonl/.json, .parquet)
have their text column found by name (text, sentence, review, ...) or named with --text_column.
Texts are batched (--batch_size) and sorted by length for speed; GPU when present, with bf16
autocast on GPUs that support it. --max_length defaults to 512 or the model's limit.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import json  # noqa: E402
import shutil  # noqa: E402

from training import inference  # noqa: E402
from training.utils import UserError, atomic_write_bytes, run_tool  # noqa: E402


def build_parser() -> inference.ToolParser:
    parser = inference.ToolParser(description=__doc__.split("\n\n")[0],
                                  formatter_class=inference.HelpFormatter)
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="Texts to classify (or use --input).")
    parser.add_argument("--input", metavar="FILE",
                        help="Texts from a file: .txt (one per line), .csv, .tsv, .jsonl/.json or .parquet; "
                             "- reads lines from standard input.")
    parser.add_argument("--text_column", help="Text column of a table file (default: found by name: text, "
                                              "sentence, review, content, ...).")
    parser.add_argument("--output", metavar="FILE",
                        help="Write JSON Lines here instead of printing a table (- for standard output).")
    inference.add_inference_flags(parser, max_length_help="Truncate texts to this many tokens "
                                                          "(default: 512 or the model's limit, if lower).")
    return parser


def _gather_texts(args) -> tuple:
    if args.texts and args.input:
        raise UserError("give texts on the command line or --input FILE, not both")
    if args.input:
        return inference.read_texts(args.input, args.text_column)
    if args.text_column:
        raise UserError("--text_column needs --input FILE")
    if not args.texts:
        raise UserError("nothing to classify: give texts as arguments or --input FILE")
    kept = [t for t in args.texts if t.strip()]
    if not kept:
        raise UserError("no texts to classify: every text given is empty")
    skipped = len(args.texts) - len(kept)
    return kept, (f"skipped {skipped} empty text(s)" if skipped else None)


def format_table(texts, label_names, probs, predicted, width: int) -> str:
    """probability | label | text (whitespace collapsed, cut to fit ``width`` columns)."""
    best = predicted.tolist()
    lw = max(5, *(len(n) for n in label_names))
    room = max(20, width - (6 + 2 + lw + 2))
    lines = [f"{'prob':>6}  {'label':<{lw}}  text"]
    for text, k, row in zip(texts, best, probs.tolist()):
        flat = " ".join(text.split())
        if len(flat) > room:
            flat = flat[:room - 3] + "..."
        lines.append(f"{row[k]:>6.4f}  {label_names[k]:<{lw}}  {flat}")
    return "\n".join(lines)


def prediction_records(texts, label_names, probs, predicted) -> list:
    records = []
    for text, row, k in zip(texts, probs.tolist(), predicted.tolist()):
        records.append({"text": text, "label": label_names[k], "score": row[k],
                        "probabilities": dict(zip(label_names, row))})
    return records


def run(args) -> int:
    inference.check_positive(args, "batch_size", "max_length")
    if args.output not in (None, "-") and Path(args.output).is_dir():
        raise UserError(f"--output is a directory: {args.output}")
    texts, note = _gather_texts(args)
    device, amp_dtype = inference.setup_device(args)
    clf = inference.load_classifier(args.checkpoint, device)
    max_length = inference.resolve_max_length(args.max_length, clf)
    if note:
        print(f"note: {note}", file=sys.stderr)
    print(f"checkpoint {clf.path} | labels {', '.join(clf.label_names)} | device {device} | "
          f"{'bf16 autocast' if amp_dtype else 'fp32'} | max_length {max_length} | {len(texts)} text(s)",
          file=sys.stderr, flush=True)

    logits, elapsed = inference.logits_with_progress(clf, texts, desc="classifying", batch_size=args.batch_size,
                                                     max_length=max_length, amp_dtype=amp_dtype)
    probs, predicted = clf.task.decode(logits)

    if args.output is None:
        print(format_table(texts, clf.label_names, probs, predicted, shutil.get_terminal_size((100, 24)).columns))
        return 0
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n"
                      for r in prediction_records(texts, clf.label_names, probs, predicted))
    if args.output == "-":
        sys.stdout.write(payload)
        return 0
    out = Path(args.output)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, payload.encode("utf-8"))
    except OSError as exc:
        raise UserError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    counts = predicted.bincount(minlength=len(clf.label_names)).tolist()
    print(f"wrote {len(texts)} prediction(s) to {out} in {elapsed:.1f}s | "
          + ", ".join(f"{name} {c}" for name, c in zip(clf.label_names, counts)))
    return 0


def main(argv=None) -> int:
    return run_tool(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
