"""End to end through the real command line: the specification's commands, learning, and bad input."""
import json
from pathlib import Path

import pytest
import torch
from transformers import pipeline

from conftest import ROOT, cli_env, run_script, synthetic_rows, write_rows
from training.utils import UserError


def read_metrics(run_dir: Path, event: str) -> list:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def only_run_dir(checkpoint_dir: Path) -> Path:
    runs = [p for p in checkpoint_dir.iterdir() if p.name.startswith("run-")]
    assert len(runs) == 1, runs
    return runs[0]


def test_spec_quick_command_on_the_default_model_and_data(tmp_path):
    """`python training/train_single.py --num_samples 100 --epochs 1`, verbatim, from a fresh directory."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "training" / "train_single.py"), "--num_samples", "100",
                           "--epochs", "1"], cwd=tmp_path, capture_output=True, text=True, env=cli_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1/1 | train loss" in proc.stdout and "samples/s" in proc.stdout
    run_dir = only_run_dir(tmp_path / "checkpoints")
    (epoch,) = read_metrics(run_dir, "epoch")
    assert epoch["train_examples"] == 100 and epoch["val_examples"] == 100
    assert 0 <= epoch["train_accuracy"] <= 1 and epoch["train_loss"] > 0 and epoch["epoch_time_s"] > 0
    final = run_dir / "final"
    assert (final / "model.safetensors").is_file() and (final / "training_state.pt").is_file()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["num_samples"] == 100 and config["versions"]["torch"]
    data_info = json.loads((run_dir / "data.json").read_text())
    assert data_info["split_seed"] == 42 and len(data_info["validation_sha256"]) == 64
    clf = pipeline("text-classification", model=str(final), device="cpu")
    assert clf("a warm, funny and touching film")[0]["label"] in {"fresh", "rotten"}


def test_tiny_model_learns_a_synthetic_task(tmp_path, tiny_model_dir):
    train = write_rows(tmp_path / "train.csv", synthetic_rows(400, seed=1))
    val = write_rows(tmp_path / "val.jsonl", synthetic_rows(100, seed=2))
    proc = run_script("train_single.py", "--model", tiny_model_dir, "--train_file", train,
                      "--validation_file", val, "--epochs", 6, "--batch_size", 16, "--learning_rate", 2e-3,
                      "--max_length", 32, "--warmup_ratio", 0.1, "--checkpoint_dir", tmp_path / "ck",
                      "--run_name", "synthetic", "--log_every", 5)
    assert proc.returncode == 0, proc.stderr
    epochs = read_metrics(tmp_path / "ck" / "synthetic", "epoch")
    assert len(epochs) == 6
    assert epochs[-1]["train_loss"] < 0.5 * epochs[0]["train_loss"]
    assert epochs[-1]["val_accuracy"] >= 0.9, epochs[-1]
    steps = read_metrics(tmp_path / "ck" / "synthetic", "step")
    assert [s["step"] for s in steps] == list(range(5, 6 * 25 + 1, 5))  # 400/16 = 25 steps an epoch
    clf = pipeline("text-classification", model=str(tmp_path / "ck" / "synthetic" / "final"), device="cpu")
    assert clf("the movie was excellent")[0]["label"] == "positive"
    assert clf("the movie was dreadful")[0]["label"] == "negative"


def _bad_inputs(tmp_path: Path, tiny: Path) -> dict:
    good = write_rows(tmp_path / "good.csv", synthetic_rows(40))
    (tmp_path / "data.xml").write_text("<a/>")
    (tmp_path / "nocols.csv").write_text("a,b\n1,2\n3,4\n")
    (tmp_path / "nolabel.csv").write_text("text\nhello\nworld\n")
    (tmp_path / "empty.csv").write_text("text,label\n")
    one = write_rows(tmp_path / "one.csv", [{"text": f"t {i}", "label": "pos"} for i in range(20)])
    (tmp_path / "a_file").write_text("")
    m = ["--model", tiny]
    return {
        "missing file": ([*m, "--train_file", tmp_path / "nope.csv"], "data file not found"),
        "directory as file": ([*m, "--train_file", tmp_path], "is a directory"),
        "unknown format": ([*m, "--train_file", tmp_path / "data.xml"], "unknown data format '.xml'"),
        "no text column": ([*m, "--train_file", tmp_path / "nocols.csv"], "no text column found"),
        "no label column": ([*m, "--train_file", tmp_path / "nolabel.csv"], "no label column found"),
        "named column missing": ([*m, "--train_file", good, "--text_column", "body"], "text column 'body' not found"),
        "empty data": ([*m, "--train_file", tmp_path / "empty.csv"], "no examples"),
        "single class": ([*m, "--train_file", one], "only one label class"),
        "single class after num_samples": ([*m, "--train_file", good, "--num_samples", 1], "only one label class"),
        "zero epochs": (["--epochs", 0], "--epochs must be positive"),
        "zero batch size": (["--batch_size", 0], "--batch_size must be positive"),
        "negative learning rate": (["--learning_rate=-1e-5"], "--learning_rate must be positive"),
        "zero num_samples": (["--num_samples", 0], "--num_samples must be positive"),
        "graphs without CUDA": (["--cuda_graphs", "on", *m, "--train_file", good, "--device", "cpu"],
                                "--cuda_graphs on needs a CUDA device"),
        "bad compile value": (["--compile", "cudagraphs"], "argument --compile: invalid choice: 'cudagraphs'"),
        "unknown model dir": (["--model", tmp_path / "no-model"], "cannot load model"),
        "unknown hub model": (["--model", "someone/no-such-model"], "cannot load model 'someone/no-such-model'"),
        "unwritable checkpoint dir": ([*m, "--train_file", good, "--checkpoint_dir", tmp_path / "a_file" / "x"],
                                      "cannot write to checkpoint directory"),
    }


CASES = ["missing file", "directory as file", "unknown format", "no text column", "no label column",
         "named column missing", "empty data", "single class", "single class after num_samples", "zero epochs",
         "zero batch size", "negative learning rate", "zero num_samples", "unknown model dir",
         "unknown hub model", "unwritable checkpoint dir", "graphs without CUDA",
         "bad compile value"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, tiny_model_dir, case):
    args, expected = _bad_inputs(tmp_path, tiny_model_dir)[case]
    if "--checkpoint_dir" not in map(str, args):
        args = [*args, "--checkpoint_dir", tmp_path / "ck"]
    proc = run_script("train_single.py", *args, timeout=300)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("error:") or "error:" in lines[-1], proc.stderr
    assert expected in lines[-1], proc.stderr
    assert len([ln for ln in lines if "error" in ln.lower()]) == 1, proc.stderr


def test_help_explains_every_flag():
    proc = run_script("train_single.py", "--help")
    assert proc.returncode == 0
    from training.config import TrainConfig
    import dataclasses
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in proc.stdout


@pytest.mark.parametrize("device, world, accum, skip, tokens, expected", [
    ("cuda", 1, 1, False, 1.5e8, (True, True)),
    ("cuda", 1, 1, False, 1.5e8 - 1, (False, True)),  # too short for the compile to pay back; graphs cost ~nothing
    ("cuda", 1, 2, False, 1e12, (False, False)),  # a step of several micro-batches is not one replay
    ("cuda", 1, 1, True, 1e12, (False, False)),   # knowing whether to skip a step is a host sync
    ("cuda", 2, 1, False, 1e12, (False, False)),  # DDP stays eager
    ("cpu", 1, 1, False, 1e12, (False, False)),
])
def test_auto_speed_uses_cuda_graphs_only_where_they_serve(device, world, accum, skip, tokens, expected):
    from training.trainer import choose_speed
    from training.config import TrainConfig
    from training.distributed import ProcessContext
    cfg = TrainConfig(grad_accum_steps=accum, skip_nonfinite=skip)
    ctx = ProcessContext(0, 0, world, torch.device(device))
    assert choose_speed(cfg, ctx, planned_tokens=tokens) == expected


@pytest.mark.parametrize("world, accum, skip, message", [
    (1, 1, True, "does not work with --skip_nonfinite"),
    (1, 4, False, "does not work with --grad_accum_steps above 1"),
    (2, 1, False, r"does not work with torchrun \(DDP\)"),
])
def test_explicit_cuda_graphs_refuse_what_they_cannot_serve(world, accum, skip, message):
    from training.trainer import choose_speed
    from training.config import TrainConfig
    from training.distributed import ProcessContext
    cfg = TrainConfig(cuda_graphs="on", grad_accum_steps=accum, skip_nonfinite=skip)
    with pytest.raises(UserError, match=message):
        choose_speed(cfg, ProcessContext(0, 0, world, torch.device("cuda")), planned_tokens=10)


def test_explicit_settings_win_over_auto():
    from training.trainer import choose_speed
    from training.config import TrainConfig
    from training.distributed import ProcessContext
    ctx = ProcessContext(0, 0, 1, torch.device("cuda"))
    assert choose_speed(TrainConfig(compile="on", cuda_graphs="off"), ctx, planned_tokens=10) == (True, False)
    assert choose_speed(TrainConfig(compile="off"), ctx, planned_tokens=1e12) == (False, True)
    assert choose_speed(TrainConfig(compile="on"), ProcessContext(0, 0, 1, torch.device("cpu")),
                        planned_tokens=10) == (True, False)
