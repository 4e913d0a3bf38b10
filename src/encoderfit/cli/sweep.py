"""Find the recipe: many trainings over one prepared data set, searched by grid or by Optuna, and ranked.

    python training/sweep.py --learning_rate 2e-5,5e-5,1e-4 --epochs 3,5 --sweep_dir sweeps/lr
    python training/sweep.py --learning_rate 1e-5:2e-4:log --epochs 3,5 --trials 12 --sweep_dir sweeps/tpe
    python training/sweep.py --learning_rate 2e-5,5e-5,1e-4,2e-4 --parallel_trials 4 --sweep_dir sweeps/4gpu
    torchrun --standalone --nproc_per_node=8 training/sweep.py --learning_rate 2e-5,5e-5 --sweep_dir sweeps/lr

Every training flag is taken as train_single.py takes it. --learning_rate, --epochs, --batch_size,
--warmup_ratio, --weight_decay and --seed may be searched: a comma list of values, or a range LOW:HIGH
(LOW:HIGH:log on a log scale). Lists alone make a grid of every combination; a range, or --trials N,
makes Optuna's TPE sampler propose N trials. --pruner median (the default of a sampled search; a grid
trains every combination to its end unless given it) stops a trial at an epoch's end when it is worse
than the median of the finished trials at the same share of their schedules (epoch / epochs), and
never in the first half of its own; --pruner none never does.

Each trial is an ordinary run directory, SWEEP_DIR/trial-NNN. The data is tokenized once (the cache
under SWEEP_DIR/cache), and the imports and the process group are paid once: trials run one after
another in this process, or, with --parallel_trials N, in N worker processes side by side, one per
GPU (or sharing the CPU's cores). Under torchrun every rank runs the same trials, as rank 0 decides
them. The same command again continues an interrupted sweep: finished trials are kept, an interrupted
one resumes at its exact next batch, and a sampled search may be given a larger --trials.

At the end: a table sorted by the validation metric (--metric_for_best, else the task's default),
SWEEP_DIR/sweep.json with every trial, SWEEP_DIR/sweep.png (the metric against the learning rate, or
another swept flag where it is not swept, one colour per epochs value) and SWEEP_DIR/best, a link to the winning trial's best/ checkpoint.
--test_file FILE then evaluates that checkpoint on a held-out test set, once (SWEEP_DIR/test.json).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from encoderfit.config import TrainConfig, flag_value, parse_config
from encoderfit.search.study import SWEPT, Dimension, Space
from encoderfit.utils import UserError, json_text, launched_by_torchrun

# the folder that holds this package: a worker imports the same copy, installed or run from a checkout
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def _worker_pythonpath() -> str:
    """PYTHONPATH for a worker: this package's folder first where it is a checkout's src/ (put on sys.path by
    the entry point); an installed package's site directory is on the worker's path already, and put first it
    would stand before the standard library."""
    import site
    import sysconfig

    sites = {str(Path(p).resolve()) for p in [*site.getsitepackages(), site.getusersitepackages(),
                                                 sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]}
    own = [] if PACKAGE_ROOT in sites else [PACKAGE_ROOT]
    return os.pathsep.join(filter(None, [*own, os.environ.get("PYTHONPATH")]))

OWN = {"sweep_dir": "sweep", "test_file": None, "trials": None, "pruner": None, "parallel_trials": None,
       "time_budget": None}
DEADLINE_ENV = "SWEEP_DEADLINE"  # --time_budget: when it is spent (time.time()), for this process and its workers
BUDGET_SPENT = "stopped by the sweep's time budget"
OWNED = ("checkpoint_dir", "run_name", "resume", "config")  # the sweep decides where each trial writes
WORKER_ENV = "SWEEP_WORKER"  # set by --parallel_trials on the worker processes it starts: their number
FORMAT = 2  # of sweep.json
PRUNED = "pruned by the sweep: worse than the median of the finished trials at the same share of their schedule"


OWN_HELP = {
    "sweep_dir": "DIR: where the trials, sweep.json, sweep.png and best/ go (default: sweep).",
    "trials": "N: a sampled search of N trials (Optuna's TPE sampler); without it, lists make a grid.",
    "pruner": "median or none: stop trials worse than the median of the finished ones at the same share of "
              "their schedule, never in their first half (default: median for a sampled search, none for a grid).",
    "parallel_trials": "N: N worker processes side by side, one trial each (one per GPU, or sharing the CPU).",
    "test_file": "FILE: score the winning trial's best/ on this labelled test set, once (SWEEP_DIR/test.json).",
    "time_budget": "DURATION (90s, 10m, 1.5h): sampled trials until it is spent, over the flags searched or, "
                   "with none, --learning_rate 1e-5:2e-4:log --epochs 2:10; the trial in flight stops at its "
                   "next epoch's end with its best/, and no new trial starts.",
}


def parse_duration(text: str) -> float:
    """Seconds of a duration: 90, 90s, 10m, 1.5h."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise UserError(f"--time_budget {text}: give a duration such as 90s, 10m or 1.5h")
    return seconds


def budget_left() -> float | None:
    """Seconds left of --time_budget (this launch's), or None without one."""
    deadline = os.environ.get(DEADLINE_ENV)
    return None if deadline is None else float(deadline) - time.time()


def _left_text(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def help_text() -> str:
    """--help: what the sweep does, its own options, what can be searched, and the training flags."""
    width = max(len(n) for n in OWN_HELP) + 4
    own = "\n".join(f"  --{n:<{width - 2}}{h}" for n, h in OWN_HELP.items())
    searched = ", ".join("--" + n for n in SWEPT)
    return (f"{__doc__.rstrip()}\n\nThe sweep's own options:\n{own}\n\nSearched (a comma list, or a range "
            f"LOW:HIGH[:log] for numbers; --model takes a list): {searched}.\nEvery other flag of encoderfit train "
            f"(encoderfit train --help) is given to every trial as it is; --checkpoint_dir, --run_name, --resume "
            f"and --config are the sweep's to set.\n")


def split_args(argv: list) -> tuple:
    """(the sweep's own flags, {flag: Dimension}, the other training flags)."""
    own, dims, rest = dict(OWN), {}, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name in (*own, *SWEPT, *OWNED):
            if eq:
                value = inline
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            else:
                raise UserError(f"argument --{name}: expected one argument (see --help)")
            if name in own:
                own[name] = value
            elif name == "config":
                raise UserError("--config is not taken by the sweep: give the flags themselves")
            elif name in OWNED:
                raise UserError(f"--{name} is the sweep's to set (each trial is SWEEP_DIR/trial-NNN): "
                                f"give --sweep_dir instead")
            else:
                dim = Dimension.parse(name, value)
                if isinstance(dim, Dimension):
                    dims[name] = dim
                else:  # one value: an ordinary flag of every trial
                    rest += [f"--{name}", dim]
        else:
            if name == "test_split":
                raise UserError("--test_split is not taken by the sweep (every trial would score it): give the test "
                                "set as --test_file FILE, which the sweep scores once, on the winning trial")
            if name in ("push_to_hub", "hub_private"):
                raise UserError(f"--{name} is not taken by the sweep (every trial would upload): push the trial "
                                f"you choose afterwards, encoderfit push SWEEP_DIR/trial-NNN --repo_id REPO")
            _refuse_unsearchable(name, inline if eq else (argv[i + 1] if name and i + 1 < len(argv) else None))
            rest.append(arg)
        i += 1
    return own, dims, rest


def _refuse_unsearchable(name: str, value) -> None:
    """A list or range given to a flag the sweep does not search: one line, not the flag's parse error."""
    import dataclasses

    from encoderfit.config import flag_type

    if not name or not isinstance(value, str) or name not in {f.name for f in dataclasses.fields(TrainConfig)}:
        return
    searchable = ", ".join("--" + n for n in SWEPT)
    if flag_type(name) in (int, float) and ("," in value or ":" in value):
        raise UserError(f"--{name} {value}: --{name} cannot be searched, give it one value (the sweep searches "
                        f"{searchable})")


def trial_config(base: TrainConfig, name: str, flags: dict) -> TrainConfig:
    """A trial's settings: the shared ones with its own values of the swept flags, in its own run directory."""
    return base.replace(run_name=name, **{n: flag_value(n, v) for n, v in flags.items()})


def shared_config(sweep_dir: Path, rest: list, first_trial: dict) -> TrainConfig:
    """What every trial shares: the other flags, each trial a run directory SWEEP_DIR/trial-NNN that it
    resumes when there is one, and one tokenization for all (the cache under SWEEP_DIR, unless given)."""
    cfg = parse_config([*rest, *(x for n, v in first_trial.items() for x in (f"--{n}", v))])
    return cfg.replace(checkpoint_dir=str(sweep_dir), resume="auto", cache_dir=cfg.cache_dir or str(sweep_dir / "cache"))


def _check(sweep_dir: Path, space: Space, rest: list) -> TrainConfig:
    """Every trial's flags are valid before anything starts: each grid combination, or each range's ends.
    Returns what every trial shares (the device, the columns, ...) with the first trial's values."""
    if space.grid:
        plans = space.combinations()
    else:
        first = {d.name: d.extremes()[0] for d in space.dimensions}
        plans = [first] + [{**first, d.name: v} for d in space.dimensions for v in d.extremes()]
    base = shared_config(sweep_dir, rest, plans[0])
    for plan in plans[1:]:
        trial_config(base, "trial-000", plan)
    models = next((d.choices for d in space.dimensions if d.name == "model"), ())
    if models and os.environ.get("RANK", "0") == "0":  # each model loads its tokenizer and takes the longest
        from encoderfit.modeling import model as model_lib  # --max_length of the sweep, before any trial trains

        lengths = next((d.extremes() for d in space.dimensions if d.name == "max_length"), (base.max_length,))
        for name in models:
            model_lib.check_model(name, model_lib.load_tokenizer(name), max(int(n) for n in lengths))
    return base


def _outcome(result) -> dict:
    """What a finished trial's run says about it (its RunResult: the summary and the resolved settings)."""
    s, config = result.summary, result.config
    # the metric the sweep asked for, also where the trial chose its best/ by the loss (an undefined metric):
    # its value is then undefined too, and the trial ranks last
    metric = s.get("metric_requested", s["metric_for_best"])
    higher = s.get("requested_higher_is_better", s.get("higher_is_better", True))
    value = s[f"best_val_{metric}"]
    return {"metric": metric, "value": float("nan") if value is None else value, "higher_is_better": higher,
            "best_epoch": s["best_epoch"], "epochs_run": s["epochs_run"], "time_s": s["total_time_s"],
            "pruned": s.get("stop_reason") == PRUNED, "checkpoint": str(result.run_dir / "best"),
            **{n: config.get(n) for n in SWEPT}}  # every searchable flag's value, swept or not


def _signed(outcome: dict) -> float:
    return outcome["value"] if outcome["higher_is_better"] else -outcome["value"]


def _release_memory() -> None:
    """What a trial left behind (model, optimizer, graph pools) goes before the next one starts."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json_text(obj, indent=2) + "\n")
    os.replace(tmp, path)


class Sweep:
    """The sweep on its main process (the one process, rank 0, or a parallel worker): its study, and the
    record it writes after each trial."""

    def __init__(self, sweep_dir: Path, space: Space, rest: list, *, first: bool):
        from encoderfit.search.study import Study

        if sweep_dir.exists() and not sweep_dir.is_dir():
            raise UserError(f"--sweep_dir {sweep_dir} is a file, not a directory")
        try:
            sweep_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--sweep_dir {sweep_dir}: cannot create it ({exc.strerror or exc})") from None
        self.dir, self.space, self.rest, self.lock = sweep_dir, space, rest, None
        if first:  # one launch at a time: a second one on a live sweep is refused at once
            from encoderfit.run.trainer import RunLock

            self.lock = RunLock(sweep_dir)
        self.study = Study(sweep_dir, space, rest, int(os.environ.get(WORKER_ENV, 0)))
        if first:
            self.study.begin()

    def trials(self) -> list:
        """The study's trials, each finished one with its outcome: kept in the study as it was told, or (a sweep
        begun by an earlier version) read from the trial's run directory."""
        from encoderfit.run.result import RunResult

        trials = self.study.trials()
        for t in trials:
            if t["status"] in ("done", "pruned") and "value" not in t:
                t.update(_outcome(RunResult.read(self.dir / t["name"])))
        return trials

    def record(self) -> dict:
        trials = self.trials()
        return {"format": FORMAT, **self.space.record(), "trials_asked": self.space.trials, "flags": self.rest,
                "trials": trials}

    def tell(self, job: dict, result=None) -> None:
        """A trial has ended, with its RunResult (None: it diverged): the study learns how, and sweep.json is
        rewritten."""
        if result is None:
            self.study.tell(job["number"], "diverged")
        else:
            outcome = _outcome(result)
            self.study.tell(job["number"], "pruned" if outcome["pruned"] else "done", _signed(outcome), outcome)
        _write_json(self.dir / "sweep.json", self.record())

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()


def ranked(record: dict, status: str = "done") -> list:
    done = [t for t in record["trials"] if t["status"] == status]
    return sorted(done, key=lambda t: (t["value"] != t["value"], -_signed(t) if t["value"] == t["value"]
                                       else 0))  # NaN last


def table(record: dict) -> str:
    order = ranked(record) + ranked(record, "pruned") + [t for t in record["trials"]
                                                         if t["status"] not in ("done", "pruned")]
    names = list(record["space"])
    finished = [t for t in order if t["status"] in ("done", "pruned")]
    metric = finished[0]["metric"] if finished else "metric"
    rows = [("trial", *names, f"val {metric}", "best epoch", "epochs run", "time", "")]
    for t in order:
        ran = t["status"] in ("done", "pruned")
        rows.append((t["name"], *(str(t["flags"].get(n, "")) for n in names),
                     f"{t['value']:.4f}" if ran else t["status"], str(t["best_epoch"]) if ran else "",
                     str(t["epochs_run"]) if ran else "", f"{t['time_s']:.1f}s" if ran else "",
                     "pruned" if t["status"] == "pruned" else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def plot_axis(swept: list) -> str:
    """The flag the plot puts on its x axis: the learning rate where it is swept, else the first other
    number swept apart from the epochs (which are the colours), else the epochs."""
    return "learning_rate" if "learning_rate" in swept else next(
        (n for n in swept if n not in ("epochs", "model")), "epochs")


def _flags_text(flags: dict) -> str:
    return " ".join(f"--{k} {v}" for k, v in flags.items())


def _finish(sweep: Sweep, wall_s: float) -> dict:
    """The main process, once every trial has run: sweep.json, the best link, the plot and the table."""
    record = sweep.record()
    order = ranked(record)
    record["best"] = order[0]["name"] if order else None
    record["wall_s"] = round(sweep.study.user_attr("wall_s", 0.0) + wall_s, 1)  # every launch, added up
    sweep.study.set_user_attr("wall_s", record["wall_s"])
    record["tested"] = sweep.study.user_attr("tested")
    _write_json(sweep.dir / "sweep.json", record)
    link = sweep.dir / "best"
    if order:
        tmp = sweep.dir / f".best.tmp{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path(order[0]["name"]) / "best", target_is_directory=True)  # relative: the sweep may move
        os.replace(tmp, link)
        from encoderfit.cli.plot import plot_sweep
        plot_sweep(order + ranked(record, "pruned"), order[0]["metric"], sweep.dir / "sweep.png",
                   x=plot_axis([d.name for d in sweep.space.dimensions]))
    print(f"\nsweep of {len(record['trials'])} trial(s) in {sweep.dir}\n{table(record)}")
    if order:
        print(f"best: {order[0]['name']} ({_flags_text(order[0]['flags'])}), val {order[0]['metric']} "
              f"{order[0]['value']:.4f}: {link} -> {order[0]['name']}/best")
    else:
        print("no trial finished (every one diverged or was stopped): lower the learning rates")
    print(f"{record['wall_s']:.1f}s of sweeping in all")
    return record


def run_trials(sweep: Sweep | None, ctx, base: TrainConfig) -> int:
    """Take trials from the study until none is left; 0, or the exit code of a trial stopped by a signal.
    ``sweep`` is the main process's (None on the other ranks, which are told each trial by rank 0)."""
    from encoderfit.run import trainer

    worker, parent = os.environ.get(WORKER_ENV), os.getppid()
    while True:
        if worker is not None and os.getppid() != parent:  # the parent is gone (killed): no new trial alone
            return 128 + signal.SIGTERM
        left = budget_left()
        job = ctx.run_on_main(lambda: None if left is not None and left <= 0 else sweep.study.next_trial(worker))
        if job is None:
            if left is not None and left <= 0 and ctx.is_main:
                print("\ntime budget spent: no new trial", flush=True)
            return 0
        cfg = trial_config(base, job["name"], job["flags"])
        if ctx.is_main:
            count = (f" (time budget: {_left_text(left)} left)" if left is not None else
                     "" if sweep.space.grid else f" of {sweep.space.trials}")
            print(f"\n== {job['name']}{count}: {_flags_text(job['flags'])}", flush=True)

        def judge(history: list, last: int = cfg.epochs) -> str | None:
            def decide() -> str | None:  # on the main process: its study and its clock decide for every rank
                prune = sweep.study.report(job["number"], history, last)
                if history[-1][0] >= last:  # the last epoch has nothing left to save
                    return None
                left = budget_left()
                return BUDGET_SPENT if left is not None and left <= 0 else PRUNED if prune else None

            return ctx.run_on_main(decide)

        try:
            result = trainer.run(cfg, ctx, time.perf_counter(), judge=judge)  # what fit() runs, in this context
        except trainer.Diverged as exc:  # a learning rate too high for the model: an outcome, not an error
            if ctx.is_main:
                print(f"{job['name']} diverged: {exc}", flush=True)
            ctx.run_on_main(lambda: sweep.tell(job))
            continue
        finally:
            _release_memory()
        if not result.completed:  # stopped by a signal: the trial has its checkpoint; the same command continues it
            if ctx.is_main:
                print(f"sweep stopped in {job['name']}: run the same command again to continue", flush=True)
            return result.exit_code
        ctx.run_on_main(lambda: sweep.tell(job, result))


def main(argv=None) -> int:
    """``encoderfit sweep``: bad input is one line and exit code 2, on one rank or under torchrun."""
    from encoderfit.cli.train import guarded

    return guarded(lambda: _sweep(argv), use_torchrun=launched_by_torchrun())


def _sweep(argv=None) -> int:
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    own, dims, rest = split_args(argv)
    sweep_dir, test_file, workers = Path(own["sweep_dir"]), own["test_file"], own["parallel_trials"]
    budget = parse_duration(own["time_budget"]) if own["time_budget"] is not None else None
    fixed = tuple(a[2:].partition("=")[0] for a in rest if a.startswith("--"))
    space = Space.from_flags(dims, own["trials"], own["pruner"], budget=budget is not None, fixed=fixed)
    owned = budget is not None and DEADLINE_ENV not in os.environ  # a parallel worker has its parent's
    if owned:
        os.environ[DEADLINE_ENV] = str(time.time() - (time.perf_counter() - started) + budget)
    try:
        return _sweep_in(argv, started, own, space, rest, sweep_dir, test_file, workers)
    finally:
        if owned:  # this launch's budget, not the next one's (the Python API may sweep again in this process)
            os.environ.pop(DEADLINE_ENV, None)


def _sweep_in(argv, started, own, space, rest, sweep_dir, test_file, workers) -> int:
    if workers is not None:
        if not workers.isdigit() or int(workers) < 1:
            raise UserError(f"--parallel_trials {workers}: give a number of worker processes, 1 or more")
        if launched_by_torchrun():
            raise UserError("--parallel_trials runs single-process trials side by side: start it with python, "
                            "not torchrun")
    worker = os.environ.get(WORKER_ENV) is not None
    if test_file is not None and os.environ.get("RANK", "0") == "0" and not Path(test_file).is_file():
        raise UserError(f"--test_file {test_file}: no such file")
    cfg = _check(sweep_dir, space, rest)
    if workers is not None and not worker:  # 1 too: one worker process, on the first GPU
        return _parallel(int(workers), argv, sweep_dir, space, rest, cfg, test_file, started)

    from encoderfit.engine.distributed import process_context

    holder, fresh, failed = [], not sweep_dir.exists(), False
    try:
        with process_context(cfg.device, launched_by_torchrun()) as ctx:
            ctx.run_on_main(lambda: holder.append(Sweep(sweep_dir, space, rest, first=not worker)))
            code = run_trials(holder[0] if holder else None, ctx, cfg)
            if code != 0 or worker or not ctx.is_main:
                return code
            record = _finish(holder[0], time.perf_counter() - started)
        # the test set after the process group has gone: rank 0 alone reads it
        return _test(holder[0], record, cfg, test_file) if test_file and record["best"] else 0
    except UserError as exc:
        failed = "in use" not in str(exc)  # another launch holds the directory: it is theirs
        raise
    finally:
        if holder:
            holder[0].close()
        # a first launch refused before any trial trained (bad flags the data reveals, such as class weights for
        # labels it has not) leaves no sweep behind, so the corrected command is not "another sweep"
        if failed and fresh and not worker and os.environ.get("RANK", "0") == "0" and sweep_dir.is_dir() \
                and not any((p / "config.json").exists() for p in sweep_dir.glob("trial-*")):
            import shutil

            shutil.rmtree(sweep_dir, ignore_errors=True)


def _devices(cfg, workers: int) -> list:
    """One environment per worker: its GPU (CUDA_VISIBLE_DEVICES), or its share of the CPU's threads."""
    import torch

    from encoderfit.utils import detect_device

    detect_device(cfg.device)  # a device that is not there: one line here, not one from each worker
    if cfg.device == "mps" or (cfg.device == "auto" and not torch.cuda.is_available()
                               and torch.backends.mps.is_available()):
        raise UserError("--parallel_trials runs one trial per CUDA GPU, or on the CPU (--device cpu); "
                        "an Apple GPU runs one trial at a time")
    if cfg.device == "cpu" or not torch.cuda.is_available():
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        return [{"OMP_NUM_THREADS": threads, "device": "cpu"} for _ in range(workers)]
    if cfg.device.startswith("cuda:"):
        raise UserError(f"--parallel_trials gives each worker its own GPU: leave --device {cfg.device} out")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if workers > len(gpus):
        raise UserError(f"--parallel_trials {workers}: this machine shows {len(gpus)} CUDA GPU(s); run at most "
                        f"one trial per GPU")
    return [{"CUDA_VISIBLE_DEVICES": g, "device": f"GPU {g}"} for g in gpus[:workers]]


def _parallel(workers: int, argv: list, sweep_dir: Path, space: Space, rest: list, cfg, test_file,
              started: float) -> int:
    """The parent of --parallel_trials: it holds the sweep, starts the workers, reports their trials as
    they end, and writes the result once they have all stopped."""
    envs = _devices(cfg, workers)
    sweep = Sweep(sweep_dir, space, rest, first=True)
    from encoderfit.run.trainer import prepare

    prepare(cfg)  # the first trial's data, tokenized once, before the workers: they all read that cache
    own = [i for i, a in enumerate(argv) if a == "--parallel_trials" or a.startswith("--parallel_trials=")]
    child_argv = [a for i, a in enumerate(argv) if i not in own and not (i - 1 in own and "=" not in argv[i - 1])]
    procs, logs, stopping = [], [], []

    def forward(signum, frame):  # a stop for the parent is a stop for each worker: after its step, saved
        stopping.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for k, env in enumerate(envs):
            log = sweep_dir / f"worker-{k}.log"
            logs.append(log)
            child_env = {**os.environ, WORKER_ENV: str(k), **{n: v for n, v in env.items() if n != "device"},
                         "PYTHONPATH": _worker_pythonpath()}
            with open(log, "a") as out:
                # its own session, so that Ctrl-C reaches it once, through the parent; and it ends with it
                procs.append(subprocess.Popen([sys.executable, "-m", "encoderfit", "sweep", *child_argv],
                                              stdout=out, stderr=subprocess.STDOUT, env=child_env,
                                              start_new_session=True, preexec_fn=_end_with_parent))
            print(f"worker {k} on {env['device']}: log {log}", flush=True)
        _follow(sweep, procs)
        for s, handler in previous.items():  # the workers have ended: signals are the parent's own again
            signal.signal(s, handler)
        previous = {}
        codes = [p.returncode for p in procs]
        stops = (0, 128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM)
        failed = [(k, c) for k, c in enumerate(codes) if c not in stops or (c < 0 and not stopping)]
        if failed:
            last = [(logs[k].read_text(errors="replace").strip().splitlines() or ["(no output)"])[-1]
                    for k, _ in failed]
            if all(c == 2 for _, c in failed) and len(set(last)) == 1 and last[0].startswith("error: "):
                raise UserError(last[0][len("error: "):])  # the same bad input for every worker: said once
            for (k, c), line in zip(failed, last):
                print(f"error: worker {k} exited with code {c}: {line} (see {logs[k]})", file=sys.stderr)
            return 1
        if any(c != 0 for c in codes):
            print("sweep stopped: run the same command again to continue", flush=True)
            return 128 + (stopping[0] if stopping else signal.SIGTERM)
        record = _finish(sweep, time.perf_counter() - started)
        return _test(sweep, record, cfg, test_file) if test_file and record["best"] else 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in procs:
            if p.poll() is None:  # the parent failed: its workers do not go on alone
                p.terminate()
                p.wait()
        sweep.close()


def _end_with_parent() -> None:
    """In a worker, before it starts: Linux sends it SIGTERM when the parent dies, however it dies (on
    other systems the worker checks between trials)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _follow(sweep: Sweep, procs: list) -> None:
    """Until every worker has ended: each trial's start (once a worker has it) and end, as they come."""
    seen = {}
    while True:
        running = any(p.poll() is None for p in procs)
        for t in sweep.trials():
            status = t["status"]
            if status == "to do" or (status == "running" and t["worker"] is None) or seen.get(t["name"]) == status:
                continue
            seen[t["name"]] = status
            where = f" on worker {t['worker']}" if status == "running" else ""
            if status in ("done", "pruned"):
                where = f" (val {t['metric']} {t['value']:.4f})"  # the outcome its worker told the study
            print(f"{t['name']} {status}{where}: {_flags_text(t['flags'])}", flush=True)
        if not running:
            return
        time.sleep(1)


# the column flags of the training data, which the test file shares
COLUMN_FLAGS = ("text_column", "text_pair_column", "label_column", "label_separator", "label_columns", "quoting")


def _test(sweep: Sweep, record: dict, cfg, test_file: str) -> int:
    """The chosen trial on the held-out test set, once, after the choice (evaluate's report)."""
    from encoderfit.api import evaluate
    from encoderfit.utils import atomic_write_json

    if record["tested"] == record["best"] and (sweep.dir / "test.json").is_file():
        print(f"\ntest set: {record['best']} was tested already ({sweep.dir / 'test.json'}); the test set is "
              f"looked at once for each choice")
        return 0
    print(f"\ntest set {test_file}: {record['best']}, chosen on the validation split alone (the test set played "
          f"no part in the choice)", flush=True)
    columns = {n: getattr(cfg, n) for n in COLUMN_FLAGS if getattr(cfg, n) is not None}
    report = evaluate(sweep.dir / record["best"] / "best", test_file, device=cfg.device, verbose=True, **columns)
    atomic_write_json(sweep.dir / "test.json", report)
    print(f"\nwrote {sweep.dir / 'test.json'}")
    sweep.study.set_user_attr("tested", record["best"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
