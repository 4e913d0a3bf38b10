"""The run, from flags to checkpoint: shared by train_single.py and train_ddp.py.

config -> process context -> tokenizer and data -> model -> fit -> checkpoint.
The two entry points differ only in whether the process context comes from torchrun.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from training import checkpoint, data, engine, model as model_lib
from training.config import TrainConfig, parse_config
from training.distributed import ProcessContext, process_context
from training.runlog import RunLogger
from training.utils import UserError, autocast_dtype, set_seed


# Lengths padded to multiples of 32: at most max_length/32 shapes, so few graphs to capture.
CUDAGRAPH_PAD_MULTIPLE = 32
# Measured on an H100 (BENCHMARKS.md): capture costs ~80 s and saves ~13 ms a step at batch 32,
# so graphs pay back after ~6000 steps; shorter runs stay eager under --compile auto.
CUDAGRAPH_MIN_STEPS = 6000


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _make_run_dir(cfg: TrainConfig, ctx: ProcessContext) -> Path:
    """Rank 0 names and creates the run directory; every rank learns its path."""
    error, run_dir = None, None
    if ctx.is_main:
        name = cfg.run_name or time.strftime("run-%Y%m%d-%H%M%S")
        run_dir = Path(cfg.checkpoint_dir) / name
        try:
            run_dir.mkdir(parents=True, exist_ok=cfg.run_name is not None)
            probe = run_dir / ".write-test"
            probe.write_text("")
            probe.unlink()
        except FileExistsError:
            error = f"run directory {run_dir} already exists"
        except OSError as exc:
            error = f"cannot write to checkpoint directory {cfg.checkpoint_dir}: {exc.strerror or exc}"
    error, run_dir = ctx.broadcast_object((error, str(run_dir) if run_dir else None))
    if error:
        raise UserError(error)
    return Path(run_dir)


def _quiet_libraries() -> None:
    """Our own log lines and bar replace the libraries' per-operation progress bars."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


def run(cfg: TrainConfig, ctx: ProcessContext) -> int:
    t_start = time.perf_counter()
    _quiet_libraries()
    run_dir = _make_run_dir(cfg, ctx)
    log = RunLogger(run_dir, ctx, show_progress=not cfg.no_progress, tensorboard=cfg.tensorboard)
    try:
        return _train(cfg, ctx, run_dir, log, t_start)
    finally:
        log.close()


class BestTracker:
    """Saves RUN/best when the chosen validation metric improves; says when to stop early.

    Called on every rank with the same reduced metrics, so all ranks agree; the
    CheckpointWriter decides who writes.
    """

    KEYS = {"accuracy": ("accuracy", 1), "f1": ("macro_f1", 1), "loss": ("loss", -1)}

    def __init__(self, metric: str, patience: int, writer, model, tokenizer, config: dict, log: RunLogger):
        self.key, self.sign = self.KEYS[metric]
        self.metric, self.patience = metric, patience
        self.writer, self.model, self.tokenizer, self.config, self.log = writer, model, tokenizer, config, log
        self.best, self.best_epoch, self.stale, self.stopped_early = None, None, 0, False

    def __call__(self, result, optimizer, scheduler, global_step) -> bool:
        value = result.validation[self.key]
        if self.best is None or self.sign * value > self.sign * self.best:
            self.best, self.best_epoch, self.stale = value, result.epoch, 0
            state = checkpoint.training_state(optimizer, scheduler, epoch=result.epoch, global_step=global_step,
                                              config=self.config)
            self.writer.save("best", self.model, self.tokenizer, state)
            return False
        self.stale += 1
        if self.patience and self.stale >= self.patience:
            self.stopped_early = True
            self.log.print(f"early stopping: no better val {self.metric} than {self.best:.4f} (epoch "
                           f"{self.best_epoch}) for {self.stale} epoch(s)")
            return True
        return False


def _train(cfg: TrainConfig, ctx: ProcessContext, run_dir: Path, log: RunLogger, t_start: float) -> int:
    amp_dtype = autocast_dtype(ctx.device, cfg.precision)
    global_batch = cfg.batch_size * ctx.world_size * cfg.grad_accum_steps
    log.print(f"device {ctx.device} x {ctx.world_size} process(es) | precision "
              f"{'bf16 autocast' if amp_dtype else 'fp32'} | global batch {global_batch} "
              f"({cfg.batch_size} per process x {ctx.world_size} x {cfg.grad_accum_steps} accumulation)")

    set_seed(cfg.seed)
    tokenizer = model_lib.load_tokenizer(cfg.model)
    source = data.DataSource.from_args(cfg.dataset, cfg.dataset_config, cfg.train_file, cfg.validation_file,
                                       cfg.text_column, cfg.label_column)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.checkpoint_dir) / "cache"
    prepared = data.prepare_data(source, tokenizer, ctx, cache_dir=cache_dir, max_length=cfg.max_length,
                                 validation_fraction=cfg.validation_fraction, split_seed=cfg.split_seed,
                                 num_samples=cfg.num_samples)
    for note in prepared.info.get("notes", []):
        log.print(f"note: {note}")
    log.print(f"data: {prepared.info['source']} | {len(prepared.train)} train, {len(prepared.validation)} validation"
              f" | labels {', '.join(map(str, prepared.label_names))}")

    set_seed(cfg.seed)  # the classifier head starts the same whatever happened above
    model = model_lib.load_model(cfg.model, prepared.label_names)
    torch.manual_seed(cfg.seed + ctx.rank)  # dropout differs across ranks; DDP syncs the weights anyway
    log.print(f"model: {model_lib.resolve_model_path(cfg.model) if cfg.model != 'default' else 'all-MiniLM-L6-v2 (bundled)'}"
              f" | {model_lib.count_parameters(model) / 1e6:.1f}M parameters | new head for {len(prepared.label_names)} labels")

    compile_mode = cfg.compile
    if compile_mode == "auto":
        planned_steps = cfg.epochs * math.ceil(len(prepared.train) / global_batch)
        long_enough = planned_steps >= CUDAGRAPH_MIN_STEPS
        compile_mode = "cudagraphs" if ctx.device.type == "cuda" and not ctx.distributed and long_enough else "off"
    if compile_mode == "cudagraphs" and ctx.device.type != "cuda":
        raise UserError("--compile cudagraphs needs a CUDA device")
    log.print(f"compile: {compile_mode}")
    train_loader, eval_loader = data.make_loaders(
        prepared, tokenizer, ctx, batch_size=cfg.batch_size, eval_batch_size=cfg.effective_eval_batch_size,
        seed=cfg.seed, num_workers=cfg.num_workers,
        group_by_length=not cfg.no_group_by_length, accum_steps=cfg.grad_accum_steps,
        pad_multiple=CUDAGRAPH_PAD_MULTIPLE if compile_mode == "cudagraphs" else None)
    log.write_json("config.json", {
        "config": cfg.to_dict(), "world_size": ctx.world_size, "global_batch_size": global_batch,
        "device": str(ctx.device), "precision": "bf16" if amp_dtype else "fp32", "compile": compile_mode,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0]}, "git_commit": _git_commit()})
    log.write_json("data.json", prepared.info)

    writer = checkpoint.CheckpointWriter(run_dir, ctx)
    tracker = BestTracker(cfg.metric_for_best, cfg.early_stopping_patience, writer, model, tokenizer,
                          cfg.to_dict(), log)
    optimizer, scheduler, results, global_step = engine.fit(
        model, train_loader, eval_loader, ctx=ctx, log=log, epochs=cfg.epochs, lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio, max_grad_norm=cfg.max_grad_norm,
        grad_accum_steps=cfg.grad_accum_steps, amp_dtype=amp_dtype, log_every=cfg.log_every,
        compile_model=None if compile_mode == "off" else compile_mode, on_epoch_end=tracker)

    last = results[-1]
    state = checkpoint.training_state(optimizer, scheduler, epoch=last.epoch, global_step=global_step,
                                      config=cfg.to_dict())
    final = writer.save("final", model, tokenizer, state)
    total = time.perf_counter() - t_start
    best = next(r for r in results if r.epoch == tracker.best_epoch)
    train_time = sum(r.train_time_s for r in results)
    summary = {"final_val_accuracy": last.validation["accuracy"], "final_val_loss": last.validation["loss"],
               "final_val_f1": last.validation["macro_f1"], "metric_for_best": cfg.metric_for_best,
               "best_epoch": best.epoch, "best_val_accuracy": best.validation["accuracy"],
               "best_val_loss": best.validation["loss"], "best_val_f1": best.validation["macro_f1"],
               "epochs_run": len(results), "stopped_early": tracker.stopped_early, "total_time_s": round(total, 2),
               "train_samples_per_s": round(sum(r.train["count"] for r in results) / train_time, 2),
               "checkpoint": str(final), "best_checkpoint": str(run_dir / "best")}
    log.write_json("summary.json", summary)
    log.print(_summary_table(summary))
    return 0


def _summary_table(s: dict) -> str:
    rows = [("", "accuracy", "macro-F1", "loss", "checkpoint"),
            (f"best (epoch {s['best_epoch']}, by {s['metric_for_best']})", f"{s['best_val_accuracy']:.4f}",
             f"{s['best_val_f1']:.4f}", f"{s['best_val_loss']:.4f}", s["best_checkpoint"]),
            (f"last (epoch {s['epochs_run']})", f"{s['final_val_accuracy']:.4f}", f"{s['final_val_f1']:.4f}",
             f"{s['final_val_loss']:.4f}", s["checkpoint"])]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    early = " (stopped early)" if s["stopped_early"] else ""
    return ("\nvalidation summary\n" + "\n".join(lines) +
            f"\n{s['epochs_run']} epoch(s){early} in {s['total_time_s']:.1f}s | "
            f"training throughput {s['train_samples_per_s']:.1f} samples/s")


def main(argv=None, *, use_torchrun: bool, description: str = "") -> int:
    try:
        cfg = parse_config(argv, description)
        with process_context(cfg.device, use_torchrun) as ctx:
            return run(cfg, ctx)
    except UserError as exc:
        if exc.rank_local or os.environ.get("RANK", "0") == "0":
            prefix = "" if os.environ.get("RANK", "0") == "0" else f"[rank {os.environ['RANK']}] "
            print(f"{prefix}error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
