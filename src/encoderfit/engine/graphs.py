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

The step itself is ``training/step.py``'s ``train_step``, the one the eager runner runs; here it
is recorded with ``recording=True`` (gradients kept in place, no autocast cache) and the step's
normalizer is a device tensor (holding its reciprocal), refilled before each replay like the
learning rate.

One optimizer step per batch: no gradient accumulation, no skipped steps (the caller refuses
those).

Under torchrun (NCCL), the model is not wrapped in DDP: DDP's reducer launches its bucketed
all-reduces from autograd hooks on a side stream, which a capture does not take. Instead every
gradient is a view into one flat buffer, and the step all-reduces that buffer once, between the
backward and the clipping (``FlatGradients``): inside the recording, where NCCL's kernel is
captured like any other, and in the eager steps too. Every rank therefore issues exactly one
all-reduce per step, whether it replays a graph, records one (a capture launches nothing: the
replay that follows it does) or runs eagerly, so ranks that see batch shapes in a different order,
drop their graphs or give them up still pair their collectives. The average is DDP's: the sum over
ranks divided by the world size. The one decision a rank cannot take alone is to run a step again
after it has issued its all-reduce: running out of memory after that point (AdamW's state at the
very first step, say) stops the run instead.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import warnings
from typing import Optional

import torch

from encoderfit.data.batches import Batch
from encoderfit.engine.step import StepContext, StepOutput, scaling_summary, train_step

MAX_RELEASES = 3  # memory too tight for graphs beside eager first steps: stop recording after this


class FlatGradients:
    """Every trainable parameter's gradient as a view into one flat buffer per dtype, averaged over the
    ranks by one all-reduce each (``__call__``). The views stay: gradients are zeroed in place, never
    set to None (the step's ``recording`` mode). So a parameter that the forward never uses gets a zero
    gradient rather than none, and AdamW's weight decay still shrinks it, where DDP's wrapper would
    refuse such a model unless told to look for unused parameters (none of the encoders' classifiers
    has one: XLNet's mask embedding and relative-segment weights are the known cases)."""

    def __init__(self, model: torch.nn.Module, world_size: int):
        import torch.distributed as dist

        self.dist, self.world_size, self.buffers, self.issued = dist, world_size, [], 0
        params = [p for p in model.parameters() if p.requires_grad]
        for dtype in dict.fromkeys(p.dtype for p in params):
            group = [p for p in params if p.dtype == dtype]
            flat = torch.zeros(sum(p.numel() for p in group), dtype=dtype, device=group[0].device)
            offset = 0
            for p in group:
                p.grad = flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
            self.buffers.append(flat)

    def __call__(self) -> None:
        for flat in self.buffers:
            flat.div_(self.world_size)
            self.dist.all_reduce(flat)
        self.issued += 1  # counted on the host, also while recording (the replay that follows runs it)


class StepGraphs:
    """Runs training steps, each on one batch; replays a recorded CUDA graph from a shape's second batch on."""

    def __init__(self, sc: StepContext):
        if sc.skip_nonfinite:
            raise ValueError("a recorded step cannot be skipped: it needs a host sync to know")
        self.flat = None
        if sc.ctx.distributed:
            if isinstance(sc.model, torch.nn.parallel.DistributedDataParallel):
                raise ValueError("recorded steps average the gradients themselves: pass the model unwrapped")
            self.flat = FlatGradients(sc.model, sc.ctx.world_size)
        self.sc = dataclasses.replace(sc, recording=True, grad_sync=self.flat)
        device = self.device = sc.ctx.device
        self.optimizer = sc.optimizer
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict = {}      # batch key -> (graph, static batch, static normalizer, static outputs)
        self.seen: set = set()      # keys that have run once eagerly
        self.releases = 0           # times out of memory beside the graphs (all graphs dropped each time)
        self.given_up: Optional[str] = None  # why graphs were given up for the rest of the run
        self.lrs = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=device)
                    for g in sc.optimizer.param_groups]

    def _run(self, batch: Batch, normalizer) -> StepOutput:
        """The step itself (eager, or inside a capture)."""
        return train_step(self.sc, [batch], normalizer)

    @property
    def recorded(self) -> int:
        return len(self.graphs)

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

    def _eager(self, batch: Batch, normalizer: torch.Tensor) -> StepOutput:
        issued = self.flat.issued if self.flat else 0
        try:
            return self._run(batch, normalizer)
        except torch.OutOfMemoryError:
            if not self.graphs or (self.flat and self.flat.issued != issued):
                raise  # (under DDP, once this step's all-reduce is out, running it again would issue another)
        # Out of the except block, so the failed attempt's tensors (held by its traceback) are freed.
        self._release("out of memory")  # the graphs' memory plus this step's did not fit
        return self._run(batch, normalizer)

    def _release(self, why: str) -> None:
        """Frees every graph and its memory; seen keys are recorded again when next seen. The
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

    def _record(self, key: tuple, batch: Batch, normalizer: torch.Tensor) -> Optional[StepOutput]:
        graph, failure = torch.cuda.CUDAGraph(), None
        try:
            # thread_local: the DataLoader's pin-memory thread may call CUDA while this thread records
            with self._device_lr(), torch.cuda.graph(graph, pool=self.pool, stream=self.stream,
                                                     capture_error_mode="thread_local"):
                out = self._run(batch, normalizer)
        except torch.OutOfMemoryError:
            failure = "out of memory"
        except Exception as exc:  # something in the step cannot be recorded (a host sync, say)
            # The first error is the cause; ending the spoiled recording raises another on top of it.
            while exc.__context__ is not None:
                exc = exc.__context__
            first_line = (str(exc).strip().splitlines() or [""])[0]
            failure = f"the step cannot be recorded: {type(exc).__name__}: {first_line}"
        if failure is None:
            self.graphs[key] = (graph, batch, normalizer, out)
            return out
        graph = out = None  # frees the partial recording
        if failure != "out of memory":  # (running out of memory leaves the capture valid: it ends cleanly)
            self._end_failed_capture()
        self._release(failure)
        return None

    def _end_failed_capture(self) -> None:
        """Undo what a capture that ended in an error leaves behind, so eager steps can go on.

        When the capture was invalidated (a host sync inside it, say), ending it raises before torch
        runs the generator's capture epilogue: the CUDA generator still believes it is capturing, and
        the next eager dropout fails with "Offset increment outside graph capture encountered
        unexpectedly" (torch 2.11). A clone of the generator's state is a non-capturing copy at the
        same seed and offset (the eager offset did not move during the capture), so the random
        sequence goes on as if the recording had never been tried. The caching allocator is likewise
        told that nothing records into the graphs' pool any more. The graphs recorded before used the
        old state: ``_release`` drops them all.
        """
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        generator = torch.cuda.default_generators[index]
        generator.graphsafe_set_state(generator.clone_state())
        end_pool = getattr(torch._C, "_cuda_endAllocateToPool", None)
        release_pool = getattr(torch._C, "_cuda_releasePool", None)
        if end_pool is not None and release_pool is not None:
            try:
                end_pool(index, self.pool)
            except RuntimeError:  # the capture got as far as ending its allocation: nothing to undo
                return
            release_pool(index, self.pool)  # the failed capture's hold on the pool, so its memory is freed

    def close(self) -> None:
        """The graphs go (under torchrun, with the NCCL calls they hold) before the process group does."""
        if self.graphs:
            torch.cuda.synchronize(self.device)
        self.graphs.clear()

    def summary(self) -> str:
        out = f"CUDA graphs: {len(self.seen)} batch shapes, {self.recorded} recorded at the end"
        if self.given_up:
            out = f"{out}; given up ({self.given_up}), the rest trained eagerly"
        elif self.releases:
            out += f"; all dropped {self.releases} time(s) to free memory"
        scaling = scaling_summary(self.sc)
        return out + (f"\n{scaling}" if scaling else "")

    def __call__(self, micro_batches: list, normalizer: float) -> StepOutput:
        """One optimizer step on the one batch of ``micro_batches`` (host tensors). The outputs are
        device tensors that the next call overwrites: add them up before calling again."""
        if len(micro_batches) != 1:
            raise ValueError("a recorded step takes one micro-batch (no gradient accumulation)")
        host = micro_batches[0]
        key = host.key
        # the step multiplies by 1/normalizer: a host number is filled in (no copy from the host, no sync);
        # a device tensor is the reciprocal already (class weights under DDP: engine._global_reciprocal)
        on_device = torch.is_tensor(normalizer)
        if self.given_up:
            self.seen.add(key)
            return self._run(host.to(self.device), normalizer if on_device else float(normalizer))
        entry = self.graphs.get(key)
        if entry is not None:
            graph, static, static_norm, out = entry
            for name, tensor in host.tensors().items():
                static.tensors()[name].copy_(tensor, non_blocking=True)
            if on_device:
                static_norm.copy_(normalizer)
            else:
                static_norm.fill_(1.0 / normalizer)
        else:
            static = host.to(self.device)
            static_norm = normalizer.clone() if on_device else torch.full(
                (), 1.0 / normalizer, dtype=torch.float32, device=self.device)
            current = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                if key in self.seen:
                    out = self._record(key, static, static_norm)
                    graph = self.graphs.get(key, (None,))[0]
                    if out is None:  # not recorded (nothing ran while recording): run the step now, eagerly
                        out = self._eager(static, static_norm)
                else:
                    out = self._eager(static, static_norm)  # a real step, run eagerly
                    self.seen.add(key)
                    graph = None
            current.wait_stream(self.stream)
            if graph is None:
                return out
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            lr.fill_(group["lr"])
        graph.replay()
        return out
