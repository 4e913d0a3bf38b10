"""The trainer: a run from flags to checkpoint, shared by train_single.py and train_ddp.py.

config -> process context -> tokenizer and data -> task -> model -> run state -> fit -> checkpoint.
The two entry points differ only in whether the process context comes from torchrun.
"""
from __future__ import annotations

import dataclasses
import errno
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from encoderfit.run import checkpoint
from encoderfit import data
from encoderfit.engine import loop as engine
from encoderfit.modeling import model as model_lib
from encoderfit.modeling import packing
from encoderfit import tasks
from encoderfit.run import resume as resume_lib
from encoderfit.config import TrainConfig
from encoderfit.metrics import shown_metric
from encoderfit.engine.distributed import ProcessContext, StopSignal, process_context
from encoderfit.modeling.long_texts import LongTexts
from encoderfit.run.result import RunResult
from encoderfit.run.testset import TestSet
from encoderfit.run.runlog import RunClock, RunLogger, format_breakdown
from encoderfit.engine.build import Optimization, Speed, build_steps
from encoderfit.utils import UserError, autocast_dtype, precision_name, set_seed

# Lengths padded to multiples of 32: at most max_length/32 shapes, so few graphs to record.
CUDAGRAPH_PAD_MULTIPLE = 32
# Measured on an H100 (BENCHMARKS.md): the regional compile of BERT-base costs 12.8 s cold (0.3 s from the cache)
# and saves 0.60 us a real training token under CUDA graphs, so it pays back after ~21 million tokens; below
# this, --compile auto is off.
COMPILE_MIN_TOKENS = 20_000_000
COMPILE_OF_FLAG = {"on": "regional", "whole": "whole", "off": "off"}  # --compile -> engine.COMPILE_MODES
COMPILE_SAID = {"regional": "on (each encoder layer)", "whole": "on (the whole model)", "off": "off"}



def choose_speed(cfg: TrainConfig, ctx: ProcessContext, *, planned_tokens: float) -> tuple[str, bool]:
    """(compile mode, cuda graphs) to train with: 'auto' resolved, and what CUDA graphs cannot serve refused.

    A graph replays one whole optimizer step: a step of several micro-batches (accumulation) or one
    that may be skipped (a non-finite loss, which needs a host sync to know) does not fit it. Under
    torchrun the step's gradient all-reduce is recorded with it (NCCL; training/graphs.py).
    """
    unfit = ("a CUDA device" if ctx.device.type != "cuda" else
             "--grad_accum_steps above 1" if cfg.grad_accum_steps > 1 else
             "--skip_nonfinite" if cfg.skip_nonfinite else None)
    if cfg.cuda_graphs == "on" and unfit:
        raise UserError(f"--cuda_graphs on does not work with {unfit}" if unfit != "a CUDA device"
                        else "--cuda_graphs on needs a CUDA device")
    graphs = cfg.cuda_graphs == "on" or (cfg.cuda_graphs == "auto" and unfit is None)
    if cfg.compile == "auto":  # each rank compiles (in parallel) and saves time on its own share of the tokens
        pays = ctx.device.type == "cuda" and planned_tokens / ctx.world_size >= COMPILE_MIN_TOKENS
        return ("regional" if pays else "off"), graphs
    return COMPILE_OF_FLAG[cfg.compile], graphs


def fit_compile(mode: str, cfg: TrainConfig, model, ctx: ProcessContext) -> str:
    """The compile mode that this model and GPU allow: Triton's kernels need compute capability 7.0 (auto: off;
    asked for: refused), and the regional compile needs a stack of repeated layers (auto: off; on: the whole
    model, as the run's header says)."""
    if mode == "off":
        return mode
    if ctx.device.type == "cuda" and torch.cuda.get_device_capability(ctx.device) < (7, 0):
        if cfg.compile == "auto":
            return "off"
        raise UserError(f"--compile {cfg.compile} needs a GPU of compute capability 7.0 or newer (Triton's kernels): "
                        f"use --compile off")
    if mode == "regional" and engine.repeated_layers(model) is None:
        return "off" if cfg.compile == "auto" else "whole"
    return mode


def project_cache(cfg: TrainConfig) -> Path:
    """Where tokenized data and compiled code are cached: --cache_dir, else CHECKPOINT_DIR/cache (each node's own)."""
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.checkpoint_dir) / "cache"


def choose_unpadded(cfg: TrainConfig, model, ctx: ProcessContext, amp_dtype) -> tuple[bool, str]:
    """(train unpadded, what the run says about its batches): 'auto' resolved, 'on' refused where it cannot run."""
    if cfg.unpadded == "off":
        return False, "padded"
    why = packing.unfit(model, ctx.device, amp_dtype)
    if why is None:
        return True, "unpadded"
    if cfg.unpadded == "on":
        raise UserError(f"--unpadded on needs {why}")
    return False, f"padded (unpadded needs {why})"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class RunInUse(UserError):
    """A run directory another live process holds (``holder``: which, as its lock file says)."""

    def __init__(self, message: str, holder: str):
        super().__init__(message)
        self.holder = holder


class RunLock:
    """One writer per run directory: an OS file lock on RUN/.lock, held by the main process while it runs.

    The operating system releases it when the process ends, however it ends, so a lock left by a
    killed run never blocks ``--resume auto``; a second launch on a live run fails at once.
    """

    def __init__(self, run_dir: Path):
        import fcntl

        self.file = open(run_dir / ".lock", "a+")
        try:
            # lockf (a POSIX record lock), not flock: forked DataLoader workers do not inherit it, so a killed
            # main process releases it at once even while its workers are still winding down
            fcntl.lockf(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):  # a filesystem without locks: run without one
                warnings.warn(f"cannot lock {run_dir} ({exc.strerror}): a second launch on it would not be refused")
                return
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise RunInUse(f"{run_dir} is in use by {holder}: one run writes to a run directory at a time "
                           f"(wait for it to end, or stop it, then --resume auto)", holder) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.file.flush()

    def release(self) -> None:
        self.file.close()  # closing the file releases the lock


def _make_run_dir(cfg: TrainConfig, ctx: ProcessContext, existing: Path | None = None) -> tuple:
    """Rank 0 names and creates the run directory (or reuses the resumed one) and takes its lock; every rank
    learns its path. Returns (path, the lock on the main process or None)."""
    lock = []

    def make() -> str:
        name = cfg.run_name or time.strftime("run-%Y%m%d-%H%M%S")
        run_dir = existing or Path(cfg.checkpoint_dir) / name
        try:
            # a named run may already exist only when resuming it
            run_dir.mkdir(parents=True, exist_ok=existing is not None or (cfg.run_name is not None and bool(cfg.resume)))
            probe = run_dir / ".write-test"
            probe.write_text("")
            probe.unlink()
            lock.append(RunLock(run_dir))
        except FileExistsError:
            if not run_dir.is_dir():
                raise UserError(f"--run_name {name}: {run_dir} is a file, not a run directory") from None
            raise UserError(f"run directory {run_dir} already exists (pick another --run_name, or continue it "
                            f"with --resume auto)") from None
        except OSError as exc:
            raise UserError(f"cannot write to checkpoint directory {cfg.checkpoint_dir}: {exc.strerror or exc}") \
                from None
        return str(run_dir)

    return Path(ctx.run_on_main(make)), (lock[0] if lock else None)


def _quiet_libraries() -> None:
    """Our own log lines and bar replace the libraries' per-operation progress bars."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


class BestTracker:
    """Keeps RUN/best for the chosen validation metric and says when to stop early.

    Called on every rank with the same reduced metrics, so all ranks agree; the
    CheckpointWriter decides who writes.
    """

    def __init__(self, metric: str, patience: int, task, log: RunLogger):
        if metric not in task.best_metrics:
            raise UserError(f"--metric_for_best {metric} is not a metric of this task "
                            f"(choose from: {', '.join(task.best_metrics)})")
        self.metric, self.sign, self.patience, self.log = metric, task.best_metrics[metric], patience, log
        self._signs = dict(task.best_metrics)
        # what was asked for: a sweep ranks and prunes trials by it even where this run fell back to the loss
        self.requested, self.requested_sign = metric, task.best_metrics[metric]
        self.best, self.best_epoch, self.stale, self.stopped_early = None, None, 0, False
        self.best_loss = None  # the loss of the epoch best/ holds: the selector if the metric turns undefined
        self.stop_reason = None  # why it stopped early: "patience", or what a sweep's judge said

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "stale": self.stale,
                "stopped_early": self.stopped_early, "stop_reason": self.stop_reason, "metric": self.metric,
                "best_loss": self.best_loss}

    def load_state_dict(self, saved: dict) -> None:
        self.best, self.best_epoch, self.stale = saved["best"], saved["best_epoch"], saved["stale"]
        self.stopped_early = saved.get("stopped_early", False)
        self.stop_reason = saved.get("stop_reason", "patience" if self.stopped_early else None)
        if saved.get("metric") == "loss":  # the run had fallen back to the loss
            self.metric, self.sign = "loss", -1
        elif saved.get("metric") in self._signs and saved["metric"] != self.metric:
            # begun under another default (a regression chose by Pearson before MSE): it goes on choosing as
            # it began, so best/ and early stopping compare like with like
            self.metric = self.requested = saved["metric"]
            self.sign = self.requested_sign = self._signs[saved["metric"]]
        self.best_loss = saved.get("best_loss")

    def stop(self, reason: str) -> None:
        self.stopped_early, self.stop_reason = True, reason

    def improved(self, validation: dict, epoch: int) -> bool:
        value = validation[self.metric]
        if math.isnan(value) and self.metric != "loss":  # undefined (a correlation of equal targets): never the selector
            self.log.print(f"note: val {self.metric} is undefined at epoch {epoch} (a correlation of values that are "
                           f"all equal, or no examples to count): best/ is chosen by val loss from here on")
            self.metric, self.sign, self.best = "loss", -1, self.best_loss
            value = validation["loss"]
        # NaN (a correlation of constant predictions) never beats a number, and any number beats a NaN best
        first, nan_best = self.best is None, self.best is not None and math.isnan(self.best)
        if first or (not math.isnan(value) and (nan_best or self.sign * value > self.sign * self.best)):
            self.best, self.best_epoch, self.stale = value, epoch, 0
            self.best_loss = validation["loss"]
            return True
        self.stale += 1
        return False

    def should_stop(self) -> bool:
        if self.patience and self.stale >= self.patience:
            self.stop("patience")
            self.log.print(f"early stopping: no better val {self.metric} than {self.best:.4f} (epoch "
                           f"{self.best_epoch}) for {self.stale} epoch(s)")
        return self.stopped_early


@dataclass
class RunState:
    """Everything that changes while training, each part saving and restoring itself: the optimizer,
    the scheduler, the loop, the best-checkpoint tracker and (in ``payload``) every rank's RNG."""
    optimizer: torch.optim.Optimizer
    scheduler: object
    loop: engine.LoopState
    tracker: BestTracker
    run_record: dict  # what the checkpoint says about the run: config, world size, labels, tokenizer, task
    task: tasks.Task  # its record is taken at each save: a tuned threshold changes during the run
    clock: RunClock   # where the wall time went, this process's and (restored) the earlier ones'
    test_set: TestSet | None = None  # scored once with best/ when the run ends (the main process)
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scale, saved and restored for an exact resume

    def payload(self, ctx: ProcessContext) -> dict:
        """The training state of a checkpoint. A collective: every rank is here."""
        loop = self.loop.reduce_for_checkpoint(ctx)
        rng = ctx.all_gather_object(checkpoint.rng_state())
        return checkpoint.training_state(self.optimizer, self.scheduler, loop=loop, rng=rng,
                                         run={**self.run_record, "task": self.task.record(),
                                              "clock": self.clock.state_dict()},
                                         tracker=self.tracker.state_dict(), scaler=self.scaler)

    def restore(self, saved: dict, ctx: ProcessContext, task) -> None:
        if not saved.get("finished"):  # a finished run keeps no optimizer state: it has no step left to take
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            if self.scaler is not None and "scaler" in saved:  # (a run begun in bf16 or fp32 starts a new scale)
                self.scaler.load_state_dict(saved["scaler"])
                self.scaler.overflows.fill_(saved["scaler"].get("overflows", 0))
        self.tracker.load_state_dict(saved["tracker"])
        self.loop = engine.LoopState.restore(saved["loop"], ctx, task)
        task.restore(saved.get("task") or {})
        if "clock" in saved:
            self.clock.load_state_dict(saved["clock"])
        else:  # a checkpoint from before the clock: its epochs' own times at least, and one earlier process
            done = self.loop.results
            self.clock.load_state_dict({"processes": 1, "wall_s": self.loop.epoch_time_s + sum(
                r["epoch_time_s"] + r["eval_time_s"] for r in done)})


class CheckpointHooks(engine.Hooks):
    """Step checkpoints, preemption, the best checkpoint and early stopping, around the engine's loop."""

    def __init__(self, cfg: TrainConfig, ctx: ProcessContext, state: RunState, writer, stop: StopSignal, log):
        self.cfg, self.ctx, self.state, self.writer, self.stop, self.log = cfg, ctx, state, writer, stop, log
        self.model, self.tokenizer = None, None  # set by the trainer before fit
        # a sweep's pruner: [(epoch, signed metric)] so far -> why to stop, or None; the same on every rank
        self.judge = None

    @property
    def excluded_s(self) -> float:
        return self.state.clock.phases["checkpoints"]  # the engine leaves checkpoint writes out of training

    def save(self, name: str | None = None) -> Path:
        """A resumable step checkpoint, or (``name``: best, final) the model and tokenizer alone."""
        with self.state.clock.timing("checkpoints"):
            model_lib.record_task(self.model, self.state.task)  # what the task decided since (a tuned threshold)
            if name:
                return self.writer.save_model(name, self.model, self.tokenizer, self.state.loop.global_step)
            return self.writer.save_step(self.model, self.tokenizer, self.state.payload(self.ctx))

    def finish(self) -> Path:
        """final/, and the step checkpoints trimmed to what a finished run needs."""
        final = self.save("final")
        with self.state.clock.timing("checkpoints"):
            self.writer.finish(self.state.payload(self.ctx))
        return final

    def after_step(self, loop: engine.LoopState, end_of_epoch: bool) -> bool:
        every = self.cfg.save_every_steps
        stopping = self.stop.requested(self.ctx, loop.global_step, self.cfg.log_every)
        periodic = every and loop.global_step % every == 0 and not end_of_epoch
        if stopping or periodic:
            loop.check_finite(self.ctx)  # never write a checkpoint after a non-finite step
            path = self.save()
            if stopping:
                with self.state.clock.timing("checkpoints"):
                    self.writer.wait()  # on disk before the process says so and exits
                again = ("the same command again" if self.cfg.resume == "auto" and self.cfg.run_name else
                         f"the same command plus: --resume auto --run_name {self.writer.run_dir.name}")
                self.log.print(f"stopped by {self.stop.name} after step {loop.global_step} (epoch {loop.epoch}); "
                               f"checkpoint {path}\nresume with {again}")
        return stopping

    def on_epoch_end(self, result: engine.EpochResult) -> bool:
        tracker = self.state.tracker
        improved = tracker.improved(result.validation, result.epoch)
        stopping = tracker.should_stop()  # decided before saving, so a resume knows it too
        if not stopping and self.judge is not None:  # every epoch so far: a resumed run's earlier ones too
            reason = self.judge([(r["epoch"], tracker.requested_sign * r[f"val_{tracker.requested}"])
                                 for r in self.state.loop.results])
            if reason:
                tracker.stop(reason)
                self.log.print(f"stopping after epoch {result.epoch}: {reason}")
                stopping = True
        self.save()  # the start of the next epoch: resumable
        if improved:  # after it, so that best/ shares its files
            self.save("best")
        return stopping


def run(cfg: TrainConfig, ctx: ProcessContext, started: float | None = None, *, judge=None,
        given=None, test=None) -> RunResult:
    """One run in a process context that exists; ``judge``: a sweep's say at each epoch's end
    (``CheckpointHooks.judge``)."""
    clock = RunClock(started if started is not None else time.perf_counter())
    _quiet_libraries()
    if cfg.push_to_hub:  # before any work: offline or logged out, the run would train for nothing to share
        from encoderfit.serve.hub import check_hub_access

        ctx.run_on_main(lambda: check_hub_access(cfg.push_to_hub))
    point = resume_lib.locate(cfg.resume, cfg.checkpoint_dir, cfg.run_name, ctx) if cfg.resume else None
    existing = point.run_dir if point and point.run_dir and point.run_dir.is_dir() else None
    run_dir, lock = _make_run_dir(cfg, ctx, existing=existing)
    log = RunLogger(run_dir, ctx, show_progress=not cfg.no_progress)
    for note in point.notes if point else []:
        if judge is not None and note.startswith("nothing to resume"):  # a sweep's fresh trial: nothing to say
            continue
        log.print(f"resume: {note}")
    try:
        if cfg.trackers:
            from encoderfit.run.tracking import check_installed

            ctx.run_on_main(lambda: check_installed(cfg.trackers))
        with StopSignal(log) as stop:
            return _train(cfg, ctx, log, point.checkpoint if point else None, stop, clock, judge, given, test)
    except BaseException:
        log.close(failed=True)
        if existing is None and ctx.is_main and not (run_dir / "config.json").exists():
            # a failed start (bad data or model, interrupted preparation): leave no empty run directory,
            # so the corrected command with the same --run_name runs
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        log.close()
        if lock is not None:
            lock.release()


def prepare(cfg: TrainConfig, given=None) -> None:
    """The tokenized cache of ``cfg``'s data, made in this process: the processes started after it (a
    sweep's parallel workers) all read it instead of each tokenizing the same texts."""
    with process_context("cpu", False) as ctx:
        _quiet_libraries()
        tokenizer = model_lib.load_tokenizer(cfg.model)
        model_lib.check_model(cfg.model, tokenizer, cfg.max_length)  # a model that cannot serve: said here, once
        _load_data(cfg, ctx, tokenizer, RunLogger(None, ctx, show_progress=False), given)


def _load_data(cfg: TrainConfig, ctx: ProcessContext, tokenizer, log: RunLogger,
               given=None) -> data.TokenizedData:
    source = data.DataSource.from_settings(cfg, given=given)
    cache_dir = project_cache(cfg)
    prepared = data.prepare_data(source, tokenizer, ctx, cache_dir=cache_dir, max_length=cfg.max_length,
                                 long_texts=LongTexts.from_config(cfg), cache_key=cfg.values_marked("cache"),
                                 validation_fraction=cfg.validation_fraction, split_seed=cfg.split_seed,
                                 num_samples=cfg.num_samples, task=cfg.task)
    for note in prepared.info.get("notes", []):
        log.print(f"note: {note}")
    info = prepared.info
    shape = tasks.task_class(prepared.task).describe_labels(prepared.label_names)
    texts = " + ".join(info["text_columns"]) if len(info["text_columns"]) > 1 else None
    counts = f"{len(prepared.train)} train, {len(prepared.validation)} validation"
    if cfg.long_texts == "windows":
        counts = (f"{info['train_examples']} train, {info['validation_examples']} validation texts in "
                  f"{len(prepared.train)} and {len(prepared.validation)} windows")
    log.print(f"data: {info['source']} | {counts} | {shape}" + (f" | text pairs {texts}" if texts else ""))
    if len(prepared.train) < ctx.world_size:
        raise UserError(f"{len(prepared.train)} training example(s) for {ctx.world_size} processes: "
                        f"each process needs at least one")
    return prepared


def _train(cfg: TrainConfig, ctx: ProcessContext, log: RunLogger, resume_from: Path | None, stop: StopSignal,
           clock: RunClock, judge=None, given=None, test=None) -> RunResult:
    clock.lap("start-up")
    amp_dtype = autocast_dtype(ctx.device, cfg.precision)
    global_batch = cfg.batch_size * ctx.world_size * cfg.grad_accum_steps
    set_seed(cfg.seed)
    long_texts = LongTexts.from_config(cfg)
    tokenizer = model_lib.load_tokenizer(cfg.model)
    model_lib.check_model(cfg.model, tokenizer, cfg.max_length)
    prepared = _load_data(cfg, ctx, tokenizer, log, given)
    clock.lap("data")
    shape = tasks.task_class(prepared.task)
    if cfg.threshold != 0.5 and not shape.decides_by_threshold:  # 0.5 is the default: not given
        raise UserError(f"--threshold applies to multi-label classification; this data is a {shape.title} task")
    weights = shape.resolve_weights(cfg.class_weights, prepared.label_names, prepared.info)
    task = shape.build(prepared.label_names, weights, cfg.threshold).to(ctx.device)
    # a metric the task does not have: refused with the other input errors, before the model or the run's files
    tracker = BestTracker(cfg.metric_for_best or task.default_metric, cfg.early_stopping_patience, task, log)
    for line in task.setup_lines():
        log.print(line)
    test_set = TestSet.of(cfg, test, prepared.info["text_columns"])
    if test_set is not None:  # read and its labels checked before any training: a bad file wastes no run
        ctx.run_on_main(lambda: test_set.check(shape, task))
    run_record = {"config": cfg.to_dict(), "world_size": ctx.world_size, "label_names": list(task.label_names),
                  "tokenizer": data.tokenizer_identity(tokenizer), "task": task.record(),
                  "text_columns": prepared.info["text_columns"],
                  "data": prepared.info["fingerprint"]}
    saved = None
    if resume_from is not None:
        def read_state() -> dict:
            state = checkpoint.load_training_state(resume_from)
            resume_lib.check_compatible(state, run_record, where=resume_from)
            return state
        # Only the main process reads the checkpoint, so the nodes need not share a filesystem: the others
        # receive the training state from it here, and the weights from DDP's broadcast when it wraps the model.
        saved = ctx.run_on_main(read_state)

    set_seed(cfg.seed)  # the classifier head starts the same whatever happened above
    model = model_lib.load_model(str(resume_from) if saved and ctx.is_main else cfg.model, task,
                                 text_columns=prepared.info["text_columns"])
    long_texts = long_texts.for_pairs(len(prepared.info["text_columns"]) == 2)  # auto resolved, as the data was
    model.config.long_texts = long_texts.record()  # what predict.py and evaluate.py do with long texts by default
    if cfg.label_separator is not None or cfg.label_columns:  # how the labels were given: evaluate reads them so
        model.config.label_format = {"label_separator": cfg.label_separator, "label_columns": cfg.label_columns,
                                     "label_column": cfg.label_column if cfg.label_separator is not None else None}
    torch.manual_seed(cfg.seed + ctx.rank)  # dropout differs across ranks; DDP syncs the weights anyway
    log.print(f"model: {model_lib.resolve_model_path(cfg.model) if cfg.model != 'default' else 'all-MiniLM-L6-v2 (bundled)'}"
              f" | {model_lib.count_parameters(model) / 1e6:.1f}M parameters | "
              + (f"resumed from {resume_from}" if saved else
                 f"new head for {task.num_labels} {'output' if task.num_labels == 1 else 'labels'}"))

    compile_mode, use_graphs = choose_speed(
        cfg, ctx, planned_tokens=cfg.epochs * len(prepared.train) * prepared.info["train_tokens"]["mean"])
    compile_mode = fit_compile(compile_mode, cfg, model, ctx)
    # printed once the data and the model have been read: a run that fails on its input says only why
    log.print(f"device {ctx.device} x {ctx.world_size} process(es) | precision "
              f"{precision_name(amp_dtype) + ' autocast' if amp_dtype else 'fp32'}"
              f"{' with loss scaling' if amp_dtype == torch.float16 else ''} | global batch {global_batch} "
              f"({cfg.batch_size} per process x {ctx.world_size} x {cfg.grad_accum_steps} accumulation)")
    if amp_dtype == torch.float16 and ctx.device.type == "cpu":
        log.print("note: fp16 on the CPU runs far slower than fp32 (no fast fp16 matrix kernels there; 2.2 against "
                  "40 samples/s for the default model on 2 cores): --precision fp32 or bf16 is faster here")
    unpadded, batches_said = choose_unpadded(cfg, model, ctx, amp_dtype)
    log.print(f"compile: {COMPILE_SAID[compile_mode]} | CUDA graphs: {'on' if use_graphs else 'off'} | "
              f"batches: {batches_said}")
    if unpadded:
        packing.prepare(model)
    batching = data.Batching(cfg.batch_size, cfg.effective_eval_batch_size, cfg.seed, cfg.num_workers,
                             group_by_length=not cfg.no_group_by_length, grad_accum_steps=cfg.grad_accum_steps,
                             pad_multiple=CUDAGRAPH_PAD_MULTIPLE if use_graphs else None)
    loaders = data.make_loaders(prepared, tokenizer, ctx, batching, train_collate=packing.PackCollator(
        tokenizer, max_length=cfg.max_length, position_offset=packing.position_offset(model)) if unpadded else None)
    if not saved:
        log.write_json("config.json", {
            "config": cfg.to_dict(), "task": task.record(), "world_size": ctx.world_size, "backend": ctx.backend,
            "global_batch_size": global_batch, "device": str(ctx.device),
            "precision": precision_name(amp_dtype), "compile": compile_mode, "cuda_graphs": use_graphs,
            "unpadded": unpadded,
            "model_source": "bundled" if cfg.model == "default" else "local" if Path(cfg.model).expanduser().exists()
            else "hub",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": sys.version.split()[0]}, "git_commit": _git_commit()})
        log.write_json("data.json", prepared.info)

    steps_per_epoch = math.ceil(len(loaders[0]) / cfg.grad_accum_steps)
    if compile_mode != "off":  # a later run of this model and these shapes loads the compiled code from there
        engine.compile_cache(project_cache(cfg) / "compile")
    steps = build_steps(model, task, ctx, Optimization(cfg.learning_rate, cfg.weight_decay, cfg.warmup_ratio,
                                                       cfg.max_grad_norm, cfg.epochs * steps_per_epoch,
                                                       cfg.skip_nonfinite),
                        Speed(compile_mode, use_graphs, amp_dtype))
    state = RunState(steps.optimizer, steps.scheduler, engine.LoopState(),
                     tracker, run_record, task, clock, test_set, steps.scaler)
    writer = checkpoint.CheckpointWriter(log.run_dir, ctx, keep=cfg.keep_checkpoints)
    if saved:
        state.restore(saved, ctx, task)
        log.truncate_records(after_step=state.loop.global_step)  # what ran after the checkpoint runs again
        writer.discard_after(state.loop.global_step)  # checkpoints of the abandoned continuation
        writer.adopt(resume_from, state.loop.global_step)
        checkpoint.set_rng_state(saved["rng"][ctx.rank])  # last: nothing below draws from the RNG before training
        log.print(f"resuming at epoch {state.loop.epoch}, step {state.loop.global_step} "
                  f"(batch {state.loop.next_batch} of the epoch)")
    else:
        log.truncate_records(after_step=0)  # a fresh start in a run directory that had no checkpoint yet

    clock.lap("model")
    runner = steps.runner  # its graphs are recorded at the first steps: after the optimizer's state is restored
    hooks = CheckpointHooks(cfg, ctx, state, writer, stop, log)
    hooks.model, hooks.tokenizer, hooks.judge = model, tokenizer, judge
    loop = engine.LoopConfig(cfg.epochs, cfg.grad_accum_steps, cfg.log_every, pooling=long_texts.pooling,
                             train_documents=prepared.info["train_examples"] if long_texts.windowed else None)
    if saved and saved.get("finished") and ctx.run_on_main(lambda: (log.run_dir / "summary.json").is_file()):
        log.print(f"{log.run_dir} has finished: nothing left to train (its models: final/ and best/)")
        runner.close()
        # and nothing rewritten: a finished run resumed is left as it was; its result is what it wrote (read by
        # the main process, which alone has the run directory where nodes do not share a disk)
        result = ctx.run_on_main(lambda: RunResult.read(log.run_dir))
        if test_set is not None and log.enabled:  # a test set given now: scored on the finished run's best/
            result = dataclasses.replace(result, summary=_test_and_track(state, log, result.summary, cfg, ctx,
                                                                         log.run_dir / "final"))
        _push(cfg, ctx, log.run_dir / "final", log)
        return result
    if cfg.trackers:  # the resolved config as the trackers' parameters; a tracker that cannot start stops every rank
        params = {**cfg.to_dict(), "task": task.name, "world_size": ctx.world_size, "global_batch_size": global_batch,
                  "device": str(ctx.device), "precision": precision_name(amp_dtype)}
        ctx.run_on_main(lambda: log.open_trackers(cfg.trackers, params))
    try:
        return _fit_and_finish(runner, loaders, loop, state, hooks, log, stop, resumed=bool(saved))
    except BaseException as exc:
        # the checkpoints asked for before the failure land whole before the run's lock is released; a second
        # Ctrl-C (KeyboardInterrupt) stops at once: the write not yet committed is dropped instead
        writer.settle(raising=False, cancel=isinstance(exc, KeyboardInterrupt))
        raise


def _fit_and_finish(runner, loaders, loop, state: RunState, hooks: CheckpointHooks, log: RunLogger,
                    stop: StopSignal, *, resumed: bool) -> RunResult:
    """Train to the end (or a stop), then final/, the trimmed checkpoints and the summary."""
    writer = hooks.writer
    if resumed and state.loop.next_batch == 0 and state.tracker.best_epoch == len(state.loop.results):
        hooks.save("best")  # the epoch's best/ follows its checkpoint: a run stopped between them gets it here
    stop.arm()
    try:
        # an early-stopped run that is resumed (or restarted) has nothing left to train
        finished = state.tracker.stopped_early or engine.fit(runner, loaders, loop, state.loop, hooks, log)
    except engine.NonFiniteLoss as exc:
        writer.settle(raising=False)  # a failed write is said on stderr: the divergence is the run's error
        kept = checkpoint.step_checkpoints(log.run_dir)
        raise Diverged(f"{exc}: lower --learning_rate, or pass --skip_nonfinite to skip such batches; last good "
                       f"checkpoint: {kept[0] if kept else 'none'}") from None
    finally:
        said = runner.summary()
        runner.close()  # whatever ended the loop: recorded graphs go before the process group does
    if said:
        log.print(said)
    if not finished:
        return RunResult(log.run_dir, False, list(state.loop.results), config=hooks.cfg.to_dict(),
                         exit_code=128 + (stop.signum or 15))
    final = hooks.finish()
    summary = _finish(state, log, final, state.task, hooks.cfg, hooks.ctx)
    # rank 0's summary (its clock, the run's files) on every rank, once it is written: a broadcast, so no rank
    # returns before the main process has finished the run's files
    summary = hooks.ctx.run_on_main(lambda: summary)
    if log.enabled:  # after the run's last collective: no rank waits on the test set, the trackers or the Hub
        summary = _test_and_track(state, log, summary, hooks.cfg, hooks.ctx, final)
        _push(hooks.cfg, hooks.ctx, final, log)
    return RunResult(log.run_dir, True, list(state.loop.results), summary, hooks.cfg.to_dict())


def _test_and_track(state: RunState, log: RunLogger, summary: dict, cfg: TrainConfig, ctx: ProcessContext,
                    final: Path) -> dict:
    """The main process, once the run is done: best/ scored on the test set (into summary.json), then the
    trackers get the final metrics and the model card."""
    if state.test_set is not None:
        report = state.test_set.score(log.run_dir / "best", device=ctx.device, precision=cfg.precision,
                                      batch_size=cfg.effective_eval_batch_size)
        summary = {**summary, "test_metrics": {m: report[m] for m in summary["metrics"] if m in report},
                   "test": {"data": state.test_set.name, "examples": report["examples"], "checkpoint": "best",
                            "epoch": summary["best_epoch"]}}
        log.write_json("summary.json", summary)
        log.print(f"test (best/, epoch {summary['best_epoch']}): " + " | ".join(
            f"{_COLUMN_NAMES.get(m, m)} {shown_metric(v)}" for m, v in summary["test_metrics"].items())
            + f" | {summary['test']['examples']} examples of {summary['test']['data']}")
    log.finish_tracking(summary, final / "README.md")
    return summary


def _push(cfg: TrainConfig, ctx: ProcessContext, final: Path, log: RunLogger) -> None:
    """--push_to_hub: the main process uploads final/ and its card, after the run's last collective, so no
    rank waits on an upload (a slow one would outlast the collectives' timeout); a failed upload is its
    error, the other ranks have finished."""
    if cfg.push_to_hub and ctx.is_main:
        from encoderfit.serve.hub import push_checkpoint

        url = push_checkpoint(final, cfg.push_to_hub, private=cfg.hub_private)
        log.print(f"pushed {final} to {url}")


class Diverged(UserError):
    """The loss became NaN or infinite: the run stops (a sweep records the trial and goes on)."""


_COLUMN_NAMES = {"macro_f1": "macro-F1"}


def _finish(state: RunState, log: RunLogger, final: Path, task, cfg: TrainConfig, ctx: ProcessContext) -> dict:
    """summary.json (written by the main process) and the end-of-run table; the summary, on every rank."""
    results, tracker = state.loop.results, state.tracker
    breakdown = state.clock.breakdown(results)
    last = results[-1]
    best = next(r for r in results if r["epoch"] == tracker.best_epoch)
    train_time = sum(r["epoch_time_s"] for r in results)
    shown = tuple(dict.fromkeys(task.summary_metrics + ("loss",)))
    summary = {"task": task.name, "metrics": list(shown),
               **{f"final_val_{m}": last[f"val_{m}"] for m in shown},
               "metric_for_best": tracker.metric, "higher_is_better": tracker.sign > 0, "best_epoch": best["epoch"],
               "metric_requested": tracker.requested, "requested_higher_is_better": tracker.requested_sign > 0,
               **{f"best_val_{m}": best[f"val_{m}"] for m in shown},
               "epochs_run": len(results), "stopped_early": tracker.stopped_early,
               "stop_reason": tracker.stop_reason,
               "skipped_nonfinite_steps": state.loop.skipped_nonfinite,
               # the whole run: every process's time up to its last checkpoint (a resume adds them up)
               "total_time_s": breakdown["total"],
               "train_samples_per_s": round(sum(r["train_examples"] for r in results) / train_time, 2),
               "checkpoint": str(final), "best_checkpoint": str(log.run_dir / "best")}
    summary["time_breakdown_s"] = breakdown
    log.write_json("summary.json", summary)
    if log.enabled:  # the main process: a model card in each of final/ and best/, from the run's records
        from encoderfit.serve.card import write_model_card

        for checkpoint_dir in (final, log.run_dir / "best"):
            write_model_card(checkpoint_dir)
    if state.loop.skipped_nonfinite:
        log.print(f"note: skipped {state.loop.skipped_nonfinite} optimizer step(s) with a non-finite loss")
    log.print(_summary_table(summary))
    log.print(format_breakdown(summary["time_breakdown_s"]))
    return summary


def _summary_table(s: dict) -> str:
    shown = s["metrics"]
    rows = [("", *(_COLUMN_NAMES.get(m, m) for m in shown), "checkpoint"),
            (f"best (epoch {s['best_epoch']}, by {s['metric_for_best']})",
             *(shown_metric(s[f'best_val_{m}']) for m in shown), s["best_checkpoint"]),
            (f"last (epoch {s['epochs_run']})", *(shown_metric(s[f'final_val_{m}']) for m in shown), s["checkpoint"])]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    early = f" (stopped early: {s['stop_reason']})" if s["stopped_early"] else ""
    return ("\nvalidation summary\n" + "\n".join(lines) +
            f"\n{s['epochs_run']} epoch(s){early} in {s['total_time_s']:.1f}s | "
            f"training throughput {s['train_samples_per_s']:.1f} samples/s")


def train(cfg: TrainConfig, use_torchrun: bool, started: float | None = None, *, given=None,
          test=None) -> RunResult:
    """The whole run in its process context (the process group is always torn down); ``started``: when
    the command began (its imports count as start-up); ``given``: in-memory training and validation
    data (``data.sources.GivenData``) in place of the config's data flags; ``test``: an in-memory test set
    (a ``datasets.Dataset``) in place of ``--test_file``."""
    started = time.perf_counter() if started is None else started
    with process_context(cfg.device, use_torchrun) as ctx:
        return run(cfg, ctx, started, given=given, test=test)
