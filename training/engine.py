"""The training engine: the five-step loop, evaluation, and fit. Written once for every launcher.

Under DDP the model passed to ``train_epoch`` is the DDP wrapper; evaluation uses
the unwrapped model on each rank's own shard and the sums are all-reduced. No step
reads a value back from the GPU: metrics accumulate on the device and are read once
per log interval and once per epoch.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import get_linear_schedule_with_warmup

from training.checkpoint import unwrap
from training.distributed import ProcessContext
from training.graphs import MODEL_INPUTS, StepGraphs
from training.metrics import ClassificationMetrics
from training.runlog import RunLogger


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, device: torch.device):
    """AdamW; no weight decay on biases and normalization weights (as BERT fine-tuning does)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused CUDA kernel does the whole update in a few launches.
    return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda")


def prepare_for_training(model: torch.nn.Module, ctx: ProcessContext, *, compile_model: bool) -> torch.nn.Module:
    """Move to the device, compile if asked, wrap in DDP under torchrun. Returns the module to train with.

    ``model`` itself stays the plain module: evaluation and checkpoints use it, never a wrapper.
    """
    model.to(ctx.device)
    train_model = model
    if compile_model:
        # dynamic=True: one compile for every sequence length, instead of a recompile per padded shape.
        train_model = torch.compile(model, dynamic=True)
    if ctx.distributed:
        ddp_args = {"device_ids": [ctx.device.index]} if ctx.device.type == "cuda" else {}
        train_model = DDP(train_model, **ddp_args)
    return train_model


def build_scheduler(optimizer, *, total_steps: int, warmup_ratio: float):
    return get_linear_schedule_with_warmup(optimizer, math.ceil(total_steps * warmup_ratio), total_steps)


def _to_device(batch: dict, device: torch.device) -> tuple:
    inputs = {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS if k in batch}
    return inputs, batch["labels"].to(device, non_blocking=True)


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def accumulation_groups(batch_sizes: list, k: int) -> list:
    """For each micro-batch: the number of examples in its accumulation group.

    Dividing each micro-batch's summed loss by its group's size makes k micro-steps
    give exactly the gradient of one batch of the whole group, the last partial group too.
    """
    out = []
    for start in range(0, len(batch_sizes), k):
        group = batch_sizes[start:start + k]
        out.extend([sum(group)] * len(group))
    return out


@dataclass
class StepInfo:
    """What ``train_epoch`` reports at each log interval (already reduced over ranks)."""
    step: int
    loss: float
    accuracy: float
    lr: float
    samples_per_s: float


class NonFiniteLoss(Exception):
    def __init__(self, step: int, epoch: int, batch: int):
        super().__init__(f"non-finite loss at optimizer step {step} (epoch {epoch}, batch {batch} of the epoch)")
        self.step, self.epoch, self.batch = step, epoch, batch


class NonFiniteGuard:
    """Remembers, on the device, the first micro-batch whose loss was not finite; read only when checked.

    Checking is a host sync, so it happens at log intervals, before every save and at
    epoch end; a bad step is therefore never written into a checkpoint.
    """

    _SCALE = 2 ** 24  # encodes (step, batch) in one float64

    def __init__(self, device: torch.device):
        self.first = torch.full((), float("inf"), dtype=torch.float64 if device.type != "mps" else torch.float32,
                                device=device)

    def update(self, loss_sum: torch.Tensor, step: int, batch: int) -> None:
        bad = ~torch.isfinite(loss_sum.detach()) & torch.isinf(self.first)
        self.first = torch.where(bad, torch.full_like(self.first, step * self._SCALE + batch), self.first)

    def check(self, ctx: ProcessContext, epoch: int) -> None:
        first = self.first.clone()
        if ctx.distributed:  # the same answer on every rank: the earliest bad step of any rank
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        if torch.isfinite(first).item():
            code = int(first.item())
            raise NonFiniteLoss(code // self._SCALE, epoch, code % self._SCALE + 1)


@dataclass
class LoopState:
    """Where training stands: with the model, optimizer, scheduler and RNG, enough to go on exactly."""
    epoch: int = 1                      # the epoch in progress (1-based)
    next_batch: int = 0                 # the micro-batch of that epoch to run next
    global_step: int = 0
    epoch_time_s: float = 0.0           # training time spent in this epoch before a resume
    results: list = field(default_factory=list)   # EpochResult.record() of finished epochs
    skipped_nonfinite: int = 0
    # running sums of the epoch in progress and of the current log interval (device tensors)
    epoch_metrics: Optional[ClassificationMetrics] = None
    interval: Optional[ClassificationMetrics] = None

    def consolidate(self, ctx: ProcessContext) -> dict:
        """Reduce the running sums over ranks, keep them on rank 0 only (so later sums stay right),
        and return what a checkpoint needs."""
        out = {}
        for name in ("epoch_metrics", "interval"):
            metrics = getattr(self, name)
            if metrics is None:  # between epochs: nothing summed yet
                out[name] = None
                continue
            ctx.all_reduce_sum(metrics.totals)
            if not ctx.is_main:
                metrics.totals.zero_()
            out[name] = metrics.totals.cpu()
        return {"epoch": self.epoch, "next_batch": self.next_batch, "global_step": self.global_step,
                "epoch_time_s": self.epoch_time_s, "results": list(self.results),
                "skipped_nonfinite": self.skipped_nonfinite, "totals": out}

    @classmethod
    def restore(cls, saved: dict, ctx: ProcessContext, num_labels: int) -> "LoopState":
        state = cls(saved["epoch"], saved["next_batch"], saved["global_step"], saved["epoch_time_s"],
                    list(saved["results"]), saved["skipped_nonfinite"])
        if saved["totals"]["epoch_metrics"] is None:
            return state
        state.epoch_metrics = ClassificationMetrics(ctx.device, num_labels)
        state.interval = ClassificationMetrics(ctx.device)
        if ctx.is_main:  # the sums were reduced when saved: one rank holds them
            state.epoch_metrics.totals.copy_(saved["totals"]["epoch_metrics"])
            state.interval.totals.copy_(saved["totals"]["interval"])
        return state


def train_epoch(model, loader, optimizer, scheduler, *, ctx: ProcessContext, amp_dtype, grad_accum_steps: int,
                max_grad_norm: float, log_every: int, state: LoopState, guard: NonFiniteGuard,
                on_log: Optional[Callable[[StepInfo], None]] = None,
                after_step: Optional[Callable[[bool], bool]] = None, progress=None,
                skip_nonfinite: bool = False, graphs: Optional[StepGraphs] = None) -> bool:
    """Run the rest of the current epoch from ``state.next_batch``. Returns False if ``after_step`` asked to stop.

    With ``graphs`` (CUDA graphs of whole steps) each batch is one step that ``graphs`` runs whole.

    ``state`` is updated as it goes (step counter, next batch, running sums), so a
    checkpoint taken inside ``after_step`` records exactly where training is.
    """
    if graphs is not None and (grad_accum_steps != 1 or skip_nonfinite):
        raise ValueError("CUDA graphs of whole steps take one micro-batch per step and skip none")
    device = ctx.device
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    group_sizes = accumulation_groups(loader.batch_sampler.batch_sizes(), grad_accum_steps)
    num_batches = len(group_sizes)
    group_ok = True
    model.train()
    interval_start = time.perf_counter()
    for i, batch in enumerate(loader, start=state.next_batch):
        if graphs is not None:  # the whole step, one graph replay (one micro-batch per step, none skipped)
            loss_sum, totals = graphs(batch)
            state.epoch_metrics.totals += totals
            state.interval.totals += totals[:3]
            guard.update(loss_sum, state.global_step + 1, i)
        else:
            inputs, labels = _to_device(batch, device)
            boundary = (i + 1) % grad_accum_steps == 0 or i + 1 == num_batches
            # Skip DDP's gradient all-reduce on micro-steps that do not end an accumulation group.
            sync = model.no_sync() if isinstance(model, DDP) and not boundary else contextlib.nullcontext()
            with sync:
                with _autocast(device, amp_dtype):
                    logits = model(**inputs).logits                       # 1. forward
                loss_sum = criterion(logits.float(), labels)              # 2. loss
                finite = True
                if skip_nonfinite:  # asked for: a host sync per micro-step, agreed by every rank
                    finite = ctx.all_agree(bool(torch.isfinite(loss_sum).item()))
                if finite:
                    (loss_sum / group_sizes[i]).backward()                # 3. backward
            if finite:
                state.epoch_metrics.update(loss_sum, logits, labels)
                state.interval.update(loss_sum, logits, labels)
                if not skip_nonfinite:
                    guard.update(loss_sum, state.global_step + 1, i)
            else:
                group_ok = False
            if not boundary:
                continue
            if group_ok:
                if max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()                                          # 4. optimizer step
            else:
                state.skipped_nonfinite += 1  # the whole step's gradients are dropped
            optimizer.zero_grad(set_to_none=True)                         # 5. zero gradients
            group_ok = True
        scheduler.step()
        state.global_step += 1
        state.next_batch = i + 1
        if progress is not None:
            progress.update(1)
        if state.global_step % log_every == 0:
            guard.check(ctx, state.epoch)
            # A collective every rank reaches at the same step, then one host sync.
            ctx.all_reduce_sum(state.interval.totals)
            stats = state.interval.compute()
            now = time.perf_counter()
            info = StepInfo(state.global_step, stats["loss"], stats["accuracy"], scheduler.get_last_lr()[0],
                            stats["count"] / max(now - interval_start, 1e-9))
            state.interval, interval_start = ClassificationMetrics(device), now
            if progress is not None:
                progress.set_postfix_str(f"loss {info.loss:.4f}, {info.samples_per_s:.0f} samples/s")
            if on_log is not None:
                on_log(info)
        if after_step is not None and after_step(i + 1 == num_batches):
            return False
    return True


@torch.no_grad()
def evaluate(model, loader, *, ctx: ProcessContext, amp_dtype) -> ClassificationMetrics:
    """Loss and accuracy over this rank's shard; the caller all-reduces the sums."""
    model = unwrap(model)  # no DDP forward hooks in eval: each rank runs its own shard
    model.eval()
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    metrics = ClassificationMetrics(ctx.device, model.config.num_labels)
    for batch in loader:
        inputs, labels = _to_device(batch, ctx.device)
        with _autocast(ctx.device, amp_dtype):
            logits = model(**inputs).logits
        metrics.update(criterion(logits.float(), labels), logits, labels)
    return metrics


@dataclass
class EpochResult:
    epoch: int
    train: dict
    validation: dict
    train_time_s: float
    eval_time_s: float

    @property
    def samples_per_s(self) -> float:
        return self.train["count"] / self.train_time_s if self.train_time_s > 0 else float("nan")

    def line(self, epochs: int) -> str:
        return (f"epoch {self.epoch}/{epochs} | train loss {self.train['loss']:.4f} acc {self.train['accuracy']:.4f}"
                f" | val loss {self.validation['loss']:.4f} acc {self.validation['accuracy']:.4f}"
                f" f1 {self.validation['macro_f1']:.4f}"
                f" | time {self.train_time_s:.1f}s (+{self.eval_time_s:.1f}s eval)"
                f" | {self.samples_per_s:.1f} samples/s")

    def record(self) -> dict:
        return {"epoch": self.epoch, "train_loss": self.train["loss"], "train_accuracy": self.train["accuracy"],
                "train_examples": self.train["count"], "val_loss": self.validation["loss"],
                "val_accuracy": self.validation["accuracy"], "val_f1": self.validation["macro_f1"],
                "val_examples": self.validation["count"],
                "epoch_time_s": round(self.train_time_s, 3), "eval_time_s": round(self.eval_time_s, 3),
                "samples_per_s": round(self.samples_per_s, 2)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit(model, train_model, optimizer, scheduler, train_loader, eval_loader, *, ctx: ProcessContext,
        log: RunLogger, epochs: int, grad_accum_steps: int, max_grad_norm: float, amp_dtype, log_every: int,
        state: LoopState, after_step: Optional[Callable] = None,
        on_epoch_end: Optional[Callable] = None, skip_nonfinite: bool = False,
        graphs: Optional[StepGraphs] = None) -> bool:
    """Train from ``state`` to the last epoch, evaluating after each. False if stopped early by ``after_step``.

    ``after_step(end_of_epoch, check)`` runs on every rank after each optimizer step (it may save a
    checkpoint, after ``check()`` raised nothing, or ask to stop); ``on_epoch_end(result)`` after each evaluation (best checkpoint,
    early stopping: True stops). Both see the same reduced values on every rank, so all ranks
    take the same decisions.
    """
    num_labels = unwrap(model).config.num_labels
    steps_per_epoch = math.ceil(len(train_loader) / grad_accum_steps)
    guard = NonFiniteGuard(ctx.device)

    def on_log(info: StepInfo) -> None:
        record = {"step": info.step, "epoch": state.epoch, "loss": info.loss, "accuracy": info.accuracy,
                  "lr": info.lr, "samples_per_s": info.samples_per_s}
        log.record("step", **record)
        log.scalars("step", {k: v for k, v in record.items() if k not in ("step", "epoch")}, step=info.step)

    while state.epoch <= epochs:
        epoch = state.epoch
        # A new shuffle each epoch, the same on every rank; a resume skips what was already done.
        train_loader.batch_sampler.set_epoch(epoch, start=state.next_batch)
        if state.epoch_metrics is None:
            state.epoch_metrics = ClassificationMetrics(ctx.device, num_labels)
            state.interval = ClassificationMetrics(ctx.device)
        bar = log.progress(steps_per_epoch, f"epoch {epoch}/{epochs}",
                           initial=math.ceil(state.next_batch / grad_accum_steps))
        _sync(ctx.device)
        t0 = time.perf_counter() - state.epoch_time_s

        def timed_after_step(end_of_epoch: bool) -> bool:
            state.epoch_time_s = time.perf_counter() - t0
            return after_step is not None and after_step(end_of_epoch, lambda: guard.check(ctx, epoch))

        finished = train_epoch(train_model, train_loader, optimizer, scheduler, ctx=ctx, amp_dtype=amp_dtype,
                               grad_accum_steps=grad_accum_steps, max_grad_norm=max_grad_norm,
                               log_every=log_every, state=state, guard=guard, on_log=on_log,
                               after_step=timed_after_step, progress=bar, skip_nonfinite=skip_nonfinite,
                               graphs=graphs)
        bar.close()
        if not finished:
            return False
        guard.check(ctx, epoch)
        ctx.all_reduce_sum(state.epoch_metrics.totals)
        train_stats = state.epoch_metrics.compute()
        train_time = time.perf_counter() - t0  # compute() synchronized with the device
        t1 = time.perf_counter()
        eval_metrics = evaluate(model, eval_loader, ctx=ctx, amp_dtype=amp_dtype)
        ctx.all_reduce_sum(eval_metrics.totals)
        val_stats = eval_metrics.compute()
        result = EpochResult(epoch, train_stats, val_stats, train_time, time.perf_counter() - t1)
        log.print(result.line(epochs))
        log.record("epoch", **result.record(), step=state.global_step)
        log.scalars("epoch", result.record(), step=state.global_step)
        state.results.append(result.record())
        state.epoch, state.next_batch, state.epoch_time_s = epoch + 1, 0, 0.0
        state.epoch_metrics = state.interval = None
        if on_epoch_end is not None and on_epoch_end(result):
            break
    return True
