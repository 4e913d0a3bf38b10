"""One optimizer step, written once: the eager runner runs it, the CUDA-graph recorder records it.

    zero gradients -> for each micro-batch: forward, loss, metric sums, backward -> [all-reduce] -> clip -> AdamW

With the fused AdamW (CUDA) the clipping is folded into AdamW's pass over the gradients (``folds_clipping``).

Under fp16 autocast the loss is scaled before backward and the gradients unscaled before clipping
(``torch.amp.GradScaler``, dynamic scale). The fused AdamW takes the scaler's found-inf flag on the
device and skips an overflowing step itself, so there is no host sync: the scale, its growth tracker
and the flag are device tensors that a recorded CUDA graph updates like any other. Under DDP the
gradients are all-reduced before they are unscaled, so every rank finds the same overflow.

The step's loss is the task's summed loss divided by the step's normalizer (for classification,
its example count), so k accumulated micro-batches give exactly the gradient of one batch of all
of them. What a step needs travels together in a ``StepContext``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from encoderfit.data.batches import autocast
from encoderfit.engine.distributed import ProcessContext


@dataclass(frozen=True)
class StepContext:
    model: torch.nn.Module          # what to call: the DDP or compiled wrapper, or the plain model
    optimizer: torch.optim.Optimizer
    scheduler: object               # stepped by the loop after each optimizer step
    task: object                    # training/tasks.py: the loss and the metric sums
    amp_dtype: Optional[torch.dtype]
    max_grad_norm: float
    ctx: ProcessContext
    skip_nonfinite: bool = False    # check each micro-batch's loss on the host (a sync) and skip bad steps
    recording: bool = False         # inside a CUDA graph: gradients kept in place, no autocast cache
    grad_sync: Optional[object] = None  # graphs under DDP: averages the gradients over the ranks (one collective)
    scaler: Optional[torch.amp.GradScaler] = None  # fp16: loss scaling (needs the fused AdamW: no host sync)


@dataclass
class StepOutput:
    loss_sum: torch.Tensor          # device scalar: the step's summed loss (non-finite if any micro-batch was)
    sums: torch.Tensor              # device: the task's metric sums of the step
    applied: bool = True            # False: skipped for a non-finite loss (only with skip_nonfinite)


def new_scaler(device: torch.device) -> torch.amp.GradScaler:
    """fp16's loss scaler, with a device counter of the steps it skipped (``overflows``: saved in checkpoints)."""
    scaler = torch.amp.GradScaler(device.type)
    scaler.overflows = torch.zeros((), dtype=torch.float32, device=device)
    return scaler


def reset_scaler(sc: StepContext) -> None:
    """After a step that failed part-way (out of memory, a failed recording): the scaler forgets that step,
    so the step can run again (GradScaler refuses a second unscale_ before update())."""
    if sc.scaler is not None:
        from torch.amp.grad_scaler import _refresh_per_optimizer_state

        sc.scaler._per_optimizer_states[id(sc.optimizer)] = _refresh_per_optimizer_state()
        for name in ("grad_scale", "found_inf"):
            if hasattr(sc.optimizer, name):
                delattr(sc.optimizer, name)


def train_step(sc: StepContext, micro_batches: list, normalizer: Union[float, torch.Tensor]) -> StepOutput:
    """One optimizer step over ``micro_batches`` (on the device). ``normalizer`` divides the summed loss:
    a Python number, or a device tensor holding its reciprocal: inside a CUDA graph (refilled before each
    replay), and under DDP with class weights (summed over ranks, engine._global_reciprocal)."""
    try:
        return _train_step(sc, micro_batches, normalizer)
    except BaseException:
        reset_scaler(sc)
        raise


def _train_step(sc: StepContext, micro_batches: list, normalizer: Union[float, torch.Tensor]) -> StepOutput:
    device = sc.ctx.device
    if sc.recording:  # inside a graph the gradients stay the same tensors between replays: zeroed, not freed
        sc.optimizer.zero_grad(set_to_none=False)
    sums = sc.task.new_sums(device)
    loss_total = torch.zeros((), dtype=torch.float32, device=device)
    applied = True
    for j, batch in enumerate(micro_batches):
        last = j + 1 == len(micro_batches)
        # Skip DDP's gradient all-reduce on micro-steps that do not end the step.
        sync = sc.model.no_sync() if isinstance(sc.model, DDP) and not last else contextlib.nullcontext()
        with sync:
            # cache off while recording: cached bf16 copies of the weights would outlive the capture
            with autocast(device, sc.amp_dtype, cache=not sc.recording):
                logits = sc.model(**batch.model_inputs()).logits              # 1. forward
            loss_sum = sc.task.loss_sum(logits, batch.labels)         # 2. loss
            if sc.skip_nonfinite and not sc.ctx.all_agree(bool(torch.isfinite(loss_sum).item())):
                applied = False  # asked for: a host sync per micro-step, agreed by every rank
                continue
            # the outputs before backward: running out of memory can then only come before AdamW
            sc.task.add_sums(sums, loss_sum, logits, batch.labels)
            loss_total += loss_sum.detach()
            # A graph gets 1/normalizer in a device tensor and multiplies: what CUDA does for a Python divisor.
            scaled = loss_sum * normalizer if torch.is_tensor(normalizer) else loss_sum / normalizer
            if sc.scaler is not None:
                scaled = sc.scaler.scale(scaled)
            scaled.backward()                                         # 3. backward
    if sc.grad_sync is not None:  # once per step on every rank, whatever the step did: the collectives pair up
        sc.grad_sync()                                                # 3b. gradients averaged over the ranks
    if applied:
        if sc.scaler is not None:
            sc.scaler.unscale_(sc.optimizer)  # the clipping sees true gradients; an overflow sets found-inf
            found = list(sc.scaler._found_inf_per_device(sc.optimizer).values())
            if sc.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(sc.model.parameters(), sc.max_grad_norm)
            sc.scaler.step(sc.optimizer)  # fused AdamW skips the update on the device when found-inf is set
            sc.scaler.update()
            for flag in found:  # counted on the device, not read; after update(), so a step run again counts once
                sc.scaler.overflows.add_(flag)
        elif sc.max_grad_norm > 0 and folds_clipping(sc):
            _step_clipped(sc)                                         # 4. clip and AdamW in one pass
        else:
            if sc.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(sc.model.parameters(), sc.max_grad_norm)
            sc.optimizer.step()                                       # 4. clip, then AdamW
    if not sc.recording:  # freed at once, so evaluation and checkpoints do not hold a copy of them
        sc.optimizer.zero_grad(set_to_none=True)                      # 5. zero gradients
    return StepOutput(loss_total, sums, applied)


def folds_clipping(sc: StepContext) -> bool:
    """Whether the clipping rides in the fused AdamW's pass: its kernel divides each gradient by a device scalar
    (``grad_scale``, the hook GradScaler uses) as it reads it, and writes the clipped gradient back, so the
    clipping's own multiply (a read and a write of every gradient) becomes that write: one read of every gradient
    fewer. Only the fused AdamW (CUDA, or fp16 anywhere) has that hook, and fp16's scaler already uses it for its
    own purpose: so this is the CUDA path in bf16 and fp32."""
    return sc.scaler is None and bool(sc.optimizer.defaults.get("fused"))


def _step_clipped(sc: StepContext) -> None:
    """clip_grad_norm_ then AdamW, as one pass over the gradients: the fused AdamW divides them by
    max(1, (norm + 1e-6) / max_norm), the reciprocal of clip_grad_norm_'s clamped coefficient. The norm is
    torch's own (``get_total_norm``), on the device: no host sync. The kernel takes the divisor in fp32."""
    grads = [p.grad for group in sc.optimizer.param_groups for p in group["params"] if p.grad is not None]
    try:
        norm = torch.nn.utils.get_total_norm(grads).float()
        sc.optimizer.grad_scale = torch.clamp((norm + 1e-6) / sc.max_grad_norm, min=1.0)
        sc.optimizer.step()
    finally:
        if hasattr(sc.optimizer, "grad_scale"):
            del sc.optimizer.grad_scale


def scaling_summary(sc: StepContext) -> Optional[str]:
    """fp16: the loss scale reached and the steps skipped for overflowing gradients, of the steps taken (the
    scheduler's count, resumed runs' earlier steps included). Reads the device: called once, at the end of the
    run, and says nothing if the device cannot answer (the run's own error is the one to see)."""
    if sc.scaler is None:
        return None
    try:
        overflows, scale = int(sc.scaler.overflows.item()), sc.scaler.get_scale()
    except Exception:
        return None
    return (f"fp16 loss scaling: scale {scale:g} at the end; {overflows} of {sc.scheduler.last_epoch} optimizer "
            f"steps skipped for overflowing gradients")


class EagerSteps:
    """Runs each step as it comes (no recording): every device, DDP, accumulation, skipped steps."""

    def __init__(self, sc: StepContext):
        self.sc = sc

    def __call__(self, micro_batches: list, normalizer: float) -> StepOutput:
        return train_step(self.sc, [b.to(self.sc.ctx.device) for b in micro_batches], normalizer)

    def summary(self) -> Optional[str]:
        return scaling_summary(self.sc)

    def close(self) -> None:
        pass
