"""Small helpers the rest of the engine shares: user errors, device detection, seeding, atomic writes.

Metrics live in ``training/metrics.py`` and checkpoints in ``training/checkpoint.py``;
this module holds the primitives they build on.
"""
from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import random
import tempfile
from pathlib import Path

# torch and numpy are imported where they are used: the command lines read their flags (and answer
# --help) before anything heavy loads.


def launched_by_torchrun() -> bool:
    """Started by torchrun (its environment variables are set): a check that needs no torch import, so the
    entry points can say what is wrong with their flags at once."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr with exit code 2, never a traceback.

    Under DDP every rank sees the same config and data, so the main process alone
    reports; ``rank_local=True`` marks an error only this rank may have (its GPU, say).
    """

    def __init__(self, message: str, rank_local: bool = False):
        super().__init__(message)
        self.rank_local = rank_local


def root_message(exc: BaseException) -> str:
    """The innermost cause's message, on one line (libraries wrap a parser's or a network's error)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return " ".join(str(exc).split()) or type(exc).__name__


def detect_device(preference: str = "auto"):
    """CUDA, then Apple MPS, then CPU; an explicit preference is checked, not trusted."""
    import torch

    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {preference}: CUDA is not available on this machine")
        index = int(preference.split(":")[1]) if ":" in preference else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {preference}: only {torch.cuda.device_count()} CUDA device(s) present")
    if preference == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: Apple MPS is not available on this machine")
    return torch.device(preference)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
PRECISION_NAMES = {"bfloat16": "bf16", "float16": "fp16"}


def autocast_dtype(device, precision: str = "auto"):
    """The autocast dtype for this device (torch.bfloat16 or torch.float16), or None for plain fp32.

    auto: bf16 on CUDA GPUs that run it natively (compute capability 8.0 on: A100, H100, RTX 30xx on), fp16 on
    older CUDA GPUs (T4, V100: training then scales the loss), fp32 elsewhere. torch would emulate bf16 on the
    older GPUs, slowly: auto does not take it, and bf16 asked for there is refused."""
    import torch

    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    bf16_native = False
    if device.type == "cuda":
        with torch.cuda.device(device):  # the device asked for, not the current one
            bf16_native = torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "bf16":
        if device.type == "cuda" and not bf16_native:
            raise UserError("--precision bf16: this GPU has no native bfloat16 (compute capability below 8.0): "
                            "use --precision fp16 or fp32")
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if bf16_native else torch.float16
    return None


def precision_name(amp_dtype) -> str:
    """bf16, fp16 or fp32: how a run or a prediction names its autocast dtype (None: fp32)."""
    return PRECISION_NAMES[str(amp_dtype).removeprefix("torch.")] if amp_dtype is not None else "fp32"


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


_UMASK = os.umask(0o022)  # read it (the call sets it) and put it back at once
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what a new file gets under this umask (some writers make theirs 0600)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp makes it 0600: keep the mode any other new file gets
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite_json(obj):
    """``obj`` with every float that is not finite (an undefined metric, NaN) as None: JSON's ``null``, which
    strict parsers read (``NaN`` and ``Infinity`` are not JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, numbers.Real) and not isinstance(obj, (int, bool)):  # numpy's floats
        return finite_json(float(obj))
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def json_text(obj, **kwargs) -> str:
    """Strict JSON: non-finite floats as null (``finite_json``); ``kwargs`` as ``json.dumps``'s."""
    default = kwargs.pop("default", None)
    return json.dumps(finite_json(obj), allow_nan=False,
                      default=None if default is None else (lambda o: finite_json(default(o))), **kwargs)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json_text(obj, indent=2, default=str) + "\n").encode())


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json_text(record, default=float) + "\n")


class ToolParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error: ...`` line (a UserError), like every other bad input."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")

    def parse_known_args(self, args=None, namespace=None):
        """As argparse's, except that a value starting with a minus and a digit (``--class_weights -1,1``,
        ``--split_seed -1``) is taken as the flag's value, to be checked as values are, instead of being
        read as an unknown flag (argparse's "expected one argument")."""
        import re
        import sys

        args = list(sys.argv[1:] if args is None else args)
        joined, i = [], 0
        while i < len(args):
            action = self._option_string_actions.get(args[i])
            if (action is not None and action.nargs is None and i + 1 < len(args) and isinstance(args[i + 1], str)
                    and re.match(r"-\.?\d", args[i + 1])):
                joined.append(f"{args[i]}={args[i + 1]}")
                i += 2
            else:
                joined.append(args[i])
                i += 1
        return super().parse_known_args(joined, namespace)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, except where there is none to show or the help text already says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default:" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


def run_tool(body) -> int:
    """Run a command-line tool's body: a UserError is one line on stderr and exit code 2, never a traceback."""
    import sys
    try:
        return body()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
