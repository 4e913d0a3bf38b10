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


def _commit(tmp: Path, out_dir: Path) -> None:
    """Make the written ``tmp`` visible as ``out_dir``: every file fsynced, then renamed into place."""
    for f in tmp.rglob("*"):  # every file on disk before the rename makes the checkpoint visible
        if f.is_file() and f.stat().st_nlink == 1:  # a hard link is to a file already on disk, with its mode
            os.chmod(f, FILE_MODE)  # safetensors writes 0600: teammates on a shared disk could not read it
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if out_dir.exists():  # replace: move the old one aside first, so the swap is two renames
        old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)  # left by a process of the same pid that died deleting it
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    _fsync_dir(out_dir.parent)


def _write_atomically(out_dir: Path, fill) -> Path:
    """``fill(tmp)`` writes the checkpoint's files into a temporary directory, which then replaces ``out_dir``."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        _commit(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_checkpoint(out_dir: Path, model, tokenizer, training_state: dict | None) -> Path:
    """Write model + tokenizer (+ the training state, unless None) to ``out_dir`` atomically."""
    def fill(tmp: Path) -> None:
        unwrap(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if training_state is not None:
            buf = io.BytesIO()
            torch.save(training_state, buf)
            (tmp / TRAINING_STATE).write_bytes(buf.getvalue())
    return _write_atomically(out_dir, fill)


def link_checkpoint(out_dir: Path, source: Path) -> Path:
    """``out_dir`` as the model and tokenizer of the checkpoint ``source``, without its training state:
    hard links to its files, so the weights are on disk once (copies where the filesystem has no links)."""
    def fill(tmp: Path) -> None:
        for f in Path(source).iterdir():
            if f.is_file() and f.name != TRAINING_STATE and not f.name.startswith("."):  # no temporaries
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
    return _write_atomically(out_dir, fill)


def write_state(checkpoint_dir: Path, training_state: dict) -> None:
    """Replace a checkpoint's training state alone, atomically (a temporary file, fsynced, renamed)."""
    path = Path(checkpoint_dir) / TRAINING_STATE
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    buf = io.BytesIO()
    torch.save(training_state, buf)
    with open(tmp, "wb") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
    """Writes checkpoints on the main process only; every rank may call it, others do nothing.

    ``RUN/checkpoints/step-N`` are resumable (model, tokenizer, training state); ``RUN/best`` and
    ``RUN/final`` are what a user deploys: the model and tokenizer alone, sharing the files of the step
    checkpoint of the same step (hard links), so a model is on disk once however many names it has."""

    def __init__(self, run_dir: Path, ctx: ProcessContext, keep: int = 2):
        self.run_dir = Path(run_dir)
        self.ctx = ctx
        self.keep = keep
        self.newest = None  # (global step, path): the step checkpoint written last, or resumed from

    def adopt(self, path: Path, step: int) -> None:
        """On resume: the checkpoint resumed from holds the weights of ``step`` (one of this run's step
        checkpoints only: best/ and final/ are never linked to anything outside them, or to themselves)."""
        if self.ctx.is_main and Path(path).parent.resolve() == (self.run_dir / STEP_DIR).resolve():
            self.newest = (step, Path(path))

    def save_step(self, model, tokenizer, state: dict) -> Path:
        """A resumable checkpoint named by its step; only the newest ``keep`` stay."""
        path = self.run_dir / STEP_DIR / f"step-{state['global_step']:08d}"
        if self.ctx.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(path, model, tokenizer, state)
            for old in [p for p in step_checkpoints(self.run_dir) if p != path][self.keep - 1:]:
                shutil.rmtree(old, ignore_errors=True)
        self.ctx.barrier()  # nobody reads or exits before the checkpoint exists
        self.newest = (state["global_step"], path)
        return path

    def save_model(self, name: str, model, tokenizer, step: int) -> Path:
        """``RUN/name``: the model and tokenizer at ``step``, linked to its step checkpoint where one exists."""
        path = self.run_dir / name
        if self.ctx.is_main:
            if self.newest and self.newest[0] == step and (self.newest[1] / "model.safetensors").is_file():
                link_checkpoint(path, self.newest[1])
            else:
                save_checkpoint(path, model, tokenizer, None)
        self.ctx.barrier()
        return path

    def finish(self, state: dict) -> None:
        """A finished run has nothing left to resume: the older step checkpoints go, and the newest keeps
        its model (shared with final/) and a training state without the optimizer's, which is what
        ``--resume auto`` needs to say the run is complete."""
        if self.ctx.is_main and self.newest and self.newest[0] == state["global_step"]:
            for old in step_checkpoints(self.run_dir):
                if old != self.newest[1]:
                    shutil.rmtree(old, ignore_errors=True)
            slim = {k: v for k, v in state.items() if k not in ("optimizer", "scheduler")}
            write_state(self.newest[1], {**slim, "finished": True})
        self.ctx.barrier()

    def discard_after(self, step: int) -> None:
        """On resume: step checkpoints past the resume point belong to a continuation now abandoned."""
        if self.ctx.is_main:
            for path in step_checkpoints(self.run_dir):
                if int(path.name[5:]) > step:
                    shutil.rmtree(path, ignore_errors=True)
        self.ctx.barrier()
