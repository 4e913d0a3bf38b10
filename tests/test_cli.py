"""End to end through the real command line: the specification's commands, learning, and bad input."""
import json
from pathlib import Path

import pytest
import torch
from transformers import pipeline

from conftest import ROOT, cli_env, disk_bytes, run_script, synthetic_rows, write_rows
from encoderfit.utils import UserError


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
    assert (final / "model.safetensors").is_file() and not (final / "training_state.pt").exists()
    # what the user deploys is the model and tokenizer; best/, final/ and the run's last step checkpoint share
    # one copy of the weights, and a finished run keeps no optimizer state
    (step,) = (run_dir / "checkpoints").iterdir()
    weights = [d / "model.safetensors" for d in (final, run_dir / "best", step)]
    assert len({w.stat().st_ino for w in weights}) == 1
    assert disk_bytes(tmp_path / "checkpoints") < 1.1 * weights[0].stat().st_size
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["num_samples"] == 100 and config["versions"]["torch"]
    data_info = json.loads((run_dir / "data.json").read_text())
    assert data_info["split_seed"] == 42 and len(data_info["validation_sha256"]) == 64
    clf = pipeline("text-classification", model=str(final), device="cpu")
    assert clf("a warm, funny and touching film")[0]["label"] in {"fresh", "rotten"}


def test_tiny_model_learns_a_synthetic_task(tmp_path, tiny_model_dir, run_main):
    train = write_rows(tmp_path / "train.csv", synthetic_rows(400, seed=1))
    val = write_rows(tmp_path / "val.jsonl", synthetic_rows(100, seed=2))
    proc = run_main("train_single.py", "--model", tiny_model_dir, "--train_file", train,
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


@pytest.fixture(scope="session")
def foreign_models(tmp_path_factory, tiny_model_dir) -> dict:
    """Model directories this toolkit must refuse: a decoder, a seq2seq model, a BERT without tokenizer files."""
    import shutil

    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification,
                              T5Config, T5ForSequenceClassification)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("foreign")
    made = {"gpt2": GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=30522)),
            "t5": T5ForSequenceClassification(T5Config(num_layers=1, d_model=32, num_heads=2, d_ff=64, d_kv=16,
                                                       vocab_size=30522)),
            "no-tokenizer": BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32,
                                                                      num_hidden_layers=1, num_attention_heads=2,
                                                                      intermediate_size=64))}
    for name, model in made.items():
        model.save_pretrained(root / name)
        if name != "no-tokenizer":
            for f in tiny_model_dir.glob("*"):
                if f.name.startswith(("tokenizer", "vocab", "special")):
                    shutil.copy(f, root / name / f.name)
    return {name: root / name for name in made}


def _bad_inputs(tmp_path: Path, tiny: Path, foreign: dict) -> dict:
    good = write_rows(tmp_path / "good.csv", synthetic_rows(40))
    (tmp_path / "data.xml").write_text("<a/>")
    (tmp_path / "nocols.csv").write_text("a,b\n1,2\n3,4\n")
    (tmp_path / "nolabel.csv").write_text("text\nhello\nworld\n")
    (tmp_path / "empty.csv").write_text("text,label\n")
    one = write_rows(tmp_path / "one.csv", [{"text": f"t {i}", "label": "pos"} for i in range(20)])
    (tmp_path / "a_file").write_text("")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "taken").write_text("")
    scores = [{"text": f"text {i} good" * (i % 3 + 1), "label": str((i % 9) * 0.5)} for i in range(60)]
    nan = write_rows(tmp_path / "nan.csv", [dict(r, label="nan") if i == 17 else r for i, r in enumerate(scores)])
    na = write_rows(tmp_path / "na.csv", [dict(r, label="n/a") if i == 40 else r for i, r in enumerate(scores)])
    lists = tmp_path / "lists.jsonl"
    lists.write_text("".join(json.dumps({"text": f"t {i}", "labels": ["food", "drink"][: i % 3]}) + "\n"
                             for i in range(30)))
    flags = tmp_path / "flags.csv"
    flags.write_text("text,a,b\n" + "".join(f"t {i},{'yes' if i == 12 else i % 2},{(i + 1) % 2}\n" for i in range(30)))
    import pandas as pd
    pd.DataFrame({"text": [["a", "b"], ["c"]] * 10, "label": ["x", "y"] * 10}).to_parquet(tmp_path / "lists.parquet")
    switch, number = tmp_path / "switch.json", tmp_path / "number.json"
    switch.write_text('{"tensorboard": "false"}')
    number.write_text('{"warmup_ratio": true}')
    ids = tmp_path / "ids.csv"
    ids.write_text("text,id,label\n" + "".join(f"t {i},{i},{'ab'[i % 2]}\n" for i in range(30)))
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit", "image_size": 32}))
    m = ["--model", tiny]
    return {
        "a nan among scores": ([*m, "--train_file", nan],
                               f"row 18 of {nan} has the label 'nan', not a finite number, among numeric scores"),
        "an n/a among scores": ([*m, "--train_file", na], f"row 41 of {na} has the label 'n/a', not a finite number"),
        "label lists split by a separator": ([*m, "--train_file", lists, "--label_separator", ","],
                                             "has a list of labels, and --label_separator splits labels given as "
                                             "one string: leave --label_separator out"),
        "a yes among 0/1 label columns": ([*m, "--train_file", flags, "--label_columns", "a,b"],
                                          f"--label_columns: row 13 of {flags} has 'yes' in column 'a'"),
        "a label weighted twice": ([*m, "--train_file", good, "--class_weights", "positive=3,positive=5"],
                                   "--class_weights gives the label 'positive' twice"),
        "a negative class weight": ([*m, "--train_file", good, "--class_weights", "-1,1"],
                                    "--class_weights must be positive finite numbers, got '-1,1'"),
        "a model's config as --config": (["--config", tiny / "config.json"], "is a model's config.json"),
        "a text column of lists": ([*m, "--train_file", tmp_path / "lists.parquet"],
                                   "the text column 'text' of " + str(tmp_path / "lists.parquet") + " holds lists"),
        "resume from a file": ([*m, "--train_file", good, "--resume", tmp_path / "a_file"],
                               "is a file: give a run directory"),
        "an image model": (["--model", tmp_path / "vit", "--train_file", good],
                           "is a vit model, which transformers cannot load as a text classifier"),
        "an empty model name": (["--model", "", "--train_file", good], "--model is empty"),
        "label columns and a label column": ([*m, "--train_file", flags, "--label_columns", "a,b", "--label_column", "a"],
                                             "give --label_column (one column of labels) or --label_columns"),
        "empty label columns": ([*m, "--train_file", flags, "--label_columns", ""],
                                "--label_columns must name the 0/1 columns"),
        "a switch given a string in --config": (["--config", switch], "tensorboard must be true or false, got \"false\""),
        "a number given true in --config": (["--config", number], "warmup_ratio must be a number, not true"),
        "a pair column of numbers": ([*m, "--train_file", ids, "--text_pair_column", "id"],
                                     "the text pair column 'id' of " + str(ids) + " holds only numbers"),
        "a metric the task has not": ([*m, "--train_file", good, "--metric_for_best", "micro_f1", "--run_name", "m"],
                                      "--metric_for_best micro_f1 is not a metric of this task"),
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
        "fractional epochs": (["--epochs", "1.5"], "argument --epochs: invalid int value: '1.5' (see --help)"),
        "zero batch size": (["--batch_size", 0], "--batch_size must be positive"),
        "negative learning rate": (["--learning_rate=-1e-5"], "--learning_rate must be positive"),
        "nan learning rate": (["--learning_rate", "nan"], "--learning_rate must be a finite number, got nan"),
        "negative seed": (["--seed", "-1"], "--seed and --split_seed must be integers from 0 to 4294967295"),
        "seed too large": (["--seed", 2 ** 32], "--seed and --split_seed must be integers from 0 to 4294967295"),
        "zero num_samples": (["--num_samples", 0], "--num_samples must be positive"),
        "tiny validation fraction": ([*m, "--train_file", good, "--validation_fraction", 0.001],
                                     "--validation_fraction 0.001 of 40 examples holds out 1 and trains on 39"),
        "huge validation fraction": ([*m, "--train_file", good, "--validation_fraction", 0.999],
                                     "--validation_fraction 0.999 of 40 examples holds out 40 and trains on 0"),
        "graphs without CUDA": (["--cuda_graphs", "on", *m, "--train_file", good, "--device", "cpu"],
                                "--cuda_graphs on needs a CUDA device"),
        "bad compile value": (["--compile", "cudagraphs"], "argument --compile: invalid choice: 'cudagraphs'"),
        "bad precision": (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
        "unknown model dir": (["--model", tmp_path / "no-model"], f"--model {tmp_path / 'no-model'}: no such directory"),
        "unknown hub model": (["--model", "someone/no-such-model"], "cannot load model 'someone/no-such-model'"),
        "decoder model": (["--model", foreign["gpt2"], "--train_file", good], "is a decoder-only model (gpt2)"),
        "seq2seq model": (["--model", foreign["t5"], "--train_file", good], "is an encoder-decoder (seq2seq) model (t5)"),
        "no tokenizer files": (["--model", foreign["no-tokenizer"], "--train_file", good],
                               "has no tokenizer files (none of tokenizer.json, vocab.txt, vocab.json, ...)"),
        "max_length above the positions": ([*m, "--train_file", good, "--max_length", 200],
                                           "--max_length 200 is more than --model"),
        "run name outside the checkpoint dir": ([*m, "--run_name", "../x"], "--run_name must be a plain directory name"),
        "absolute run name": ([*m, "--run_name", tmp_path / "abs"], "--run_name must be a plain directory name"),
        "run name that is a file": ([*m, "--train_file", good, "--run_name", "taken"], "is a file, not a run directory"),
        "unwritable checkpoint dir": ([*m, "--train_file", good, "--checkpoint_dir", tmp_path / "a_file" / "x"],
                                      "cannot write to checkpoint directory"),
    }


CASES = ["a nan among scores", "an n/a among scores", "label lists split by a separator", "a yes among 0/1 label columns",
         "a label weighted twice", "a negative class weight", "a model's config as --config", "a text column of lists",
         "resume from a file", "an image model", "an empty model name", "label columns and a label column",
         "empty label columns", "a switch given a string in --config", "a number given true in --config",
         "a pair column of numbers", "a metric the task has not", "missing file", "directory as file", "unknown format", "no text column", "no label column",
         "named column missing", "empty data", "single class", "single class after num_samples", "zero epochs",
         "fractional epochs", "tiny validation fraction", "huge validation fraction", "zero batch size", "negative learning rate", "nan learning rate", "negative seed",
         "seed too large", "zero num_samples", "unknown model dir", "unknown hub model", "decoder model",
         "seq2seq model", "no tokenizer files", "max_length above the positions", "run name outside the checkpoint dir",
         "absolute run name", "run name that is a file", "unwritable checkpoint dir", "graphs without CUDA",
         "bad compile value", "bad precision"]


# Through a new process: the flag errors (answered before torch loads, so a process costs little) and one
# error found by the trainer. The others run the script in this process (conftest.run_in_process: the same
# exit code, output and warnings, without a new interpreter's imports of torch, transformers and datasets).
THROUGH_A_PROCESS = {"a negative class weight", "zero epochs", "fractional epochs", "zero batch size", "negative learning rate",
                     "nan learning rate", "negative seed", "seed too large", "zero num_samples", "bad compile value",
                     "bad precision", "run name outside the checkpoint dir", "absolute run name", "decoder model"}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, tiny_model_dir, foreign_models, run_main, case):
    """One line on stderr, naming the problem; no usage dump, no traceback, no run directory left behind."""
    args, expected = _bad_inputs(tmp_path, tiny_model_dir, foreign_models)[case]
    if "--checkpoint_dir" not in map(str, args):
        args = [*args, "--checkpoint_dir", tmp_path / "ck"]
    proc = (run_script if case in THROUGH_A_PROCESS else run_main)("train_single.py", *args, timeout=300)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected in lines[0], proc.stderr
    assert "device " not in proc.stdout  # the device header comes only once the inputs have been read
    if (tmp_path / "ck").is_dir():
        assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name != "cache") in ([], ["taken"])


def test_a_failed_start_leaves_nothing_so_the_corrected_rerun_runs(tmp_path, tiny_model_dir, foreign_models,
                                                                   run_main):
    good = write_rows(tmp_path / "good.csv", synthetic_rows(40))
    common = ["--train_file", good, "--checkpoint_dir", tmp_path / "ck", "--run_name", "r", "--epochs", 1,
              "--max_length", 32]
    assert run_main("train_single.py", "--model", foreign_models["gpt2"], *common).returncode == 2
    proc = run_main("train_single.py", "--model", tiny_model_dir, *common)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ck" / "r" / "final" / "model.safetensors").is_file()


def test_help_and_argument_errors_answer_before_torch_loads():
    """The flags are read before torch, transformers or datasets are imported (so --help is instant)."""
    import subprocess
    import sys
    probe = ("import runpy, sys\n"
             "sys.argv = ['train_single.py'] + sys.argv[1:]\n"
             "try:\n"
             "    runpy.run_path('training/train_single.py', run_name='__main__')\n"
             "except SystemExit as exc:\n"
             "    heavy = sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules)\n"
             "    print('EXIT', exc.code, 'HEAVY', heavy)\n")
    for args, code in ((["--help"], 0), (["--epochs", "x"], 2)):
        proc = subprocess.run([sys.executable, "-c", probe, *args], cwd=ROOT, capture_output=True, text=True,
                              env=cli_env(), timeout=60)
        assert f"EXIT {code} HEAVY []" in proc.stdout, (proc.stdout, proc.stderr)


def test_files_keep_the_umask_mode(tmp_path, tiny_model_dir):
    import os
    import stat
    import subprocess
    import sys
    from conftest import on_cpu
    good = write_rows(tmp_path / "good.csv", synthetic_rows(40))
    args = ["--model", tiny_model_dir, "--train_file", good, "--epochs", 1, "--max_length", 32,
            "--checkpoint_dir", tmp_path / "ck", "--run_name", "r"]
    proc = subprocess.run([sys.executable, str(ROOT / "training" / "train_single.py"), *on_cpu("train_single.py", args)],
                          cwd=ROOT, capture_output=True, text=True, env=cli_env(), timeout=300,
                          preexec_fn=lambda: os.umask(0o002))
    assert proc.returncode == 0, proc.stderr
    files = [p for p in (tmp_path / "ck" / "r").rglob("*") if p.is_file()]
    assert len(files) > 10
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert set(modes.values()) == {0o664}, modes  # model.safetensors and the JSON records too, not 0600


def test_help_explains_every_flag():
    proc = run_script("train_single.py", "--help")
    assert proc.returncode == 0
    from encoderfit.config import TrainConfig
    import dataclasses
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in proc.stdout


@pytest.mark.parametrize("device, world, accum, skip, tokens, expected", [
    ("cuda", 1, 1, False, 2e7, (True, True)),
    ("cuda", 1, 1, False, 2e7 - 1, (False, True)),  # too short for the compile to pay back; graphs cost ~nothing
    ("cuda", 1, 2, False, 1e12, (True, False)),   # a step of several micro-batches is not one replay
    ("cuda", 1, 1, True, 1e12, (True, False)),    # knowing whether to skip a step is a host sync
    ("cuda", 2, 1, False, 1e12, (True, True)),    # under DDP too: the all-reduce is recorded with the step
    ("cuda", 2, 2, False, 1e12, (True, False)),   # DDP with accumulation: no_sync micro-steps, eager
    ("cpu", 1, 1, False, 1e12, (False, False)),
])
def test_auto_speed_uses_cuda_graphs_only_where_they_serve(device, world, accum, skip, tokens, expected):
    from encoderfit.run.trainer import choose_speed
    from encoderfit.config import TrainConfig
    from encoderfit.engine.distributed import ProcessContext
    cfg = TrainConfig(grad_accum_steps=accum, skip_nonfinite=skip)
    ctx = ProcessContext(0, 0, world, torch.device(device))
    compiled, graphs = choose_speed(cfg, ctx, planned_tokens=tokens)
    assert (compiled == "regional", graphs) == expected and compiled in ("regional", "off")


@pytest.mark.parametrize("world, accum, skip, message", [
    (1, 1, True, "does not work with --skip_nonfinite"),
    (1, 4, False, "does not work with --grad_accum_steps above 1"),
    (2, 4, False, "does not work with --grad_accum_steps above 1"),  # under DDP as on one process
])
def test_explicit_cuda_graphs_refuse_what_they_cannot_serve(world, accum, skip, message):
    from encoderfit.run.trainer import choose_speed
    from encoderfit.config import TrainConfig
    from encoderfit.engine.distributed import ProcessContext
    cfg = TrainConfig(cuda_graphs="on", grad_accum_steps=accum, skip_nonfinite=skip)
    with pytest.raises(UserError, match=message):
        choose_speed(cfg, ProcessContext(0, 0, world, torch.device("cuda")), planned_tokens=10)


def test_explicit_settings_win_over_auto():
    from encoderfit.run.trainer import choose_speed
    from encoderfit.config import TrainConfig
    from encoderfit.engine.distributed import ProcessContext
    ctx = ProcessContext(0, 0, 1, torch.device("cuda"))
    cpu = ProcessContext(0, 0, 1, torch.device("cpu"))
    assert choose_speed(TrainConfig(compile="on", cuda_graphs="off"), ctx, planned_tokens=10) == ("regional", False)
    assert choose_speed(TrainConfig(compile="off"), ctx, planned_tokens=1e12) == ("off", True)
    assert choose_speed(TrainConfig(compile="on"), cpu, planned_tokens=10) == ("regional", False)
    assert choose_speed(TrainConfig(compile="whole"), ctx, planned_tokens=10) == ("whole", True)
    # auto: on CUDA from COMPILE_MIN_TOKENS planned tokens on, with or without graphs; never on the CPU
    from encoderfit.run.trainer import COMPILE_MIN_TOKENS as least
    assert choose_speed(TrainConfig(), ctx, planned_tokens=least) == ("regional", True)
    assert choose_speed(TrainConfig(), ctx, planned_tokens=least - 1) == ("off", True)
    assert choose_speed(TrainConfig(grad_accum_steps=2), ctx, planned_tokens=least) == ("regional", False)
    assert choose_speed(TrainConfig(), cpu, planned_tokens=1e12) == ("off", False)
