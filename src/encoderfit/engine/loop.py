"""The training engine: the loop over optimizer steps and epochs, evaluation, and fit. Written once.

A step runner (``training/step.py``'s ``EagerSteps`` or ``training/graphs.py``'s ``StepGraphs``)
runs each optimizer step; the engine feeds it the step's micro-batches and the loss normalizer,
adds its metric sums up, logs, and calls the hooks. Under DDP the runner's model is the DDP
wrapper; evaluation uses the unwrapped model on each rank's own shard and the sums are
all-reduced. No step reads a value back from the GPU: metrics accumulate on the device and are
read once per log interval and once per epoch.
"""
from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from encoderfit.modeling import long_texts
from encoderfit.data.batches import forward_logits
from encoderfit.run.checkpoint import unwrap
from encoderfit.engine.distributed import ProcessContext
from encoderfit.run.runlog import RunLogger
from encoderfit.utils import UserError


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, fused: bool):
    """AdamW; no weight decay on biases and normalization weights (as BERT fine-tuning does)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel does the whole update in a few launches (on CUDA), and skips it on a found-inf flag (fp16).
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


COMPILE_MODES = ("off", "regional", "whole")


def repeated_layers(model: torch.nn.Module) -> Optional[torch.nn.ModuleList]:
    """The encoder's stack of identical layers (BERT's ``encoder.layer``, DistilBERT's ``transformer.layer``, ...):
    the longest ModuleList whose members are all of one class, or None."""
    found = None
    for module in model.modules():
        if (isinstance(module, torch.nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1
                and not isinstance(module[0], (torch.nn.ModuleList, torch.nn.ModuleDict))  # a list of lists
                and (found is None or len(module) > len(found))):
            found = module
    return found


def compile_model(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``regional``: each of the encoder's repeated layers compiled in place. They share one compiled graph, so
    the compile takes the time of one layer, not of the model (and the compiled code is cached on disk:
    ``compile_cache``). ``whole``: the model compiled as one graph. A model without a layer stack is compiled
    whole. dynamic=True: one compile for every sequence length, instead of a recompile per padded shape."""
    layers = repeated_layers(model) if mode == "regional" else None
    if layers is None:
        return torch.compile(model, dynamic=True)
    for layer in layers:
        layer.compile(dynamic=True)
    return model


_CACHE_SET: set = set()  # the compiler cache directories this process set (a later run may set another)


def compile_cache(directory) -> str:
    """Keeps the compiler's artifacts (Inductor's FX-graph and AOTAutograd caches, Triton's kernels) in
    ``directory`` (the project's cache, on each node's own disk), so that a later run of the same model and
    shapes loads them instead of compiling. A TORCHINDUCTOR_CACHE_DIR that the user set wins; torch's own
    default (which importing torch._dynamo writes into the environment) and one set by an earlier run of this
    process (a notebook, a sweep's trials) do not. Returns the directory used."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current, default = os.environ.get("TORCHINDUCTOR_CACHE_DIR"), default_cache_dir()
    triton = os.environ.get("TRITON_CACHE_DIR")
    # Inductor writes TRITON_CACHE_DIR once, under its own directory, if it is unset: that value is torch's too
    triton_ours = triton is None or triton in _CACHE_SET or triton.startswith(os.path.join(default, "triton"))
    if current is None or current == default or current in _CACHE_SET:
        current = str(Path(directory).expanduser().resolve())
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = current
        _CACHE_SET.add(current)
        if triton_ours:
            os.environ["TRITON_CACHE_DIR"] = os.path.join(current, "triton")
            _CACHE_SET.add(os.environ["TRITON_CACHE_DIR"])
    elif triton is not None and triton in _CACHE_SET:  # the user's Inductor directory: Triton's goes with it
        del os.environ["TRITON_CACHE_DIR"]
    return current


def prepare_for_training(model: torch.nn.Module, ctx: ProcessContext, *, compile_mode: str = "off",
                         wrap_ddp: bool = True) -> torch.nn.Module:
    """Move to the device, compile if asked (``COMPILE_MODES``), wrap in DDP under torchrun. Returns the module
    to train with.

    ``model`` itself stays the plain module: evaluation and checkpoints use it, never a wrapper (a regional
    compile changes the model's layers in place: evaluation runs them compiled too).
    ``wrap_ddp=False`` (CUDA graphs under torchrun, which average the gradients themselves): no wrapper,
    but every rank starts from rank 0's weights and buffers, as DDP's wrapper would make them.
    """
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
    model.to(ctx.device)
    if ctx.distributed and not wrap_ddp:
        tensors = [*model.parameters(), *model.buffers()]
        shapes = ctx.all_gather_object([tuple(t.shape) for t in tensors])  # DDP's own check, before it hangs
        if any(other != shapes[0] for other in shapes):
            raise UserError("the model differs between ranks (its parameter shapes): every node needs the same "
                            "--model")
        with torch.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor, src=0)
    train_model = model if compile_mode == "off" else compile_model(model, compile_mode)
    if ctx.distributed and wrap_ddp:
        ddp_args = {"device_ids": [ctx.device.index]} if ctx.device.type == "cuda" else {}
        train_model = DDP(train_model, **ddp_args)
    return train_model


def linear_warmup_then_decay(step: int, *, warmup: int, total: int) -> float:
    """The learning rate's factor at ``step``: linear from 0 to 1 over ``warmup`` steps, then linear to 0 at
    ``total`` (the factors of transformers' ``get_linear_schedule_with_warmup``)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def build_scheduler(optimizer, *, total_steps: int, warmup_ratio: float):
    # torch's LambdaLR rather than transformers.optimization, whose import pulls in transformers.trainer_utils
    # and, where installed, peft (7.8 s of start-up on a machine that has it, BENCHMARKS.md)
    factor = functools.partial(linear_warmup_then_decay, warmup=math.ceil(total_steps * warmup_ratio),
                               total=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class LoopConfig:
    """The loop's settings (the step's own are in the runner's StepContext)."""
    epochs: int
    grad_accum_steps: int = 1
    log_every: int = 50
    pooling: str = "mean"                    # --long_texts windows: how evaluation pools a document's windows
    train_documents: Optional[int] = None    # --long_texts windows: the documents the training windows come from


@dataclass
class StepInfo:
    """What the loop reports at each log interval (already reduced over ranks)."""
    step: int
    metrics: dict   # the task's running metrics of the interval (loss first), without the count
    lr: float
    samples_per_s: float


class NonFiniteLoss(Exception):
    def __init__(self, step: int, epoch: int, batch: int, per_step: int = 1):
        where = f"batch {batch}" if per_step == 1 else f"the step of micro-batches {batch}-{batch + per_step - 1}"
        super().__init__(f"non-finite loss at optimizer step {step} (epoch {epoch}, {where} of the epoch)")
        self.step, self.epoch, self.batch = step, epoch, batch


class NonFiniteGuard:
    """Remembers, on the device, the first optimizer step whose loss was not finite; read only when checked.

    Checking is a host sync, so it happens at log intervals, before every save and at
    epoch end; a bad step is therefore never written into a checkpoint. The step and its
    first micro-batch are one int64 (exact on every device, MPS too).
    """

    _NONE = 2 ** 63 - 1  # no bad step yet (the largest int64, so a MIN over ranks finds the earliest bad one)
    _SHIFT = 2 ** 32

    def __init__(self, device: torch.device, per_step: int = 1):
        self.code = torch.full((), self._NONE, dtype=torch.int64, device=device)
        self.per_step = per_step  # micro-batches an optimizer step (--grad_accum_steps)

    def update(self, loss_sum: torch.Tensor, step: int, batch: int) -> None:
        bad = ~torch.isfinite(loss_sum.detach()) & (self.code == self._NONE)
        self.code = torch.where(bad, torch.full_like(self.code, step * self._SHIFT + batch), self.code)

    def check(self, ctx: ProcessContext, epoch: int) -> None:
        code = self.code.clone()
        if ctx.distributed:  # the same answer on every rank: the earliest bad step of any rank
            torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MIN)
        value = int(code.item())
        if value != self._NONE:
            raise NonFiniteLoss(value // self._SHIFT, epoch, value % self._SHIFT + 1, self.per_step)


@dataclass
class LoopState:
    """Where training stands: with the model, optimizer, scheduler and RNG, enough to go on exactly."""
    epoch: int = 1                      # the epoch in progress (1-based)
    next_batch: int = 0                 # the micro-batch of that epoch to run next
    global_step: int = 0
    epoch_time_s: float = 0.0           # training time spent in this epoch before a resume
    results: list = field(default_factory=list)   # EpochResult.record() of finished epochs
    skipped_nonfinite: int = 0
    # the task's running metric sums of the epoch in progress and of the current log interval (device)
    epoch_sums: Optional[torch.Tensor] = None
    interval_sums: Optional[torch.Tensor] = None
    guard: Optional[NonFiniteGuard] = None  # not saved: a checkpoint is only written after it passed

    def start_sums(self, task, device: torch.device) -> None:
        """Fresh running sums for an epoch (and its first log interval), and a guard if there is none."""
        self.epoch_sums, self.interval_sums = task.new_sums(device), task.new_sums(device)
        if self.guard is None:
            self.guard = NonFiniteGuard(device)

    def check_finite(self, ctx: ProcessContext) -> None:
        """Raises NonFiniteLoss if a step since the start had a non-finite loss (a host sync)."""
        if self.guard is not None:
            self.guard.check(ctx, self.epoch)

    def reduce_for_checkpoint(self, ctx: ProcessContext) -> dict:
        """What a checkpoint needs. A collective: the running sums are summed over ranks onto rank 0
        and zeroed on the others, so the sums that go on accumulating stay right on every rank."""
        sums = {}
        for name in ("epoch_sums", "interval_sums"):
            value = getattr(self, name)
            if value is not None:
                ctx.all_reduce_sum(value)
                if not ctx.is_main:
                    value.zero_()
            sums[name] = None if value is None else value.cpu()
        return {"epoch": self.epoch, "next_batch": self.next_batch, "global_step": self.global_step,
                "epoch_time_s": self.epoch_time_s, "results": list(self.results),
                "skipped_nonfinite": self.skipped_nonfinite, "sums": sums}

    @classmethod
    def restore(cls, saved: dict, ctx: ProcessContext, task) -> "LoopState":
        state = cls(saved["epoch"], saved["next_batch"], saved["global_step"], saved["epoch_time_s"],
                    list(saved["results"]), saved["skipped_nonfinite"])
        for name, value in saved["sums"].items():
            if value is not None:
                sums = task.new_sums(ctx.device)
                if ctx.is_main:  # the sums were reduced when saved: one rank holds them
                    sums.copy_(value)
                setattr(state, name, sums)
        return state


class Hooks:
    """What the trainer does around the loop. Every rank calls them with the same reduced values,
    so all ranks take the same decisions (checkpoint writers decide by themselves who writes)."""

    # seconds spent so far on work that is not training (checkpoint writes): left out of the epoch's time
    excluded_s = 0.0

    def after_step(self, state: LoopState, end_of_epoch: bool) -> bool:
        """After each optimizer step (a checkpoint, say, after ``state.check_finite``). True stops."""
        return False

    def on_epoch_end(self, result: "EpochResult") -> bool:
        """After each epoch's evaluation (best checkpoint, early stopping). True ends training."""
        return False


@dataclass
class EpochResult:
    epoch: int
    train: dict          # the task's running metrics of the epoch's training steps
    validation: dict     # the task's metrics of the validation set
    train_time_s: float
    eval_time_s: float
    train_documents: Optional[int] = None  # windows of long texts: the training examples are windows of these

    def _per_s(self, count: float) -> float:
        return count / self.train_time_s if self.train_time_s > 0 else float("nan")

    @property
    def samples_per_s(self) -> float:
        """Training examples (windows, under --long_texts windows) per second."""
        return self._per_s(self.train["count"])

    def line(self, epochs: int, task) -> str:
        val = task.describe(self.validation)
        speed = f"{self.samples_per_s:.1f} samples/s"
        if "windows" in self.validation:
            val += f" ({self.validation['count']} documents in {self.validation['windows']} windows)"
        if self.train_documents is not None:
            speed = f"{self.samples_per_s:.1f} windows/s ({self._per_s(self.train_documents):.1f} documents/s)"
        return (f"epoch {self.epoch}/{epochs} | train {task.describe(self.train)}"
                f" | val {val} | time {self.train_time_s:.1f}s (+{self.eval_time_s:.1f}s eval) | {speed}")

    def record(self) -> dict:
        def named(prefix: str, stats: dict) -> dict:
            return {f"{prefix}_{'examples' if k == 'count' else k}": v for k, v in stats.items()}
        documents = {} if self.train_documents is None else {
            "train_documents": self.train_documents, "documents_per_s": round(self._per_s(self.train_documents), 2)}
        return {"epoch": self.epoch, **named("train", self.train), **named("val", self.validation),
                "epoch_time_s": round(self.train_time_s, 3), "eval_time_s": round(self.eval_time_s, 3),
                "samples_per_s": round(self.samples_per_s, 2), **documents}


def _optimizer_steps(loader, per_step: int, start: int) -> Iterator[tuple]:
    """(index of the first micro-batch, the step's micro-batches) from micro-batch ``start`` on.
    A resume starts at a step boundary; the epoch's last step may have fewer micro-batches."""
    group, first = [], start
    for i, batch in enumerate(loader, start=start):
        group.append(batch)
        if len(group) == per_step:
            yield first, group
            group, first = [], i + 1
    if group:
        yield first, group


def train_epoch(runner, loader, loop: LoopConfig, state: LoopState, hooks: Hooks, log: RunLogger) -> bool:
    """Run the rest of the current epoch from ``state.next_batch``. False if a hook asked to stop.

    ``state`` is updated as it goes (step counter, next batch, running sums), so a checkpoint
    taken inside ``hooks.after_step`` records exactly where training is.
    """
    sc = runner.sc
    ctx, task = sc.ctx, sc.task
    num_batches = len(loader)
    bar = log.progress(math.ceil(num_batches / loop.grad_accum_steps), f"epoch {state.epoch}/{loop.epochs}",
                       initial=math.ceil(state.next_batch / loop.grad_accum_steps))
    sc.model.train()
    interval_start = time.perf_counter()
    try:
        for first, micro_batches in _optimizer_steps(loader, loop.grad_accum_steps, state.next_batch):
            normalizer = sum(task.normalizer(b) for b in micro_batches)  # host numbers: no sync
            if ctx.distributed and task.normalizer_differs_by_rank:
                normalizer = _global_reciprocal(normalizer, ctx)
            out = runner(micro_batches, normalizer)
            if out.applied:
                state.epoch_sums += out.sums
                state.interval_sums += out.sums
            else:
                state.skipped_nonfinite += 1  # the whole step's gradients were dropped
            if not sc.skip_nonfinite:
                state.guard.update(out.loss_sum, state.global_step + 1, first)
            sc.scheduler.step()  # after the optimizer, as torch expects; a graph reads the new rate next replay
            state.global_step += 1
            state.next_batch = first + len(micro_batches)
            bar.update(1)
            if state.global_step % loop.log_every == 0:
                _log_interval(sc, state, log, bar, time.perf_counter() - interval_start)
                interval_start = time.perf_counter()
            if hooks.after_step(state, state.next_batch == num_batches):
                return False
    finally:
        bar.close()
    return True


def _global_reciprocal(normalizer: float, ctx: ProcessContext) -> torch.Tensor:
    """world size / the step's normalizer summed over ranks, as a device tensor (no host sync): DDP averages
    the ranks' gradients, so each rank's summed loss times this is the global weighted mean's gradient.
    For normalizers that differ by rank (class weights); an example count is the same on every rank."""
    # a fill, not torch.tensor(): that copies from pageable host memory, which waits for the stream
    total = torch.full((), float(normalizer), dtype=torch.float32, device=ctx.device)
    ctx.all_reduce_sum(total)
    return ctx.world_size / total


def _log_interval(sc, state: LoopState, log: RunLogger, bar, seconds: float) -> None:
    ctx, task = sc.ctx, sc.task
    state.check_finite(ctx)
    # A collective every rank reaches at the same step, then one host sync.
    ctx.all_reduce_sum(state.interval_sums)
    stats = task.running(state.interval_sums)
    count = stats.pop("count")
    info = StepInfo(state.global_step, stats, sc.scheduler.get_last_lr()[0], count / max(seconds, 1e-9))
    state.interval_sums = task.new_sums(ctx.device)
    bar.set_postfix_str(f"loss {stats['loss']:.4f}, {info.samples_per_s:.0f} samples/s")
    record = {"step": info.step, "epoch": state.epoch, **info.metrics,
              "lr": info.lr, "samples_per_s": info.samples_per_s}
    log.record("step", **record)
    log.scalars("step", {k: v for k, v in record.items() if k not in ("step", "epoch")}, step=info.step)


def evaluate(model, loader, task, *, ctx: ProcessContext, amp_dtype, pooling: str = "mean") -> dict:
    """The task's metrics of the validation set: its sums over each rank's shard, all-reduced, and for a
    task that needs them (``collects_outputs``: Spearman's ranks, a tuned threshold) every example's output,
    gathered once.
    The shards hold each example exactly once, so nothing is counted twice. Batches of windows of long
    texts (``batch.docs``) are pooled per document first (``pooling``: mean or max of the logits), and the
    metrics are those of the documents; a rank's shard holds whole documents, so the pooling is local."""
    model = unwrap(model)  # no DDP forward hooks in eval: each rank runs its own shard
    sums, outputs, windows = task.new_sums(ctx.device), [], []

    def count(logits, labels):
        task.add_sums(sums, task.loss_sum(logits, labels), logits, labels)
        if task.collects_outputs:
            outputs.append(task.outputs(logits, labels))

    for batch, logits in forward_logits(model, loader, device=ctx.device, amp_dtype=amp_dtype):
        if batch.docs is None:
            count(logits, batch.labels)
        else:
            windows.append((logits.float(), batch.docs, batch.labels))
    num_windows = torch.zeros(1, dtype=torch.long, device=ctx.device)  # exact (MPS has no float64)
    if windows:
        logits, docs, labels = (torch.cat(parts) for parts in zip(*windows))
        _, pooled, first = long_texts.pool(logits, docs, pooling)
        count(pooled, labels[first])
        num_windows += len(docs)
    ctx.all_reduce_sum(sums)
    gathered = None
    if task.collects_outputs:
        mine = torch.cat(outputs).cpu() if outputs else torch.empty(0, task.output_width)
        gathered = torch.cat(ctx.all_gather_object(mine))
        task.tune_on(gathered)  # a decision chosen on validation (a tuned threshold), the same on every rank
    metrics = task.metrics(sums, gathered)
    if getattr(loader.sampler, "by_document", False):  # the same on every rank: each joins the reduction
        ctx.all_reduce_sum(num_windows)
        metrics["windows"] = int(num_windows.item())
    return metrics


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit(runner, loaders: tuple, loop: LoopConfig, state: LoopState, hooks: Hooks, log: RunLogger) -> bool:
    """Train from ``state`` to the last epoch, evaluating after each. False if stopped by ``hooks.after_step``.

    ``loaders`` is (train, evaluation).
    """
    sc = runner.sc
    ctx, task = sc.ctx, sc.task
    train_loader, eval_loader = loaders
    if state.guard is None:  # a restored state has its sums but no guard (none is saved)
        state.guard = NonFiniteGuard(ctx.device, loop.grad_accum_steps)
    while state.epoch <= loop.epochs:
        epoch = state.epoch
        # A new shuffle each epoch, the same on every rank; a resume skips what was already done.
        train_loader.batch_sampler.set_epoch(epoch, start=state.next_batch)
        if state.epoch_sums is None:
            state.start_sums(task, ctx.device)
        _sync(ctx.device)
        t0 = time.perf_counter() - state.epoch_time_s

        class Timed(Hooks):  # the epoch's training time so far, without the checkpoints written between steps
            def after_step(self, s: LoopState, end_of_epoch: bool) -> bool:
                nonlocal t0
                s.epoch_time_s = time.perf_counter() - t0
                before = hooks.excluded_s
                stop = hooks.after_step(s, end_of_epoch)
                t0 += hooks.excluded_s - before  # the write only: a host sync before it waits for the step
                return stop

        if not train_epoch(runner, train_loader, loop, state, Timed(), log):
            return False
        state.check_finite(ctx)
        ctx.all_reduce_sum(state.epoch_sums)
        train_stats = task.running(state.epoch_sums)
        train_time = time.perf_counter() - t0  # running() synchronized with the device
        t1 = time.perf_counter()
        validation = evaluate(sc.model, eval_loader, task, ctx=ctx, amp_dtype=sc.amp_dtype, pooling=loop.pooling)
        result = EpochResult(epoch, train_stats, validation, train_time, time.perf_counter() - t1,
                             loop.train_documents)
        log.print(result.line(loop.epochs, task))
        log.record("epoch", **result.record(), step=state.global_step)
        log.scalars("epoch", result.record(), step=state.global_step)
        state.results.append(result.record())
        state.epoch, state.next_batch, state.epoch_time_s = epoch + 1, 0, 0.0
        state.epoch_sums = state.interval_sums = None
        if hooks.on_epoch_end(result):
            break
    return True
