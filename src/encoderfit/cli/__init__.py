"""The ``encoderfit`` command: ``encoderfit COMMAND [flags]``, one module per command.

    encoderfit train --train_file data.csv --epochs 3          # one process (CUDA, then MPS, then CPU)
    torchrun --nproc_per_node=8 -m encoderfit train --epochs 3  # DDP: the same command, one process per GPU
    encoderfit launch --nproc_per_node=8 train --epochs 3       # the same, ending with the process's error line
    encoderfit predict --checkpoint checkpoints/RUN/final "a text"
    encoderfit evaluate --checkpoint checkpoints/RUN/best --validation_file test.csv
    encoderfit sweep --learning_rate 2e-5,5e-5 --epochs 3,5
    encoderfit plot checkpoints/RUN
    encoderfit export checkpoints/RUN --int8

Each command's flags are read before torch, transformers or datasets load, so ``--help`` and flag errors
answer at once; a command's module is imported only once it is named.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("encoderfit.cli.train", "fine-tune a model (under torchrun: one process per GPU, DDP)"),
    "predict": ("encoderfit.cli.predict", "label texts with a trained checkpoint"),
    "evaluate": ("encoderfit.cli.evaluate", "score a checkpoint on labelled data"),
    "sweep": ("encoderfit.cli.sweep", "train a grid or a sampled search of settings and rank them"),
    "plot": ("encoderfit.cli.plot", "draw runs' metrics per epoch"),
    "export": ("encoderfit.cli.export", "write a checkpoint as ONNX (and int8) for serving, checked against PyTorch"),
    "push": ("encoderfit.cli.push", "upload a run's checkpoint and its model card to the Hugging Face Hub"),
    "launch": ("encoderfit.cli.launch", "start train or sweep under torchrun's launcher, one process per GPU"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<9} {what}" for name, (_, what) in COMMANDS.items())
    return (f"usage: encoderfit COMMAND [flags]   (encoderfit COMMAND --help for a command's flags)\n\n"
            f"commands:\n{rows}\n")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}: choose from {', '.join(COMMANDS)} (see encoderfit --help)",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv[0] = f"encoderfit {name}"  # what the command's --help and usage lines call it
    try:
        return module.main(rest)
    except BrokenPipeError:  # the reader went away (encoderfit ... | head): stop quietly, as other commands do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
