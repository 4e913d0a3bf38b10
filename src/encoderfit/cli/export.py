"""Export a checkpoint to ONNX for serving (and a dynamic int8 copy for CPUs), checked against PyTorch.

    encoderfit export checkpoints/RUN/final
    encoderfit export checkpoints/RUN/best --int8
    encoderfit predict --checkpoint checkpoints/RUN/final --runtime onnx-int8 "a text"

Writes CKPT/onnx/model.onnx (and with --int8 model_qint8.onnx) and onnx/export.json. The export is checked
on labelled data: the run's own validation split (or --data FILE): the fp32 file's probabilities must be within
1e-4 of the PyTorch checkpoint's, and the int8 file's accuracy (micro-F1, Pearson) within one point. A check
that fails is an error (exit 2) with its numbers. Needs pip install 'encoderfit[onnx]'.
"""
from __future__ import annotations

import sys

from encoderfit.utils import HelpFormatter, ToolParser, run_tool


def build_parser() -> ToolParser:
    parser = ToolParser(prog="encoderfit export", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", help="A run directory (its final/) or a checkpoint directory (final/, best/).")
    parser.add_argument("--int8", action="store_true",
                        help="Also write model_qint8.onnx: weights quantized to int8 (dynamic quantization), for "
                             "CPUs.")
    parser.add_argument("--data", metavar="FILE", default=None,
                        help="Labelled file to check the export on (default: the run's own validation split).")
    parser.add_argument("--no_check", action="store_true", help="Export without checking against PyTorch.")
    return parser


def run(args) -> int:
    from encoderfit.serve.onnx import export_onnx

    export_onnx(args.checkpoint, int8=args.int8, data=args.data, check=not args.no_check,
                say=lambda line: print(line, flush=True))
    return 0


def main(argv=None) -> int:
    return run_tool(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
