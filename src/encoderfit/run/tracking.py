"""Experiment tracking (``--report_to tensorboard,mlflow,wandb``): the metrics metrics.jsonl holds, sent to the
trackers teams use, by the main process alone.

Each tracker gets the same things: the resolved config as parameters (hyperparameters) when the run starts, the
step and epoch metrics as they are recorded (``step/loss``, ``epoch/val_accuracy``, ... at the optimizer step),
and when the run ends the summary's final and best metrics and the model card (final/README.md) as an artifact.
Where each writes is its own library's: TensorBoard under RUN/tensorboard; MLflow where ``MLFLOW_TRACKING_URI``
points (its default: ./mlflow.db beside ./mlruns), experiment ``MLFLOW_EXPERIMENT_NAME`` or "encoderfit";
Weights & Biases project ``WANDB_PROJECT`` or "encoderfit", files under RUN/wandb (``WANDB_MODE=offline`` works
without a network). A tracking run is named as the run directory; a resumed run opens a new one of the same name.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

from encoderfit.utils import UserError

TRACKERS = ("tensorboard", "mlflow", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def parse_report_to(value: Optional[str], tensorboard: bool = False) -> tuple:
    """The trackers ``--report_to`` names (comma-separated; "none" for none), with --tensorboard's, in order."""
    names = [n.strip().lower() for n in (value or "").split(",") if n.strip()]
    if "none" in names and len(names) > 1:
        raise UserError(f"--report_to none cannot go with other trackers, got {value!r}")
    unknown = [n for n in names if n not in TRACKERS + ("none",)]
    if unknown:
        raise UserError(f"--report_to: unknown tracker {unknown[0]!r}: choose from {', '.join(TRACKERS)} (several "
                        f"comma-separated), or none")
    chosen = [n for n in names if n != "none"] + (["tensorboard"] if tensorboard else [])
    return tuple(dict.fromkeys(chosen))


def check_installed(names) -> None:
    """Each tracker's package importable, before any work (UserError naming the install)."""
    import importlib.util

    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            extra = "" if name == "tensorboard" else f" (pip install 'encoderfit[{name}]')"
            raise UserError(f"--report_to {name} needs the {PACKAGES[name]} package: pip install "
                            f"{PACKAGES[name]}{extra}")


def _plain(value):
    """A parameter's value as the trackers take it (numbers, strings and booleans; None as "None")."""
    if value is None or isinstance(value, (list, tuple, dict)):
        return str(value)
    return value


def _numbers(values: dict) -> dict:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoard:
    def __init__(self, run_dir: Path, name: str, params: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.params = params

    def scalars(self, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, final: dict, card: Optional[Path]) -> None:
        # the hyperparameters tab: the config beside the run's final and best metrics
        self.writer.add_hparams({k: _plain(v) for k, v in self.params.items()}, {f"hparam/{k}": v for k, v in
                                                                                 final.items()}, run_name=".")
        if card is not None:
            self.writer.add_text("model_card", card.read_text(encoding="utf-8"))

    def close(self, failed: bool) -> None:
        self.writer.close()


class MLflow:
    def __init__(self, run_dir: Path, name: str, params: dict):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or "encoderfit")
        self.run = mlflow.start_run(run_name=name)
        mlflow.log_params({k: _plain(v) for k, v in params.items()})

    def scalars(self, values: dict, step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def finish(self, final: dict, card: Optional[Path]) -> None:
        self.mlflow.log_metrics(final)
        if card is not None:
            self.mlflow.log_artifact(str(card))

    def close(self, failed: bool) -> None:
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")


class Wandb:
    def __init__(self, run_dir: Path, name: str, params: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "encoderfit", name=name, config=params,
                              dir=str(run_dir), reinit="finish_previous")

    def scalars(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def finish(self, final: dict, card: Optional[Path]) -> None:
        self.run.summary.update(final)
        if card is not None:
            self.run.save(str(card), base_path=str(card.parent), policy="now")

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


KINDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": Wandb}


class Trackers:
    """The trackers of one run (main process only; empty elsewhere): one call reaches them all."""

    def __init__(self):
        self.open = []

    def start(self, names, run_dir: Path, params: dict) -> None:
        for name in names:
            try:
                self.open.append(KINDS[name](run_dir, run_dir.name, params))
            except UserError:
                raise
            except Exception as exc:  # a tracker's own failure to start (a bad URI, no login): one line
                raise UserError(f"--report_to {name} cannot start: {' '.join(str(exc).split())[:300]}") from None

    def _each(self, what: str, call) -> None:
        """``call(tracker)`` for each open tracker; one that fails (a network error) is said once and dropped,
        and the run goes on: tracking is not worth a run."""
        import sys

        for tracker in list(self.open):
            try:
                call(tracker)
            except Exception as exc:  # noqa: BLE001 - the tracker's own library, any failure
                self.open.remove(tracker)
                print(f"warning: {type(tracker).__name__} failed to {what} ({' '.join(str(exc).split())[:200]}): "
                      f"no longer reporting to it", file=sys.stderr, flush=True)

    def scalars(self, group: str, values: dict, step: int) -> None:
        if self.open:
            numbers = {f"{group}/{k}": v for k, v in _numbers(values).items() if k not in ("epoch", "step")}
            self._each("log metrics", lambda tracker: tracker.scalars(numbers, step))

    def finish(self, summary: dict, card: Optional[Path]) -> None:
        """The summary's numbers (final_val_*, best_val_*, the test set's, best_epoch, time) and the model card."""
        final = _numbers({k: v for k, v in summary.items() if k.startswith(("final_val_", "best_val_"))
                          or k in ("best_epoch", "epochs_run", "total_time_s", "train_samples_per_s")})
        final.update({f"test_{k}": v for k, v in _numbers(summary.get("test_metrics") or {}).items()})
        card = card if card is not None and card.is_file() else None
        self._each("take the final metrics", lambda tracker: tracker.finish(final, card))

    def close(self, failed: bool = False) -> None:
        while self.open:
            self.open.pop().close(failed)
