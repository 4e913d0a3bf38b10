"""Finding the checkpoint to resume from, and refusing one that does not fit this run.

``--resume auto`` picks the newest complete checkpoint of the run (``--run_name``, or the
newest run under ``--checkpoint_dir``) and falls back to an older one, saying so, when the
newest is truncated or unreadable; with nothing to resume it starts fresh, so the same
command serves a first launch and every restart (torchrun ``--max-restarts``).
``--resume PATH`` takes a checkpoint directory, or a run directory (its newest checkpoint).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from encoderfit.run.checkpoint import TRAINING_STATE, CheckpointError, step_checkpoints, verify_checkpoint
from encoderfit.config import TrainConfig, fields_marked
from encoderfit.engine.distributed import ProcessContext
from encoderfit.modeling.long_texts import LongTexts
from encoderfit.tasks.registry import default_metric
from encoderfit.utils import UserError

# Flags that fix the data order, the step count or the model (marked must_match in training/config.py).
MUST_MATCH = fields_marked("must_match")


@dataclass
class ResumePoint:
    run_dir: Path
    checkpoint: Optional[Path]  # None: nothing to resume, start fresh in run_dir
    notes: list


def _newest_valid(run_dir: Path, notes: list) -> Optional[Path]:
    candidates = step_checkpoints(run_dir)
    for path in candidates:
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as exc:
            notes.append(f"checkpoint {path.name} is unusable: {exc}; trying an older one")
    if candidates:
        raise UserError(f"no usable checkpoint in {run_dir / 'checkpoints'}: all {len(candidates)} are damaged")
    return None


def _locate(resume: str, checkpoint_dir: Path, run_name: Optional[str]) -> ResumePoint:
    notes: list = []
    if resume == "auto":
        if run_name:
            run_dir = checkpoint_dir / run_name
        else:
            runs = sorted((p for p in checkpoint_dir.glob("*/checkpoints") if p.is_dir()),
                          key=lambda p: p.stat().st_mtime, reverse=True) if checkpoint_dir.is_dir() else []
            run_dir = runs[0].parent if runs else None
        if run_dir is None or not run_dir.is_dir():
            notes.append("nothing to resume yet: starting a new run")
            return ResumePoint(run_dir, None, notes)
        found = _newest_valid(run_dir, notes)
        if found is None:
            notes.append(f"no checkpoint in {run_dir} yet: starting from the beginning")
        return ResumePoint(run_dir, found, notes)
    path = Path(resume)
    if not path.exists():
        raise UserError(f"--resume {resume}: no such checkpoint or run directory")
    if not path.is_dir():
        raise UserError(f"--resume {resume} is a file: give a run directory (CHECKPOINT_DIR/RUN), one of its "
                        f"checkpoints (RUN/checkpoints/step-N), or auto")
    if (path / TRAINING_STATE).exists():
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            raise UserError(f"--resume {resume}: {exc}") from None
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return ResumePoint(run_dir, path, notes)
    if path.name in ("final", "best") and (path / "model.safetensors").is_file():
        raise UserError(f"--resume {resume}: that is a model alone (final/ and best/ keep no training state): "
                        f"resume the run, --resume {path.parent}")
    found = _newest_valid(path, notes)
    if found is None:
        raise UserError(f"--resume {resume}: no checkpoint in that run directory")
    return ResumePoint(path, found, notes)


def locate(resume: str, checkpoint_dir: str, run_name: Optional[str], ctx: ProcessContext) -> ResumePoint:
    """Rank 0 looks at the files; every rank gets the same answer (or the same error)."""
    return ctx.run_on_main(lambda: _locate(resume, Path(checkpoint_dir), run_name))


# flags whose absence from an older checkpoint does not mean today's default: before --text_pair_column no
# pair was read, which today's default (detect pairs by name) may not reproduce; the fingerprint decides
NO_DEFAULT_BEFORE = ("text_pair_column",)


def check_compatible(state: dict, run: dict, *, where: Path) -> None:
    """A clear error for a checkpoint from another model, labels, tokenizer, data or process count.

    ``run`` is what this run's checkpoints would record (trainer.RunState.run_record)."""
    if "sums" not in state.get("loop", {}):  # the loop state's layout before the task object
        raise UserError(f"{where} was written by an older version of this toolkit and cannot be resumed by this "
                        f"one: start a new run (its final/ and best/ models still load everywhere)")
    saved, config = dict(state["config"]), run["config"]
    if saved.get("metric_for_best") == "f1":  # its earlier name
        saved["metric_for_best"] = "macro_f1"
    # no --metric_for_best means the task's default: compare what each run selects by
    config = dict(config)
    for cfg_, record in ((saved, state.get("task") or {}), (config, run.get("task") or {})):
        if cfg_.get("metric_for_best") is None:
            cfg_["metric_for_best"] = default_metric(record.get("task"))  # an unknown or absent task: single-label
    if state["world_size"] != run["world_size"]:
        raise UserError(f"{where} was saved by {state['world_size']} process(es) and this run has "
                        f"{run['world_size']}: resume with the same number of processes (the data order is "
                        f"sharded by it)")
    if list(state["label_names"]) != list(run["label_names"]):
        raise UserError(f"{where} was trained on labels {state['label_names']}, this data has {run['label_names']}")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    defaults["long_texts"] = "truncate"  # a checkpoint from before --long_texts truncated (today's default: auto)
    pairs = len(run.get("text_columns") or []) == 2  # auto resolved, as the data path resolves it
    for cfg_ in (saved, config):
        cfg_["long_texts"] = LongTexts(cfg_.get("long_texts", "truncate")).for_pairs(pairs).mode
    for key in MUST_MATCH:
        if key in NO_DEFAULT_BEFORE and key not in saved:
            continue  # the data fingerprint below says whether the examples are the same
        # a flag newer than the checkpoint: it was trained with what is now that flag's default
        if saved.get(key, defaults[key]) != config.get(key):
            raise UserError(f"{where} was trained with --{key} {saved.get(key, defaults[key])}, this run has "
                            f"--{key} {config.get(key)}: resume with the same value")
    before, now = state.get("data"), run.get("data")
    if before is not None and now is not None:
        for split in ("train", "validation"):
            if before[split] != now[split]:
                counts = (before[f"{split}_examples"], now[f"{split}_examples"])
                change = "other rows of the same count" if counts[0] == counts[1] else "%d then, %d now" % counts
                hint = ""
                if "text_pair_column" not in saved and len(run.get("text_columns") or []) == 2:
                    hint = (" (this version reads the file as text pairs, "
                            f"{' + '.join(run['text_columns'])}: add --text_pair_column none to read one text as before)")
                raise UserError(f"{where} was trained on other data: the {split} examples changed ({change}){hint}: "
                                f"resume on the data the run started with, or start a new run")
    same_vocab = ("class", "vocab", "hash")  # not the path: a model directory may have moved
    if any(state["tokenizer"].get(k) != run["tokenizer"].get(k) for k in same_vocab):
        raise UserError(f"{where} was trained with another tokenizer ({state['tokenizer']['name']})")
