"""Checkpoints: the model in Hugging Face format (safetensors, label names in its config,
loadable by ``transformers.pipeline``) plus a training-state file for resuming.

A checkpoint directory is written under a temporary name and renamed into place,
so a reader sees either the whole previous checkpoint or the whole new one.
Only the main process writes; ``CheckpointWriter`` decides that by itself.
"""
from __future__ import annotations

import io
import os
import shutil
import sys
from pathlib import Path

import torch
import transformers

from training.distributed import ProcessContext

TRAINING_STATE = "training_state.pt"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out_dir: Path, model, tokenizer, training_state: dict) -> Path:
    """Write model + tokenizer + training state to ``out_dir`` atomically (temp dir, then rename)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        unwrap(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        buf = io.BytesIO()
        torch.save(training_state, buf)
        with open(tmp / TRAINING_STATE, "wb") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if out_dir.exists():  # replace: move the old one aside first, so the swap is two renames
            old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
        _fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def training_state(optimizer, scheduler, *, epoch: int, global_step: int, config: dict) -> dict:
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "global_step": global_step,
        "config": config,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0]},
    }


def load_training_state(path: Path, map_location="cpu") -> dict:
    return torch.load(Path(path) / TRAINING_STATE, map_location=map_location, weights_only=False)


class CheckpointWriter:
    """Writes checkpoints on the main process only; every rank may call it, others do nothing."""

    def __init__(self, run_dir: Path, ctx: ProcessContext):
        self.run_dir = Path(run_dir)
        self.ctx = ctx

    def save(self, name: str, model, tokenizer, state: dict) -> Path:
        path = self.run_dir / name
        if self.ctx.is_main:
            save_checkpoint(path, model, tokenizer, state)
        # Others wait here so nobody reads or exits before the checkpoint exists.
        self.ctx.barrier()
        return path
