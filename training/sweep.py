"""Find the recipe: train one grid of hyperparameters over the same prepared data, and rank the trials.

    python training/sweep.py --learning_rate 2e-5,5e-5,1e-4 --epochs 3,5 --sweep_dir sweeps/lr
    torchrun --standalone --nproc_per_node=8 training/sweep.py --learning_rate 2e-5,5e-5 --sweep_dir sweeps/lr

Every training flag is taken as train_single.py takes it; a comma list of values for --learning_rate,
--epochs, --batch_size, --warmup_ratio, --weight_decay or --seed makes it a dimension of the grid. Each
trial is an ordinary run directory, SWEEP_DIR/trial-NNN, trained in this process one after another: the
data is tokenized once (the cache under SWEEP_DIR/cache) and the imports and the process group are paid
once. The same command again continues an interrupted sweep: finished trials are read back, an
interrupted one resumes at its exact next batch. At the end: a table sorted by the validation metric
(--metric_for_best, else the task's default), SWEEP_DIR/sweep.json with every trial, SWEEP_DIR/sweep.png
(the metric against the learning rate, one colour per epochs value) and SWEEP_DIR/best, a link to the
winning trial's best/ checkpoint. --test_file FILE then evaluates that checkpoint on a held-out test
set, once (SWEEP_DIR/test.json). Under torchrun every rank runs the same trials, as rank 0 decides them.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from training.config import parse_config  # noqa: E402
from training.utils import UserError  # noqa: E402

SWEPT = ("learning_rate", "epochs", "batch_size", "warmup_ratio", "weight_decay", "seed")
OWNED = ("checkpoint_dir", "run_name", "resume", "config")  # the sweep decides where each trial writes
LOWER_IS_BETTER = ("loss", "mse", "mae")
FORMAT = 1  # of sweep.json


def split_args(argv: list) -> tuple:
    """(sweep directory, test file or None, the grid {flag: [values as given]}, the other training flags)."""
    own, grid, rest = {"sweep_dir": "sweep", "test_file": None}, {}, []
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
                values = [v.strip() for v in value.split(",")]
                if "" in values or len(set(values)) != len(values):
                    raise UserError(f"--{name} {value}: give distinct values separated by commas")
                if len(values) > 1:
                    grid[name] = values
                else:  # one value: an ordinary flag of every trial
                    rest += [f"--{name}", values[0]]
        else:
            rest.append(arg)
        i += 1
    return Path(own["sweep_dir"]), own["test_file"], grid, rest


def trials(grid: dict) -> list:
    """Every combination, as {flag: value}, the first flag varying slowest."""
    names = [n for n in SWEPT if n in grid]
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def trial_argv(sweep_dir: Path, index: int, values: dict, rest: list) -> list:
    cache = [] if any(a == "--cache_dir" or a.startswith("--cache_dir=") for a in rest) else \
        ["--cache_dir", str(sweep_dir / "cache")]  # one tokenization for every trial
    return [*rest, *(x for n, v in values.items() for x in (f"--{n}", v)), *cache,
            "--checkpoint_dir", str(sweep_dir), "--run_name", f"trial-{index:03d}", "--resume", "auto"]


def _plan(sweep_dir: Path, grid: dict, rest: list) -> dict:
    """Rank 0: the sweep's record, new or (the same command again) the one on disk; which trials are done."""
    record = {"format": FORMAT, "grid": grid, "flags": rest,
              "trials": [{"name": f"trial-{i:03d}", "flags": v} for i, v in enumerate(trials(grid), 1)]}
    path = sweep_dir / "sweep.json"
    started = path.is_file() and any((sweep_dir / t["name"] / "config.json").is_file() for t in record["trials"])
    if started:  # a sweep that failed before its first trial began may be started again with other flags
        old = json.loads(path.read_text())
        if (old.get("grid"), old.get("flags")) != (grid, rest):
            raise UserError(f"{sweep_dir} holds another sweep ({path}: grid {old.get('grid')}, flags "
                            f"{' '.join(old.get('flags') or []) or 'none'}): give another --sweep_dir")
        record = old
    else:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        _write_json(path, record)
    for trial in record["trials"]:
        trial.update(_outcome(sweep_dir / trial["name"], trial))
    return record


def _outcome(run_dir: Path, trial: dict) -> dict:
    """What a trial's run directory says about it: its summary once it has finished."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return {"status": trial.get("status") if trial.get("status") == "diverged" else "to do"}
    s = json.loads(summary.read_text())
    config = json.loads((run_dir / "config.json").read_text())["config"]
    metric = s["metric_for_best"]
    return {"status": "done", "metric": metric, "value": s[f"best_val_{metric}"], "best_epoch": s["best_epoch"],
            "epochs_run": s["epochs_run"], "time_s": s["total_time_s"], "checkpoint": str(run_dir / "best"),
            "learning_rate": config["learning_rate"], "epochs": config["epochs"]}


def _release_memory() -> None:
    """What a trial left behind (model, optimizer, graph pools) goes before the next one starts."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def ranked(record: dict) -> list:
    done = [t for t in record["trials"] if t["status"] == "done"]
    if not done:
        return []
    sign = -1 if done[0]["metric"] in LOWER_IS_BETTER else 1
    return sorted(done, key=lambda t: (t["value"] != t["value"], -sign * t["value"] if t["value"] == t["value"]
                                       else 0))  # NaN last


def table(record: dict) -> str:
    order = ranked(record) + [t for t in record["trials"] if t["status"] != "done"]
    names = [n for n in SWEPT if n in record["grid"]]
    metric = next((t["metric"] for t in order if t["status"] == "done"), "metric")
    rows = [("trial", *names, f"val {metric}", "best epoch", "epochs run", "time")]
    for t in order:
        done = t["status"] == "done"
        rows.append((t["name"], *(t["flags"][n] for n in names),
                     f"{t['value']:.4f}" if done else t["status"], str(t["best_epoch"]) if done else "",
                     str(t["epochs_run"]) if done else "", f"{t['time_s']:.1f}s" if done else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _finish(sweep_dir: Path, record: dict, wall_s: float) -> None:
    """Rank 0: sweep.json, the best link and the table."""
    order = ranked(record)
    record["best"] = order[0]["name"] if order else None
    record["wall_s"] = round(record.get("wall_s", 0) + wall_s, 1)  # every launch of the sweep, added up
    _write_json(sweep_dir / "sweep.json", record)
    link = sweep_dir / "best"
    if order:
        tmp = sweep_dir / f".best.tmp{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path(order[0]["name"]) / "best", target_is_directory=True)  # relative: the sweep may move
        os.replace(tmp, link)
        from training.plot import plot_sweep
        plot_sweep(order, order[0]["metric"], sweep_dir / "sweep.png")
    print(f"\nsweep of {len(record['trials'])} trial(s) in {sweep_dir}\n{table(record)}")
    if order:
        print(f"best: {order[0]['name']} ({' '.join(f'--{k} {v}' for k, v in order[0]['flags'].items())}), "
              f"val {order[0]['metric']} {order[0]['value']:.4f}: {link} -> {order[0]['name']}/best")
    else:
        print("no trial finished (every one diverged): lower the learning rates")
    print(f"{record['wall_s']:.1f}s of sweeping in all")


def main(argv=None) -> int:
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    sweep_dir, test_file, grid, rest = split_args(argv)
    if test_file is not None and os.environ.get("RANK", "0") == "0" and not Path(test_file).is_file():
        raise UserError(f"--test_file {test_file}: no such file")
    if not grid:
        raise UserError(f"nothing to sweep: give a comma list of values to one of "
                        f"{', '.join('--' + n for n in SWEPT)} (e.g. --learning_rate 2e-5,5e-5)")
    plan = trials(grid)
    configs = [parse_config(trial_argv(sweep_dir, i, v, rest)) for i, v in enumerate(plan, 1)]  # all valid first
    from training import trainer
    from training.distributed import launched_by_torchrun, process_context

    with process_context(configs[0].device, launched_by_torchrun()) as ctx:
        record = ctx.run_on_main(lambda: _plan(sweep_dir, grid, rest))
        for cfg, trial in zip(configs, record["trials"]):
            if trial["status"] != "to do":
                continue
            if ctx.is_main:
                print(f"\n== {trial['name']} of {len(configs)}: "
                      f"{' '.join(f'--{k} {v}' for k, v in trial['flags'].items())}", flush=True)
            try:
                code = trainer.run(cfg, ctx, time.perf_counter())
            except trainer.Diverged as exc:  # a learning rate too high for the model: an outcome, not an error
                trial["status"] = "diverged"
                if ctx.is_main:
                    print(f"{trial['name']} diverged: {exc}", flush=True)
                    _write_json(sweep_dir / "sweep.json", record)  # kept, should the sweep stop before its end
                continue
            finally:
                _release_memory()
            if code != 0:  # stopped by a signal: the trial has its checkpoint; the same command continues
                if ctx.is_main:
                    print(f"sweep stopped in {trial['name']}: run the same command again to continue", flush=True)
                return code
            trial.update(ctx.run_on_main(lambda: _outcome(sweep_dir / trial["name"], trial)))
            if ctx.is_main:
                _write_json(sweep_dir / "sweep.json", record)
        main_process = ctx.is_main
        if main_process:
            _finish(sweep_dir, record, time.perf_counter() - started)
    if main_process and test_file and record.get("best"):
        return _test(sweep_dir, record, configs[0], test_file)
    return 0


# the column flags of the training data, which the test file shares
COLUMN_FLAGS = ("text_column", "text_pair_column", "label_column", "label_separator", "label_columns", "quoting")


def _test(sweep_dir: Path, record: dict, cfg, test_file: str) -> int:
    """The chosen trial on the held-out test set, once, after the choice (evaluate.py's report)."""
    from training import evaluate

    print(f"\ntest set {test_file}: {record['best']}, chosen on the validation split alone (the test set played "
          f"no part in the choice)", flush=True)
    columns = [x for n in COLUMN_FLAGS if getattr(cfg, n) is not None for x in (f"--{n}", str(getattr(cfg, n)))]
    return evaluate.main(["--checkpoint", str(sweep_dir / record["best"] / "best"), "--data", test_file,
                          *columns, "--device", cfg.device, "--output", str(sweep_dir / "test.json")])


if __name__ == "__main__":
    from training.cli import guarded
    from training.distributed import launched_by_torchrun

    sys.exit(guarded(main, use_torchrun=launched_by_torchrun()))
