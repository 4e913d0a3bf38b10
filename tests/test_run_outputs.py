"""What a person sees and keeps from a run: the progress bar, TensorBoard, best checkpoint, early stopping."""
import fcntl
import json
import os
import pty
import re
import struct
import termios
import subprocess
import sys

import pytest

from conftest import ROOT, cli_env, on_cpu, synthetic_rows, write_rows


def _args(tmp_path, tiny_model_dir, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    train = write_rows(tmp_path / "train.csv", synthetic_rows(64, seed=5))
    return ["--model", tiny_model_dir, "--train_file", train, "--max_length", 32, "--batch_size", 16,
            "--checkpoint_dir", tmp_path / "ck", "--log_every", 1, *extra]


def _run_with_tty_stderr(args) -> str:
    """Run train_single.py with stderr on a pseudo-terminal, as a person at a terminal would."""
    master, slave = pty.openpty()
    # a real terminal has a size; a fresh pseudo-terminal has 0 columns, where tqdm draws nothing
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, str(ROOT / "training" / "train_single.py"), *on_cpu("train_single.py", args)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=slave, env=cli_env())
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=300)
    os.close(master)
    assert proc.returncode == 0
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_only_on_a_terminal_and_not_with_no_progress(tmp_path, tiny_model_dir, run_main):
    piped = run_main("train_single.py", *_args(tmp_path / "a", tiny_model_dir, "--epochs", 1, "--run_name", "a"))
    assert piped.returncode == 0, piped.stderr
    assert "epoch 1/1:" not in piped.stderr and "step/s" not in piped.stderr and "\r" not in piped.stderr
    # without a terminal, a plain line each log interval instead (here every step), the step's own loss
    plain = [ln for ln in piped.stdout.splitlines() if re.match(r"epoch 1/1 \| step \d+/", ln)]
    steps = [json.loads(x) for x in (tmp_path / "a" / "ck" / "a" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["event"] == "step"]
    assert len(plain) == len(steps) == 4, piped.stdout  # 64 examples less 10% at 16: 4 steps
    for k, (line, rec) in enumerate(zip(plain, steps), 1):
        assert re.fullmatch(rf"epoch 1/1 \| step {k}/4 \({round(100 * k / 4)}%\) \| loss {rec['loss']:.4f}, "
                            rf"{rec['samples_per_s']:.0f} samples/s \| (\d+m)?\d+s left", line), line
    quiet = run_main("train_single.py", *_args(tmp_path / "q", tiny_model_dir, "--epochs", 1, "--no_progress"))
    assert quiet.returncode == 0 and " | step " not in quiet.stdout
    shown = _run_with_tty_stderr(_args(tmp_path / "b", tiny_model_dir, "--epochs", 1))
    assert "epoch 1/1:" in shown and "samples/s" in shown and "4/4" in shown  # 64 / 16 = 4 steps
    hidden = _run_with_tty_stderr(_args(tmp_path / "c", tiny_model_dir, "--epochs", 1, "--no_progress"))
    assert "epoch 1/1:" not in hidden


def test_tensorboard_events_hold_step_and_epoch_scalars(tmp_path, tiny_model_dir, run_main):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc = run_main("train_single.py", *_args(tmp_path, tiny_model_dir, "--epochs", 2, "--tensorboard",
                                              "--run_name", "tb"))
    assert proc.returncode == 0, proc.stderr
    acc = EventAccumulator(str(tmp_path / "ck" / "tb" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"step/loss", "step/lr", "step/samples_per_s", "epoch/val_accuracy", "epoch/train_loss"} <= tags
    rows = [json.loads(x) for x in (tmp_path / "ck" / "tb" / "metrics.jsonl").read_text().splitlines()]
    step_losses = [r["loss"] for r in rows if r["event"] == "step"]
    assert [round(e.value, 5) for e in acc.Scalars("step/loss")] == [round(v, 5) for v in step_losses]
    assert len(acc.Scalars("epoch/val_accuracy")) == 2


def test_early_stopping_stops_after_patience_and_keeps_the_best(tmp_path, tiny_model_dir, run_main):
    # a learning rate this small leaves predictions unchanged: accuracy never improves after epoch 1
    proc = run_main("train_single.py", *_args(tmp_path, tiny_model_dir, "--epochs", 6, "--learning_rate", 1e-12,
                                              "--early_stopping_patience", 2, "--run_name", "es"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "ck" / "es" / "summary.json").read_text())
    assert summary["epochs_run"] == 3 and summary["stopped_early"] is True and summary["best_epoch"] == 1
    assert "early stopping" in proc.stdout and "(stopped early: patience)" in proc.stdout
    epochs = [json.loads(x) for x in (tmp_path / "ck" / "es" / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert (tmp_path / "ck" / "es" / "best" / "model.safetensors").is_file()
    # resuming (or restarting) an early-stopped run trains nothing more
    again = run_main("train_single.py", *_args(tmp_path, tiny_model_dir, "--epochs", 6, "--learning_rate", 1e-12,
                                               "--early_stopping_patience", 2, "--run_name", "es",
                                               "--resume", "auto"))
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "ck" / "es" / "summary.json").read_text())["epochs_run"] == 3
    assert "epoch 4/6" not in again.stdout


def test_best_checkpoint_follows_the_chosen_metric(tmp_path, tiny_model_dir, run_main):
    from transformers import AutoModelForSequenceClassification
    import torch
    from safetensors.torch import load_file

    proc = run_main("train_single.py", *_args(tmp_path, tiny_model_dir, "--epochs", 4, "--learning_rate", 3e-3,
                                              "--metric_for_best", "loss", "--run_name", "best"))
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "ck" / "best"
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["event"] == "epoch"]
    best = min(epochs, key=lambda e: e["val_loss"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_epoch"] == best["epoch"] and summary["best_val_loss"] == best["val_loss"]
    assert not (run / "best" / "training_state.pt").exists()  # a model to deploy: no optimizer state
    # best/ holds the best epoch's weights: evaluated on the run's held-out split, it has that epoch's loss
    proc = run_main("evaluate.py", "--checkpoint", run / "best", "--train_file", tmp_path / "train.csv",
                    "--output", tmp_path / "best.json")
    assert proc.returncode == 0, proc.stderr
    evaluated = json.loads((tmp_path / "best.json").read_text())
    assert evaluated["loss"] == pytest.approx(best["val_loss"], rel=1e-5), (evaluated, epochs)
    AutoModelForSequenceClassification.from_pretrained(run / "best")
    same = all(torch.equal(a, b) for a, b in zip(load_file(run / "best" / "model.safetensors").values(),
                                                 load_file(run / "final" / "model.safetensors").values()))
    assert same == (best["epoch"] == 4)


def test_every_run_says_where_its_time_went(tmp_path, tiny_model_dir, run_main):
    """The breakdown adds up to the run's wall time, training is the epochs' own time, and checkpoints
    written between steps count as checkpoints, not as training."""
    import time

    t0 = time.perf_counter()
    proc = run_main("train_single.py", *_args(tmp_path, tiny_model_dir, "--epochs", 2, "--save_every_steps", 1,
                                              "--run_name", "r"))
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "ck" / "r"
    summary = json.loads((run / "summary.json").read_text())
    b = summary["time_breakdown_s"]
    phases = ("start-up", "data", "model", "training", "evaluation", "checkpoints", "other")
    assert all(b[p] >= 0 for p in phases) and b["processes"] == 1
    assert abs(sum(b[p] for p in phases) - b["total"]) < 0.05 and b["total"] == summary["total_time_s"]
    # the command's own time, not more (the breakdown is rounded to 0.01 s); how close it comes to the wall
    # time depends on the machine's load, so that is left to the benchmarks
    assert b["total"] <= wall + 0.005 and b["start-up"] > 0 and b["training"] > 0
    # 8 steps, a checkpoint after each, best/ and final/: checkpoints cost more than nothing, and they are
    # not also in the training time (counted twice, "other" above would be negative)
    assert b["checkpoints"] > 0.05
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("time: ")]
    assert len(line) == 1 and re.search(r"\| total [\d.]+s$", line[0]), proc.stdout


def test_every_recorded_learning_rate_follows_the_documented_schedule(trained):
    """metrics.jsonl's lr at each logged step, against transformers' linear warm-up and decay built from the run's
    own settings: peak --learning_rate after ceil(warmup_ratio x steps) steps, 0 at the last step. Half the
    learning rate, another warm-up or a schedule that does not advance each step would not match."""
    import math

    import torch
    from transformers import get_linear_schedule_with_warmup

    config = json.loads((trained / "config.json").read_text())["config"]
    records = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    epochs = [r for r in records if r["event"] == "epoch"]
    per_epoch = math.ceil(epochs[0]["train_examples"] / config["batch_size"])
    total = per_epoch * config["epochs"]
    reference = get_linear_schedule_with_warmup(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                                                math.ceil(config["warmup_ratio"] * total), total)
    factors = [reference.lr_lambdas[0](s["step"]) for s in steps]
    assert len(steps) >= 10 and total - config["log_every"] < steps[-1]["step"] <= total
    assert min(factors) < 0.1 < 0.9 < max(factors)  # the decay seen almost to its end
    for record, factor in zip(steps, factors):
        assert abs(record["lr"] - config["learning_rate"] * factor) <= 1e-12 * config["learning_rate"], record
