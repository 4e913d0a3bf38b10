"""What a person sees and what a run records: printed lines, metrics JSON lines, the progress bar.

Only the main process (global rank 0) prints or writes; on other ranks a RunLogger
is present but silent, so the engine calls it without asking who it is.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from training.distributed import ProcessContext
from training.utils import UserError, append_jsonl, atomic_write_bytes, atomic_write_json

METRICS_FILE = "metrics.jsonl"


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


class RunLogger:
    def __init__(self, run_dir: Optional[Path], ctx: ProcessContext, show_progress: bool, tensorboard: bool = False):
        self.enabled = ctx.is_main
        self.run_dir = Path(run_dir) if run_dir else None
        # A bar only for a person at a terminal: logs and CI stay clean.
        self.show_progress = self.enabled and show_progress and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.tb = None
        if tensorboard:
            self.open_tensorboard()

    def open_tensorboard(self) -> None:
        """TensorBoard event files in RUN/tensorboard (main process only)."""
        if not self.enabled or self.run_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise UserError(f"--tensorboard needs the tensorboard package ({exc}): pip install tensorboard") from None
        self.tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def scalars(self, group: str, values: dict, step: int) -> None:
        """TensorBoard scalars (``group/name``), when --tensorboard is on."""
        if self.tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and name not in ("epoch",):
                    self.tb.add_scalar(f"{group}/{name}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def print(self, message: str = "") -> None:
        if self.enabled:
            print(message, flush=True)

    def record(self, event: str, **fields) -> None:
        """Append one JSON line to the run's metrics file."""
        if self.enabled and self.run_dir is not None:
            append_jsonl(self.run_dir / METRICS_FILE, {"event": event, **fields,
                                                       "elapsed_s": round(time.perf_counter() - self.start, 3)})

    def truncate_records(self, after_step: int) -> None:
        """Drop metric lines past ``after_step``: a resumed run writes them again."""
        path = self.run_dir / METRICS_FILE if self.run_dir else None
        if not self.enabled or path is None or not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= after_step:
                    keep.append(line)
            except ValueError:  # a line cut short when the process died
                continue
        atomic_write_bytes(path, ("\n".join(keep) + "\n").encode() if keep else b"")

    def write_json(self, name: str, obj) -> None:
        if self.enabled and self.run_dir is not None:
            atomic_write_json(self.run_dir / name, obj)

    def progress(self, total: int, desc: str, initial: int = 0):
        if not self.show_progress:
            return _NoBar()
        return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=False)
