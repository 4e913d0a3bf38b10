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
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import get_linear_schedule_with_warmup

from training.checkpoint import unwrap
from training.distributed import ProcessContext
from training.metrics import ClassificationMetrics
from training.runlog import RunLogger

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


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


def prepare_for_training(model: torch.nn.Module, ctx: ProcessContext, *, compile_model) -> torch.nn.Module:
    """Move to the device, compile if asked, wrap in DDP under torchrun. Returns the module to train with.

    ``model`` itself stays the plain module: evaluation and checkpoints use it, never a wrapper.
    """
    model.to(ctx.device)
    train_model = model
    if compile_model == "cudagraphs":
        # Static shapes (the loader pads lengths to a coarse multiple), each compiled once and
        # replayed as a CUDA graph: the host launches one graph instead of hundreds of kernels.
        train_model = torch.compile(model, mode="reduce-overhead", dynamic=False)
    elif compile_model:
        # dynamic=True: one graph for every sequence length, instead of a recompile per padded shape.
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


def train_epoch(model, loader, optimizer, scheduler, *, ctx: ProcessContext, amp_dtype, grad_accum_steps: int,
                max_grad_norm: float, log_every: int, global_step: int,
                on_log: Optional[Callable[[StepInfo], None]] = None, progress=None):
    """One pass over ``loader``. Returns (epoch metrics on device, global step after the epoch)."""
    device = ctx.device
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    epoch_metrics = ClassificationMetrics(device, unwrap(model).config.num_labels)
    interval = ClassificationMetrics(device)
    group_sizes = accumulation_groups(loader.batch_sampler.batch_sizes(), grad_accum_steps)
    num_batches = len(group_sizes)
    model.train()
    interval_start = time.perf_counter()
    for i, batch in enumerate(loader):
        inputs, labels = _to_device(batch, device)
        boundary = (i + 1) % grad_accum_steps == 0 or i + 1 == num_batches
        # Skip DDP's gradient all-reduce on micro-steps that do not end an accumulation group.
        sync = model.no_sync() if isinstance(model, DDP) and not boundary else contextlib.nullcontext()
        with sync:
            with _autocast(device, amp_dtype):
                logits = model(**inputs).logits                       # 1. forward
            loss_sum = criterion(logits.float(), labels)              # 2. loss
            (loss_sum / group_sizes[i]).backward()                    # 3. backward
        epoch_metrics.update(loss_sum, logits, labels)
        interval.update(loss_sum, logits, labels)
        if not boundary:
            continue
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()                                              # 4. optimizer step
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)                         # 5. zero gradients
        global_step += 1
        if progress is not None:
            progress.update(1)
        if global_step % log_every == 0:
            # A collective every rank reaches at the same step, then one host sync.
            ctx.all_reduce_sum(interval.totals)
            stats = interval.compute()
            now = time.perf_counter()
            info = StepInfo(global_step, stats["loss"], stats["accuracy"], scheduler.get_last_lr()[0],
                            stats["count"] / max(now - interval_start, 1e-9))
            interval, interval_start = ClassificationMetrics(device), now
            if progress is not None:
                progress.set_postfix_str(f"loss {info.loss:.4f}, {info.samples_per_s:.0f} samples/s")
            if on_log is not None:
                on_log(info)
    return epoch_metrics, global_step


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


def fit(model, train_loader, eval_loader, *, ctx: ProcessContext, log: RunLogger, epochs: int, lr: float,
        weight_decay: float, warmup_ratio: float, max_grad_norm: float, grad_accum_steps: int, amp_dtype,
        log_every: int, compile_model=None, on_epoch_end: Optional[Callable] = None):
    """Train for ``epochs``, evaluating after each. Returns (optimizer, scheduler, epoch results, global step).

    ``on_epoch_end(result, optimizer, scheduler, global_step)`` runs on every rank after each
    evaluation (it may save a checkpoint) and returns True to stop early; it sees the same
    reduced metrics on every rank, so every rank takes the same decision.
    """
    train_model = prepare_for_training(model, ctx, compile_model=compile_model)
    optimizer = build_optimizer(model, lr=lr, weight_decay=weight_decay, device=ctx.device)
    steps_per_epoch = math.ceil(len(train_loader) / grad_accum_steps)
    scheduler = build_scheduler(optimizer, total_steps=epochs * steps_per_epoch, warmup_ratio=warmup_ratio)

    def on_log(info: StepInfo) -> None:
        log.record("step", step=info.step, epoch=epoch, loss=info.loss, accuracy=info.accuracy, lr=info.lr,
                   samples_per_s=info.samples_per_s)
        log.scalars("step", {"loss": info.loss, "accuracy": info.accuracy, "lr": info.lr,
                             "samples_per_s": info.samples_per_s}, step=info.step)

    results, global_step = [], 0
    for epoch in range(1, epochs + 1):
        train_loader.batch_sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        bar = log.progress(steps_per_epoch, f"epoch {epoch}/{epochs}")
        _sync(ctx.device)
        t0 = time.perf_counter()
        train_metrics, global_step = train_epoch(
            train_model, train_loader, optimizer, scheduler, ctx=ctx, amp_dtype=amp_dtype,
            grad_accum_steps=grad_accum_steps, max_grad_norm=max_grad_norm, log_every=log_every,
            global_step=global_step, on_log=on_log, progress=bar)
        ctx.all_reduce_sum(train_metrics.totals)
        train_stats = train_metrics.compute()
        train_time = time.perf_counter() - t0  # compute() synchronized with the device
        bar.close()
        t1 = time.perf_counter()
        eval_metrics = evaluate(model, eval_loader, ctx=ctx, amp_dtype=amp_dtype)
        ctx.all_reduce_sum(eval_metrics.totals)
        val_stats = eval_metrics.compute()
        result = EpochResult(epoch, train_stats, val_stats, train_time, time.perf_counter() - t1)
        results.append(result)
        log.print(result.line(epochs))
        log.record("epoch", **result.record(), step=global_step)
        log.scalars("epoch", result.record(), step=global_step)
        if on_epoch_end is not None and on_epoch_end(result, optimizer, scheduler, global_step):
            break
    return optimizer, scheduler, results, global_step
