"""Checkpoints: the model in Hugging Face format (safetensors, label names in its config,
loadable by ``transformers.pipeline``) plus a training-state file for resuming.

A checkpoint directory is written under a temporary name and renamed into place,
so a reader sees either the whole previous checkpoint or the whole new one.
Only the main process writes; ``CheckpointWriter`` decides that by itself.
"""
from __future__ import annotations

import io
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import load_file

from training.distributed import ProcessContext
from training.utils import FILE_MODE

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
        (tmp / TRAINING_STATE).write_bytes(buf.getvalue())
        for f in tmp.rglob("*"):  # every file on disk before the rename makes the checkpoint visible
            if f.is_file():
                os.chmod(f, FILE_MODE)  # safetensors writes 0600: teammates on a shared disk could not read it
                with open(f, "rb+") as fh:
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


STEP_DIR = "checkpoints"  # RUN/checkpoints/step-00000123: resumable states, the newest K kept


class CheckpointError(Exception):
    """A checkpoint that cannot be used (truncated, unreadable, or from another setup)."""


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def training_state(optimizer, scheduler, *, loop: dict, rng: list, run: dict, tracker: dict | None = None) -> dict:
    """Everything besides the weights that an exact resume needs (``rng`` holds one entry per rank).

    ``run`` says what the run was: its config, world size, label names, tokenizer and task.
    """
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "loop": loop, "rng": rng, "tracker": tracker or {},
        "epochs_completed": len(loop.get("results", [])), "global_step": loop["global_step"],
        **run,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0]},
    }


def load_training_state(path: Path, map_location="cpu") -> dict:
    return torch.load(Path(path) / TRAINING_STATE, map_location=map_location, weights_only=False)


def verify_checkpoint(path: Path) -> dict:
    """Read a checkpoint completely; CheckpointError names what is wrong with it."""
    path = Path(path)
    if not (path / TRAINING_STATE).is_file() or not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {TRAINING_STATE} or model.safetensors)")
    try:
        state = load_training_state(path)
    except Exception as exc:
        raise CheckpointError(f"{path / TRAINING_STATE} is unreadable ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:120]})") from None
    try:
        load_file(path / "model.safetensors")
    except Exception as exc:
        raise CheckpointError(f"{path / 'model.safetensors'} is unreadable ({' '.join(str(exc).split())[:120]})") \
            from None
    if "loop" not in state:
        raise CheckpointError(f"{path} holds no training state to resume from")
    return state


def step_checkpoints(run_dir: Path) -> list:
    """The run's step checkpoints, newest first (temporary or half-written names are not listed)."""
    root = Path(run_dir) / STEP_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


class CheckpointWriter:
    """Writes checkpoints on the main process only; every rank may call it, others do nothing."""

    def __init__(self, run_dir: Path, ctx: ProcessContext, keep: int = 2):
        self.run_dir = Path(run_dir)
        self.ctx = ctx
        self.keep = keep

    def save(self, name: str, model, tokenizer, state: dict) -> Path:
        path = self.run_dir / name
        if self.ctx.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(path, model, tokenizer, state)
        # Others wait here so nobody reads or exits before the checkpoint exists.
        self.ctx.barrier()
        return path

    def save_step(self, model, tokenizer, state: dict) -> Path:
        """A resumable checkpoint named by its step; only the newest ``keep`` stay."""
        path = self.save(f"{STEP_DIR}/step-{state['global_step']:08d}", model, tokenizer, state)
        if self.ctx.is_main:
            for old in [p for p in step_checkpoints(self.run_dir) if p != path][self.keep - 1:]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def discard_after(self, step: int) -> None:
        """On resume: step checkpoints past the resume point belong to a continuation now abandoned."""
        if self.ctx.is_main:
            for path in step_checkpoints(self.run_dir):
                if int(path.name[5:]) > step:
                    shutil.rmtree(path, ignore_errors=True)
        self.ctx.barrier()
