"""``encoderfit train``: flags -> config, then the trainer; bad input -> one line, exit code 2.

    encoderfit train --num_samples 100 --epochs 1                   # one process
    torchrun --standalone --nproc_per_node=2 -m encoderfit train ...  # DDP, one process per GPU (or CPU process)

The flags are read before torch, transformers or datasets load, so ``--help`` and argument errors
answer at once; ``encoderfit/run/trainer.py`` (the run itself) is imported only after that.
"""
from __future__ import annotations

import os
import sys
import time

from encoderfit.config import parse_config
from encoderfit.utils import UserError, launched_by_torchrun

DESCRIPTION = "Fine-tune a pretrained transformer encoder as a text classifier, on one device or (under torchrun) many."


def main(argv=None, *, use_torchrun: bool | None = None, description: str = DESCRIPTION) -> int:
    """Train from command-line flags; ``use_torchrun``: None reads it from the environment (torchrun's variables)."""
    use_torchrun = launched_by_torchrun() if use_torchrun is None else use_torchrun
    started = time.perf_counter()  # the run's start-up counts from here: the heavy imports come below

    def body() -> int:
        cfg = parse_config(argv, description)
        from encoderfit.run.trainer import train

        return train(cfg, use_torchrun, started=started).exit_code
    return guarded(body, use_torchrun=use_torchrun)


def guarded(body, *, use_torchrun: bool) -> int:
    """``body()``'s exit code; bad input is one line and exit code 2, on one rank or under torchrun."""
    rank = os.environ.get("RANK", "0") if use_torchrun else "0"
    try:
        return body()
    except UserError as exc:
        # Every rank finds a bad flag or bad data by itself; rank 0 says it, and each rank says what only
        # it can know (its GPU, say), so the job's message is that one line.
        if exc.rank_local or rank == "0":
            prefix = "" if rank == "0" else f"[rank {rank}] "
            print(f"{prefix}error: {exc}", file=sys.stderr, flush=True)
        else:
            # torchrun stops every process as soon as one exits: the others wait a moment, so that rank 0
            # has said why before it is stopped
            time.sleep(3)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
