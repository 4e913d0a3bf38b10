"""What a person sees and what a run records: printed lines, metrics JSON lines, the progress bar.

Only the main process (global rank 0) prints or writes; on other ranks a RunLogger
is present but silent, so the engine calls it without asking who it is.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from encoderfit.engine.distributed import ProcessContext
from encoderfit.run.tracking import Trackers
from encoderfit.utils import append_jsonl, atomic_write_bytes, atomic_write_json

METRICS_FILE = "metrics.jsonl"


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


class _PlainProgress:
    """The bar's news as plain lines, for a log file (nohup, SLURM, CI): one line each log interval (the
    engine's ``set_postfix_str``), with the epoch's progress and the time it has left at this pace."""

    def __init__(self, total: int, desc: str, initial: int, say):
        self.total, self.desc, self.n, self.say = total, desc, initial, say
        self.start_n, self.start = initial, time.perf_counter()

    def update(self, n=1):
        self.n += n

    def set_postfix_str(self, s):
        done = self.n - self.start_n
        elapsed = time.perf_counter() - self.start
        left = (self.total - self.n) * elapsed / done if done else float("nan")
        pct = 100 * self.n / self.total if self.total else 100.0
        self.say(f"{self.desc} | step {self.n}/{self.total} ({pct:.0f}%) | {s} | {_duration(left)} left")

    def close(self):
        pass


def _duration(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class RunLogger:
    def __init__(self, run_dir: Optional[Path], ctx: ProcessContext, show_progress: bool):
        self.enabled = ctx.is_main
        self.run_dir = Path(run_dir) if run_dir else None
        # A bar for a person at a terminal; without one (a log file), a plain line each log interval instead
        self.show_progress = self.enabled and show_progress and sys.stderr.isatty()
        self.plain_progress = self.enabled and show_progress and not self.show_progress
        self.start = time.perf_counter()
        self.trackers = Trackers()

    def open_trackers(self, names, params: dict) -> None:
        """The --report_to trackers (TensorBoard, MLflow, Weights & Biases), on the main process alone."""
        if self.enabled and self.run_dir is not None and names:
            self.trackers.start(names, self.run_dir, params)

    def scalars(self, group: str, values: dict, step: int) -> None:
        """Step or epoch metrics to the trackers, as ``group/name`` at the optimizer step."""
        self.trackers.scalars(group, values, step)

    def finish_tracking(self, summary: dict, card: Optional[Path]) -> None:
        """The run's final and best metrics and its model card, to the trackers."""
        self.trackers.finish(summary, card)

    def close(self, failed: bool = False) -> None:
        self.trackers.close(failed)

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
        if self.plain_progress:
            return _PlainProgress(total, desc, initial, self.print)
        if not self.show_progress:
            return _NoBar()
        return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=False)


class RunClock:
    """Where a run's wall time goes, by phase, over every process that worked on it.

    This process's phases are laps from its start (start-up: imports, the process group, finding a
    checkpoint; data: the tokenizer and the tokenized splits; model: loading it, the optimizer and a
    checkpoint's state) and the time inside checkpoint writes. A resumed run adds what its earlier
    processes had spent up to their last checkpoint (``state_dict`` is saved in each checkpoint).
    Training and evaluation come from the epoch records, which cover the whole run already."""

    PHASES = ("start-up", "data", "model", "checkpoints")

    def __init__(self, started: float):
        self.started = self._mark = started
        self.phases = dict.fromkeys(self.PHASES, 0.0)
        self.before = {"wall_s": 0.0, "processes": 0, **dict.fromkeys(self.PHASES, 0.0)}

    def lap(self, phase: str) -> None:
        """The time since the last lap (or the start) was spent on ``phase``."""
        now = time.perf_counter()
        self.phases[phase] += now - self._mark
        self._mark = now

    @contextlib.contextmanager
    def timing(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] += time.perf_counter() - t0

    def state_dict(self) -> dict:
        return {"wall_s": self.before["wall_s"] + time.perf_counter() - self.started,
                "processes": self.before["processes"] + 1,
                **{p: self.before[p] + self.phases[p] for p in self.PHASES}}

    def load_state_dict(self, saved: dict) -> None:
        self.before = {**self.before, **saved}

    def breakdown(self, results: list) -> dict:
        """Seconds per phase over the whole run, and ``other`` for the rest (logging, building the step
        runner and loaders' iterators, the loop's own work), with ``total`` and the number of processes."""
        now = self.state_dict()
        out = {p: now[p] for p in self.PHASES[:3]}
        out["training"] = sum(r["epoch_time_s"] for r in results)
        out["evaluation"] = sum(r["eval_time_s"] for r in results)
        out["checkpoints"] = now["checkpoints"]
        out["other"] = now["wall_s"] - sum(out.values())
        return {**{k: round(v, 2) for k, v in out.items()}, "total": round(now["wall_s"], 2),
                "processes": now["processes"]}


def format_breakdown(b: dict) -> str:
    parts = " | ".join(f"{k} {b[k]:.1f}s" for k in ("start-up", "data", "model", "training", "evaluation",
                                                    "checkpoints", "other"))
    over = f" over {b['processes']} processes (resumed)" if b["processes"] > 1 else ""
    return f"time: {parts} | total {b['total']:.1f}s{over}"
