"""What a run hands back to its caller: ``fit()``'s return value, the sweep's outcome of a trial, the CLI's exit code."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class RunResult:
    """A finished (or stopped) run.

    ``epochs`` holds each epoch's record as metrics.jsonl has it (``train_loss``, ``val_accuracy``, ...,
    ``epoch_time_s``); ``best_metrics`` and ``final_metrics`` are the validation metrics of the best and the
    last epoch, keyed by metric name (``accuracy``, ``macro_f1``, ``loss`` for a single-label task). A run
    stopped by a signal (``completed`` False) has its epochs so far and no summary: the same settings with
    ``resume="auto"`` and the same ``run_name`` continue it.
    """
    run_dir: Path
    completed: bool
    epochs: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)  # summary.json, as written
    config: dict = field(default_factory=dict)   # the resolved training settings, by flag name
    exit_code: int = 0  # what the command line exits with: 0, or 128 + the signal that stopped the run

    @property
    def task(self) -> Optional[str]:
        return self.summary.get("task")

    @property
    def metric_for_best(self) -> Optional[str]:
        return self.summary.get("metric_for_best")

    @property
    def best_epoch(self) -> Optional[int]:
        return self.summary.get("best_epoch")

    def _metrics(self, prefix: str) -> dict:
        return {m: self.summary[f"{prefix}_val_{m}"] for m in self.summary.get("metrics", [])}

    @property
    def best_metrics(self) -> dict:
        """Validation metrics of the epoch ``best/`` holds (chosen by ``metric_for_best``)."""
        return self._metrics("best")

    @property
    def final_metrics(self) -> dict:
        """Validation metrics of the last epoch (``final/``)."""
        return self._metrics("final")

    @property
    def test_metrics(self) -> dict:
        """best/'s metrics on the test set (``test_file``, or ``fit(..., test_data=...)``), scored once when the
        run ended; empty without one."""
        return dict(self.summary.get("test_metrics") or {})

    @property
    def best_checkpoint(self) -> Optional[Path]:
        return Path(self.summary["best_checkpoint"]) if "best_checkpoint" in self.summary else None

    @property
    def final_checkpoint(self) -> Optional[Path]:
        return Path(self.summary["checkpoint"]) if "checkpoint" in self.summary else None

    @property
    def time_breakdown(self) -> dict:
        """Seconds by phase: start-up, data, model, training, evaluation, checkpoints, other and total."""
        return dict(self.summary.get("time_breakdown_s", {}))

    @classmethod
    def read(cls, run_dir: Path) -> "RunResult":
        """The result of a finished run from its directory (summary.json and metrics.jsonl's epoch records)."""
        run_dir = Path(run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        epochs = []
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                record = json.loads(line) if line.strip() else {}
                if record.get("event") == "epoch":
                    epochs.append({k: v for k, v in record.items() if k not in ("event", "elapsed_s")})
        config = json.loads((run_dir / "config.json").read_text())["config"]
        return cls(run_dir, True, epochs, summary, config)
