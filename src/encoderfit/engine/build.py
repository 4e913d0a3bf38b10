"""The training step's parts, built in one place for the trainer and the benchmarks: the model as trained (DDP's
wrapper or not, compiled or not), AdamW, the schedule, and the runner of steps (eager, or CUDA graphs)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from encoderfit.engine import loop
from encoderfit.engine.distributed import ProcessContext
from encoderfit.engine.step import EagerSteps, StepContext, new_scaler


@dataclass(frozen=True)
class Optimization:
    """AdamW and its schedule: the config's optimization flags, with the number of optimizer steps planned."""
    learning_rate: float
    weight_decay: float
    warmup_ratio: float
    max_grad_norm: float
    total_steps: int
    skip_nonfinite: bool = False


@dataclass(frozen=True)
class Speed:
    """How steps run: compiled (loop.COMPILE_MODES: off, regional, whole), recorded as CUDA graphs, under
    autocast (None: fp32; torch.float16: with loss scaling)."""
    compile_mode: str = "off"
    cuda_graphs: bool = False
    amp_dtype: Optional[torch.dtype] = None


@dataclass
class Steps:
    train_model: torch.nn.Module  # what the step calls: DDP's wrapper or the compiled model where they apply
    optimizer: torch.optim.Optimizer
    scheduler: object
    runner: object                # runner(micro_batches, normalizer) -> StepOutput; .summary(); .close()
    scaler: Optional[torch.amp.GradScaler] = None  # fp16's loss scaling: its state goes into checkpoints


def build_steps(model: torch.nn.Module, task, ctx: ProcessContext, optimization: Optimization,
                speed: Speed) -> Steps:
    """The parts of a training step for ``model`` (unwrapped: checkpoints save it). Under CUDA graphs the
    recorded step all-reduces the gradients itself, so DDP's wrapper is left out."""
    train_model = loop.prepare_for_training(model, ctx, compile_mode=speed.compile_mode,
                                            wrap_ddp=not speed.cuda_graphs)
    fp16 = speed.amp_dtype == torch.float16
    # fp16: the fused AdamW takes the scaler's found-inf flag on the device (no host sync), also on the CPU
    optimizer = loop.build_optimizer(model, lr=optimization.learning_rate, weight_decay=optimization.weight_decay,
                                     fused=ctx.device.type == "cuda" or fp16)
    scaler = new_scaler(ctx.device) if fp16 else None
    scheduler = loop.build_scheduler(optimizer, total_steps=optimization.total_steps,
                                     warmup_ratio=optimization.warmup_ratio)
    sc = StepContext(train_model, optimizer, scheduler, task, speed.amp_dtype, optimization.max_grad_norm, ctx,
                     skip_nonfinite=optimization.skip_nonfinite, scaler=scaler)
    if speed.cuda_graphs:
        from encoderfit.engine.graphs import StepGraphs  # CUDA only

        runner = StepGraphs(sc)
    else:
        runner = EagerSteps(sc)
    return Steps(train_model, optimizer, scheduler, runner, scaler)
