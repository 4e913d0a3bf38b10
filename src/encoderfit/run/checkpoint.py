"""Checkpoints: the model in Hugging Face format (safetensors, label names in its config,
loadable by ``transformers.pipeline``) plus a training-state file for resuming.

A checkpoint directory is written under a temporary name and renamed into place,
so a reader sees either the whole previous checkpoint or the whole new one.
Only the main process writes; ``CheckpointWriter`` decides that by itself, and finishes each step
checkpoint (the training state, the fsyncs, the rename) on a thread of its own while training goes on.
"""
from __future__ import annotations

import io
import os
import random
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import load_file

from encoderfit.engine.distributed import ProcessContext
from encoderfit.utils import FILE_MODE

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


def _temporary(out_dir: Path) -> Path:
    """The empty temporary directory that becomes ``out_dir`` when committed."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _filling(tmp: Path, fill) -> None:
    """``fill(tmp)``; on any failure the temporary directory goes, so nothing half-written is left."""
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_atomically(out_dir: Path, fill) -> Path:
    """``fill(tmp)`` writes the checkpoint's files into a temporary directory, which then replaces ``out_dir``."""
    out_dir = Path(out_dir)
    tmp = _temporary(out_dir)
    _filling(tmp, lambda t: (fill(t), _commit(t, out_dir)))
    return out_dir


def _save_model(tmp: Path, model, tokenizer) -> None:
    unwrap(model).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)


def _save_state(tmp: Path, training_state: dict) -> None:
    buf = io.BytesIO()
    torch.save(training_state, buf)
    (tmp / TRAINING_STATE).write_bytes(buf.getbuffer())  # the buffer itself, not a copy of it


def save_checkpoint(out_dir: Path, model, tokenizer, training_state: dict | None) -> Path:
    """Write model + tokenizer (+ the training state, unless None) to ``out_dir`` atomically."""
    def fill(tmp: Path) -> None:
        _save_model(tmp, model, tokenizer)
        if training_state is not None:
            _save_state(tmp, training_state)
    return _write_atomically(out_dir, fill)


def to_host(obj):
    """A copy of ``obj`` that training can no longer change: its tensors copied to CPU memory (a tensor
    found twice, as tied weights are, is copied once), its dicts, lists and tuples new; other values as
    they are."""
    memo = {}

    def copy(x):
        if isinstance(x, torch.Tensor):
            key = (x.device, x.data_ptr(), x.dtype, tuple(x.shape), x.stride())
            if key not in memo:
                memo[key] = x.detach().to("cpu", copy=True)
            return memo[key]
        if isinstance(x, dict):
            return type(x)((k, copy(v)) for k, v in x.items())
        if isinstance(x, tuple) and hasattr(x, "_fields"):  # a named tuple
            return type(x)(*(copy(v) for v in x))
        if isinstance(x, (list, tuple)):
            return type(x)(copy(v) for v in x)
        return x
    return copy(obj)


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


def training_state(optimizer, scheduler, *, loop: dict, rng: list, run: dict, tracker: dict | None = None,
                   scaler=None) -> dict:
    """Everything besides the weights that an exact resume needs (``rng`` holds one entry per rank).

    ``run`` says what the run was: its config, world size, label names, tokenizer and task.
    """
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        # fp16: the loss scale, its growth tracker and the count of skipped steps
        **({"scaler": {**scaler.state_dict(), "overflows": int(scaler.overflows.item())}} if scaler is not None
           else {}),
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


class _Cancelled(Exception):
    """A write dropped before its commit (``CheckpointWriter.settle(cancel=True)``)."""


class CheckpointWriter:
    """Writes checkpoints on the main process only; every rank may call it, others do nothing.

    ``RUN/checkpoints/step-N`` are resumable (model, tokenizer, training state); ``RUN/best`` and
    ``RUN/final`` are what a user deploys: the model and tokenizer alone, sharing the files of the step
    checkpoint of the same step (hard links), so a model is on disk once however many names it has.

    Off the training thread: a step checkpoint's model and tokenizer are written at once (transformers'
    ``save_pretrained``, on the caller's thread), its training state is copied to host memory, and the
    rest (the training state's file, the fsyncs, the rename that makes it visible, the older checkpoints'
    deletion, the links of best/ and final/) runs on one writer thread, in the order asked, while training
    goes on. At most one step checkpoint is in flight. ``wait`` (the end of a run, a stop) returns once all
    of it is on disk, or raises the first write's error; a failed write drops the writes queued behind it,
    so nothing links to or deletes for a checkpoint that does not exist."""

    def __init__(self, run_dir: Path, ctx: ProcessContext, keep: int = 2):
        self.run_dir = Path(run_dir)
        self.ctx = ctx
        self.keep = keep
        self.newest = None  # (global step, path): the step checkpoint written last, or resumed from
        self._thread = None  # the writer thread (started by the first write, ended by each settle)
        self._pending = []   # its jobs not yet known to be done
        self._error = None   # the first failed job's error, raised by settle
        self._cancel = threading.Event()  # set by settle(cancel=True): the job in flight stops short of its commit

    def _submit(self, job, *args, dropped=None) -> None:
        """``job(*args)`` on the writer thread; ``dropped()`` instead if it does not run."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
        self._pending.append(self._thread.submit(self._run, job, args, dropped))

    def _run(self, job, args, dropped) -> None:
        if self._error is not None or self._cancel.is_set():  # behind a failed or cancelled write, nothing runs
            if dropped is not None:
                dropped()
            return
        try:
            job(*args)
        except BaseException as exc:
            self._error = exc

    def settle(self, *, raising: bool = True, cancel: bool = False) -> None:
        """This process's writes asked for so far are on disk when it returns (or raises the first one's
        error; ``raising=False``, while another error ends the run: says it on stderr instead).
        ``cancel`` (a second Ctrl-C, which stops at once): the writes not yet committed are dropped, their
        temporaries deleted, so the newest checkpoint on disk is the one before."""
        if cancel:
            self._cancel.set()
        try:
            for job in self._pending:
                job.result()
            self._pending = []
            if self._thread is not None:
                self._thread.shutdown()
                self._thread = None
        finally:
            if not self._pending:
                self._cancel.clear()
        error, self._error = self._error, None
        if error is not None:
            if raising:
                raise error
            print(f"note: a checkpoint write failed too: {type(error).__name__}: {error}", file=sys.stderr)

    def wait(self) -> None:
        """Every write asked for so far is on disk, on every rank's word (a barrier)."""
        if self.ctx.is_main:
            self.settle()
        self.ctx.barrier()  # nobody reads or exits before the checkpoints exist

    def adopt(self, path: Path, step: int) -> None:
        """On resume: the checkpoint resumed from holds the weights of ``step`` (one of this run's step
        checkpoints only: best/ and final/ are never linked to anything outside them, or to themselves)."""
        if self.ctx.is_main and Path(path).parent.resolve() == (self.run_dir / STEP_DIR).resolve():
            self.newest = (step, Path(path))

    def save_step(self, model, tokenizer, state: dict) -> Path:
        """A resumable checkpoint named by its step; only the newest ``keep`` stay. Finished on the writer
        thread: ``wait`` for it to be on disk."""
        path = self.run_dir / STEP_DIR / f"step-{state['global_step']:08d}"
        if self.ctx.is_main:
            self.settle()  # the previous one first: one training state in host memory at a time
            host_state = to_host(state)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temporary(path)
            _filling(tmp, lambda t: _save_model(t, model, tokenizer))
            self._submit(self._finish_step, tmp, path, host_state,
                         dropped=lambda: shutil.rmtree(tmp, ignore_errors=True))
        self.newest = (state["global_step"], path)
        return path

    def _finish_step(self, tmp: Path, path: Path, state: dict) -> None:
        def fill(t: Path) -> None:
            for part in (lambda: _save_state(t, state), lambda: _commit(t, path)):
                if self._cancel.is_set():  # checked before each part: a commit begun is finished
                    raise _Cancelled
                part()
        try:
            _filling(tmp, fill)
        except _Cancelled:
            return
        for old in [p for p in step_checkpoints(self.run_dir) if p != path][self.keep - 1:]:
            shutil.rmtree(old, ignore_errors=True)

    def save_model(self, name: str, model, tokenizer, step: int) -> Path:
        """``RUN/name``: the model and tokenizer at ``step``, linked to its step checkpoint where one exists
        (on the writer thread, after that checkpoint's own write), else written at once."""
        path = self.run_dir / name
        if self.ctx.is_main:
            if self.newest and self.newest[0] == step:
                self._submit(link_checkpoint, path, self.newest[1])
            else:
                save_checkpoint(path, model, tokenizer, None)
        return path

    def finish(self, state: dict) -> None:
        """A finished run has nothing left to resume: the older step checkpoints go, and the newest keeps
        its model (shared with final/) and a training state without the optimizer's, which is what
        ``--resume auto`` needs to say the run is complete. Returns once everything is on disk."""
        if self.ctx.is_main and self.newest and self.newest[0] == state["global_step"]:
            slim = {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "scaler")}
            self._submit(self._trim, self.newest[1], to_host({**slim, "finished": True}))
        self.wait()

    def _trim(self, newest: Path, state: dict) -> None:
        for old in step_checkpoints(self.run_dir):
            if old != newest:
                shutil.rmtree(old, ignore_errors=True)
        write_state(newest, state)

    def discard_after(self, step: int) -> None:
        """On resume: step checkpoints past the resume point belong to a continuation now abandoned."""
        if self.ctx.is_main:
            for path in step_checkpoints(self.run_dir):
                if int(path.name[5:]) > step:
                    shutil.rmtree(path, ignore_errors=True)
        self.ctx.barrier()
