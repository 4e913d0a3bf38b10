"""Whole training steps as CUDA graphs: forward, loss, backward, clipping and AdamW in one launch.

An eager step of a small encoder launches well over a thousand kernels, and on a fast GPU the
host takes longer to launch them than the GPU takes to run them. Recording the whole step once
per batch shape and replaying the recording costs the host one launch per step. (Graphs of the
forward and backward alone, as ``torch.compile(mode="reduce-overhead")`` records them, leave
clipping, the optimizer and the metric updates to the host: about as slow again.)

What keeps it correct:

- Everything a replay reads or writes apart from its scratch memory exists before any capture:
  parameters, gradients (zeroed in place, never set to None), optimizer state, the learning-rate
  tensors, the input buffers and the step's outputs. The graphs share one scratch pool, which is
  safe because they run one at a time and nothing in it outlives a replay.
- The first batch of each shape runs as an ordinary eager step on the capture stream, so lazy
  set-up (optimizer state, cuBLAS workspaces, compilation and autotuning) never happens during a
  capture; the second batch of that shape records the graph and replays it.
- AdamW reads its learning rate from a device tensor filled from the scheduler's float before
  each replay; the scheduler, checkpoints and resume keep plain floats.
- Dropout draws from the CUDA generator, whose offset advances on every replay.
- Memory: the graphs' scratch pool stays reserved between replays. When an eager first step of a
  new shape (or a recording) then runs out of memory, all graphs are dropped, their memory freed,
  and the step runs again eagerly; dropped shapes are recorded again when they next come. The
  third time, graphs are given up for the run, as they are at once when a step cannot be
  recorded at all: training goes on eagerly, with a warning, and the run's end says so.

One optimizer step per batch: no gradient accumulation, no skipped steps (the caller refuses
those), one process (not under DDP).
"""
from __future__ import annotations

import contextlib
import gc
import warnings
from typing import Optional

import torch

from training.metrics import ClassificationMetrics

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MAX_RELEASES = 3  # memory too tight for graphs beside eager first steps: stop recording after this


class StepGraphs:
    """Runs training steps, each on one batch; replays a recorded CUDA graph from a shape's second batch on."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, amp_dtype: Optional[torch.dtype],
                 max_grad_norm: float, num_labels: int, device: torch.device):
        self.model, self.optimizer = model, optimizer
        self.amp_dtype, self.max_grad_norm, self.device = amp_dtype, max_grad_norm, device
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.criterion = torch.nn.CrossEntropyLoss(reduction="sum")
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict = {}      # batch shape -> (graph, static input buffers)
        self.warmed: set = set()    # shapes that have run once eagerly
        self.releases = 0           # times out of memory beside the graphs (all graphs dropped each time)
        self.given_up: Optional[str] = None  # why graphs were given up for the rest of the run
        self.lrs = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=device) for g in optimizer.param_groups]
        # the step's outputs, read after each replay: the summed loss and the step's metric sums
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        self.step_metrics = ClassificationMetrics(device, num_labels)

    @property
    def captured(self) -> int:
        return len(self.graphs)

    def _step(self, batch: dict) -> None:
        self.optimizer.zero_grad(set_to_none=False)
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        # cache_enabled=False: cached bf16 copies of the weights would outlive the capture that made them
        with torch.autocast("cuda", dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None,
                            cache_enabled=False):
            logits = self.model(**inputs).logits
        loss_sum = self.criterion(logits.float(), batch["labels"])
        # the outputs first: an out-of-memory error can then only come before the optimizer step
        self.step_metrics.totals.zero_()
        self.step_metrics.update(loss_sum, logits, batch["labels"])
        self.loss_sum.copy_(loss_sum.detach())
        (loss_sum / batch["labels"].shape[0]).backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()

    @contextlib.contextmanager
    def _device_lr(self):
        """During a capture, AdamW reads the learning rate from ``self.lrs`` (capturable mode)."""
        groups = self.optimizer.param_groups
        saved = [(g["lr"], g["capturable"]) for g in groups]
        for g, lr in zip(groups, self.lrs):
            g["lr"], g["capturable"] = lr, True
        try:
            yield
        finally:
            for g, (lr, capturable) in zip(groups, saved):
                g["lr"], g["capturable"] = lr, capturable

    def _eager(self, static: dict) -> None:
        try:
            self._step(static)
            return
        except torch.OutOfMemoryError:
            if not self.graphs:
                raise
        # Out of the except block, so the failed attempt's tensors (held by its traceback) are freed.
        self._release("out of memory")  # the graphs' memory plus this step's did not fit
        self._step(static)

    def _release(self, why: str) -> None:
        """Frees every graph and its memory; warmed shapes are recorded again when next seen. The
        MAX_RELEASES-th time out of memory, or when a step cannot be recorded at all, graphs are given
        up for the run."""
        self.graphs.clear()
        if why == "out of memory":
            self.releases += 1
            if self.releases >= MAX_RELEASES:
                self.given_up = f"out of memory beside the graphs {self.releases} times"
        else:
            self.given_up = why
        if self.given_up:
            warnings.warn(f"CUDA graphs given up, training goes on eagerly: {self.given_up}")
        torch.cuda.synchronize(self.device)
        gc.collect()
        torch.cuda.empty_cache()

    def _record(self, key: tuple, static: dict) -> Optional[torch.cuda.CUDAGraph]:
        graph, failure = torch.cuda.CUDAGraph(), None
        try:
            # thread_local: the DataLoader's pin-memory thread may call CUDA while this thread records
            with self._device_lr(), torch.cuda.graph(graph, pool=self.pool, stream=self.stream,
                                                     capture_error_mode="thread_local"):
                self._step(static)
        except torch.OutOfMemoryError:
            failure = "out of memory"
        except Exception as exc:  # something in the step cannot be recorded (a host sync, say)
            # The first error is the cause; ending the spoiled recording raises another on top of it.
            # (torch 2.11 then also keeps that recording's memory reserved: lost once, as graphs stop here.)
            while exc.__context__ is not None:
                exc = exc.__context__
            first_line = (str(exc).strip().splitlines() or [""])[0]
            failure = f"the step cannot be recorded: {type(exc).__name__}: {first_line}"
        if failure is None:
            self.graphs[key] = (graph, static)
            return graph
        graph = None  # frees the partial recording
        self._release(failure)
        self._step(static)  # nothing ran while recording: run the step now, eagerly
        return None

    def summary(self) -> str:
        out = f"CUDA graphs: {len(self.warmed)} batch shapes, {self.captured} recorded at the end"
        if self.given_up:
            return f"{out}; given up ({self.given_up}), the rest trained eagerly"
        return out + (f"; all dropped {self.releases} time(s) to free memory" if self.releases else "")

    def __call__(self, batch: dict) -> tuple:
        """One optimizer step on ``batch`` (host tensors). Returns (summed loss, metric sums) as device
        tensors that the next call overwrites: add them up before calling again."""
        names = [k for k in (*MODEL_INPUTS, "labels") if k in batch]
        key = tuple((k, tuple(batch[k].shape)) for k in names)
        entry = self.graphs.get(key)
        if self.given_up:
            self.warmed.add(key)
            self._step({k: batch[k].to(self.device, non_blocking=True) for k in names})
            return self.loss_sum, self.step_metrics.totals
        if entry is not None:
            graph, static = entry
            for k in names:
                static[k].copy_(batch[k], non_blocking=True)
        else:
            static = {k: batch[k].to(self.device, non_blocking=True) for k in names}
            current = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                if key in self.warmed:
                    graph = self._record(key, static)
                else:
                    self._eager(static)  # a real step, run eagerly
                    self.warmed.add(key)
                    graph = None
            current.wait_stream(self.stream)
            if graph is None:
                return self.loss_sum, self.step_metrics.totals
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            lr.fill_(group["lr"])
        graph.replay()
        return self.loss_sum, self.step_metrics.totals
