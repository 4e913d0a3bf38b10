"""Inputs that once gave a silently wrong result or a traceback: each is now the right behaviour or one line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, cli_env, synthetic_rows, write_rows
from test_tasks import score_rows, topic_rows, write_topic_files


def _strict(text: str):
    """JSON as strict parsers read it: NaN and Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


COMMON = ["--epochs", 2, "--batch_size", 16, "--learning_rate", 2e-3, "--max_length", 32, "--log_every", 5]


def test_a_constant_validation_target_is_never_the_selector(tiny_model_dir, tmp_path, run_main):
    """Pearson of equal targets is undefined: the epoch line says n/a, the run says it selects by the loss and
    does, summary.json holds null (strict JSON), and evaluate says why."""
    train = tmp_path / "train.csv"
    train.write_text("text,score\n" + "".join(f"{r['text']},{r['score']}\n" for r in score_rows(120, seed=1)))
    val = tmp_path / "val.csv"
    val.write_text("text,score\n" + "".join(f"{r['text']},2.5\n" for r in score_rows(20, seed=2)))
    proc = run_main("train_single.py", "--model", tiny_model_dir, "--train_file", train, "--validation_file", val,
                    *COMMON, "--metric_for_best", "pearson", "--checkpoint_dir", tmp_path, "--run_name", "r")
    assert proc.returncode == 0, proc.stderr
    epoch_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("epoch ") and "| train " in ln]
    assert len(epoch_lines) == 2 and all("pearson n/a spearman n/a" in ln for ln in epoch_lines), proc.stdout
    assert proc.stdout.count("note: val pearson is undefined at epoch 1") == 1
    assert "best/ is chosen by val loss from here on" in proc.stdout
    summary = _strict((tmp_path / "r" / "summary.json").read_text())
    assert summary["metric_for_best"] == "loss" and summary["best_val_pearson"] is None
    losses = [r["val_loss"] for r in map(_strict, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "epoch"]
    assert summary["best_epoch"] == 1 + losses.index(min(losses))  # chosen by the loss, not by an undefined metric
    assert f"best (epoch {summary['best_epoch']}, by loss)" in proc.stdout
    ev = run_main("evaluate.py", "--checkpoint", tmp_path / "r" / "best", "--data", val, "--output", tmp_path / "e.json")
    assert ev.returncode == 0, ev.stderr
    assert "pearson n/a | spearman n/a" in ev.stdout
    assert "note: Pearson and Spearman are undefined: the targets are all equal (2.5)" in ev.stdout
    report = _strict((tmp_path / "e.json").read_text())
    assert report["pearson"] is None and report["mse"] == pytest.approx(summary["best_val_mse"], rel=1e-5)


@pytest.fixture(scope="module")
def regression_run(tiny_model_dir, tmp_path_factory):
    from encoderfit import fit
    import pandas as pd

    base = tmp_path_factory.mktemp("regression")
    fit(pd.DataFrame(score_rows(120, seed=3)), model=str(tiny_model_dir), checkpoint_dir=base, run_name="r",
        epochs=1, batch_size=16, learning_rate=2e-3, max_length=32, device="cpu", no_progress=True)
    return base / "r" / "final"


def test_predict_refuses_targets_that_are_not_finite_and_writes_strict_json(regression_run, tmp_path, run_main):
    data = tmp_path / "in.csv"
    data.write_text("text,score\ngood good,2.5\nbad,nan\nmeh,\nfine,inf\n")
    named = run_main("predict.py", "--checkpoint", regression_run, "--input", data, "--label_column", "score")
    assert named.returncode == 2 and named.stderr == (
        f"error: row 2 of {data} has 'nan' in column 'score', not a finite number: a regression checkpoint scores "
        f"against numbers (leave the field empty for a text without a target)\n"), named.stderr
    found = run_main("predict.py", "--checkpoint", regression_run, "--input", data, "--output", tmp_path / "p.jsonl")
    assert found.returncode == 0, found.stderr
    assert f"note: not scoring against column 'score' of {data}: row 2 has 'nan', not a finite number" in found.stderr
    assert "mse" not in found.stdout  # no score line from targets that are not numbers
    rows = [_strict(ln) for ln in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all("true_score" not in r for r in rows)
    # empty targets are texts without one: the others are scored, and the JSON has null for the empty one
    data.write_text("text,score\ngood good,2.5\nbad,1\nmeh,\n")
    scored = run_main("predict.py", "--checkpoint", regression_run, "--input", data, "--output", tmp_path / "q.jsonl")
    assert scored.returncode == 0 and "| 2 labelled text(s) (label column 'score')" in scored.stdout, scored.stdout
    assert [r["true_score"] for r in map(_strict, (tmp_path / "q.jsonl").read_text().splitlines())] == [2.5, 1.0, None]
    # one labelled text: Pearson is undefined, and said so
    data.write_text("text,score\ngood good,2.5\nbad,\n")
    one = run_main("predict.py", "--checkpoint", regression_run, "--input", data)
    assert "pearson n/a | 1 labelled text(s)" in one.stdout and "undefined for fewer than 2 examples" in one.stdout


def test_predict_names_the_checkpoints_stride_that_does_not_fit(tiny_model_dir, tmp_path, run_main):
    train = write_rows(tmp_path / "train.csv", synthetic_rows(60, seed=4))
    proc = run_main("train_single.py", "--model", tiny_model_dir, "--train_file", train, "--epochs", 1,
                    "--max_length", 64, "--long_texts", "windows", "--stride", 20, "--checkpoint_dir", tmp_path,
                    "--run_name", "w")
    assert proc.returncode == 0, proc.stderr
    short = run_main("predict.py", "--checkpoint", tmp_path / "w" / "final", "--max_length", 32, "a text")
    assert short.returncode == 2 and short.stderr == (
        "error: the checkpoint was trained with --stride 20, which does not fit --max_length 32: pass a --stride "
        "that does (below 16), or a longer --max_length\n"), short.stderr
    fits = run_main("predict.py", "--checkpoint", tmp_path / "w" / "final", "--max_length", 32, "--stride", 8, "a text")
    assert fits.returncode == 0, fits.stderr


@pytest.mark.parametrize("how", ["separator", "columns"])
def test_evaluate_reads_labels_as_the_checkpoint_was_trained(how, tiny_model_dir, tmp_path, run_main):
    """A --label_separator or --label_columns checkpoint: evaluate without that flag reads the labels the same way
    (it used to say "no label column found" or "rows have no label"), and gives what it gives with the flag."""
    data, flags = write_topic_files(tmp_path, topic_rows(120, seed=5))[how]
    proc = run_main("train_single.py", "--model", tiny_model_dir, "--train_file", data, *flags, "--epochs", 1,
                    "--max_length", 32, "--checkpoint_dir", tmp_path, "--run_name", how)
    assert proc.returncode == 0, proc.stderr
    ckpt = tmp_path / how / "final"
    plain = run_main("evaluate.py", "--checkpoint", ckpt, "--data", data, "--output", tmp_path / "a.json")
    assert plain.returncode == 0, plain.stderr
    recorded = {"separator": "--label_column 'tags' --label_separator '|'",
                "columns": "--label_columns 'sports,music,food'"}[how]
    assert f"note: labels read as the checkpoint was trained: {recorded}" in plain.stdout, plain.stdout
    given = run_main("evaluate.py", "--checkpoint", ckpt, "--data", data, *flags, "--output", tmp_path / "b.json")
    assert given.returncode == 0, given.stderr
    a, b = _strict((tmp_path / "a.json").read_text()), _strict((tmp_path / "b.json").read_text())
    assert a["examples"] == b["examples"] == 120 and a["micro_f1"] == b["micro_f1"] and a["loss"] == b["loss"]
    # the same rows with label lists: read as given (the recorded format does not fit them), the same numbers
    lists, _ = write_topic_files(tmp_path, topic_rows(120, seed=5))["lists"]
    other = run_main("evaluate.py", "--checkpoint", ckpt, "--data", lists, "--output", tmp_path / "c.json")
    assert other.returncode == 0, other.stderr
    assert "labels read as the checkpoint was trained" not in other.stdout
    c = _strict((tmp_path / "c.json").read_text())
    assert c["micro_f1"] == a["micro_f1"] and c["loss"] == a["loss"]


def _launch(*args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "encoderfit", "launch", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=cli_env(PYTHONPATH=str(ROOT / "src")))


def test_launch_ends_with_the_processes_error_line_and_exit_code(tiny_model_dir, tmp_path):
    """Bad input under torchrun's launcher: the one error line, exit code 2; no ChildFailedError traceback."""
    train = write_rows(tmp_path / "train.csv", synthetic_rows(60, seed=6))
    proc = _launch("--nproc_per_node=2", "train", "--model", tiny_model_dir, "--train_file", train, "--device", "cpu",
                   "--epochs", 1, "--class_weights", "negative=1,negative=2", "--checkpoint_dir", tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == ["error: --class_weights gives the label 'negative' twice: give each label once"], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    bad = _launch("--gpus=2", "train")
    assert bad.returncode == 2 and bad.stderr.startswith("error: unrecognized arguments: --gpus=2"), bad.stderr
    assert bad.stderr.count("\n") == 1
    none = _launch("--nproc_per_node=2")
    assert none.returncode == 2 and "needs a command to start, one of: train, sweep" in none.stderr


def test_launch_runs_the_job_and_names_a_process_that_crashed(tiny_model_dir, tmp_path):
    train = write_rows(tmp_path / "train.csv", synthetic_rows(60, seed=7))
    ok = _launch("--nproc_per_node=2", "train", "--model", tiny_model_dir, "--train_file", train, "--device", "cpu",
                 "--epochs", 1, "--batch_size", 8, "--max_length", 32, "--checkpoint_dir", tmp_path, "--run_name", "ok")
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["world_size"] == 2
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(
        "import os\nif os.environ.get('RANK') == '1':\n    import torch\n    _step = torch.optim.AdamW.step\n"
        "    def step(self, *a, **k):\n        raise RuntimeError('injected failure on rank 1')\n"
        "    torch.optim.AdamW.step = step\n")
    crash = subprocess.run([sys.executable, "-m", "encoderfit", "launch", "--nproc_per_node=2", "train", "--model",
                            str(tiny_model_dir), "--train_file", str(train), "--device", "cpu", "--epochs", "1",
                            "--max_length", "32", "--checkpoint_dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                           text=True, timeout=240,
                           env=cli_env(PYTHONPATH=f"{tmp_path / 'hook'}:{ROOT / 'src'}"))
    assert crash.returncode == 1, crash.stderr
    assert "injected failure on rank 1" in crash.stderr  # the crashed process's own traceback, a bug's: kept
    assert crash.stderr.rstrip().splitlines()[-1].startswith("error: rank 1 of encoderfit train failed (exit code 1)")
    assert "ChildFailedError" not in crash.stderr


def test_the_python_api_refuses_what_it_cannot_read_in_one_line(frame_run, tiny_model_dir):
    """Each once a traceback (or, for a DataFrame given to predict, predictions of its column names)."""
    import pandas as pd

    from encoderfit import Classifier, TrainConfig, UserError, fit

    clf = Classifier.load(frame_run, device="cpu")
    cases = [
        (lambda: clf.predict(pd.DataFrame({"text": ["good", "bad", "meh"]})), "texts must be a list of strings, got a DataFrame"),
        (lambda: clf.predict({"text": "hi"}), "texts must be a list of strings, got a dict"),
        (lambda: clf.predict(None), "texts must be a string or a list of strings, got NoneType"),
        (lambda: clf.predict(5), "texts must be a string or a list of strings, got int"),
        (lambda: Classifier.load(None), "Classifier.load needs a checkpoint directory (a path), got NoneType"),
        (lambda: Classifier.load(frame_run, batch_size="8"), "batch_size must be an integer, got '8'"),
    ]
    rows = pd.DataFrame(synthetic_rows(40, seed=9))
    model = dict(model=str(tiny_model_dir), device="cpu", epochs=1)
    cases += [
        (lambda: fit(rows.assign(text=["a joy", 5] * 20), **model), "the training data cannot be read as a table"),
        (lambda: fit(pd.concat([rows, rows[["label"]]], axis=1), **model), "has the column name(s) label more than once"),
        (lambda: fit(rows, config={"epochs": 1}), "config must be a TrainConfig"),
        (lambda: fit(rows, "val.csv", **model), "train_data is in memory and validation_data is a file path"),
    ]
    for call, message in cases:
        with pytest.raises(UserError) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    import numpy as np

    config = TrainConfig.from_settings(epochs=np.int64(2), learning_rate=np.float32(1e-4))  # numpy numbers are numbers
    assert config.epochs == 2 and type(config.epochs) is int and type(config.learning_rate) is float


@pytest.fixture(scope="module")
def frame_run(tiny_model_dir, tmp_path_factory):
    import pandas as pd

    from encoderfit import fit

    base = tmp_path_factory.mktemp("frame")
    return fit(pd.DataFrame(synthetic_rows(60, seed=10)), model=str(tiny_model_dir), checkpoint_dir=base,
               run_name="r", epochs=1, batch_size=16, max_length=32, device="cpu", no_progress=True).final_checkpoint


def test_evaluate_refuses_label_columns_that_leave_out_a_checkpoint_label(tiny_model_dir, tmp_path, run_main):
    data, flags = write_topic_files(tmp_path, topic_rows(60, seed=11))["columns"]
    proc = run_main("train_single.py", "--model", tiny_model_dir, "--train_file", data, *flags, "--epochs", 1,
                    "--max_length", 32, "--checkpoint_dir", tmp_path, "--run_name", "c")
    assert proc.returncode == 0, proc.stderr
    short = run_main("evaluate.py", "--checkpoint", tmp_path / "c" / "final", "--data", data,
                     "--label_columns", "sports,music")
    assert short.returncode == 2 and short.stderr == (
        "error: --label_columns names no column for the checkpoint's label(s) food: give a 0/1 column for each "
        "label it predicts (sports, music, food)\n"), short.stderr
    lists, _ = write_topic_files(tmp_path, topic_rows(20, seed=12))["lists"]
    single = run_main("train_single.py", "--model", tiny_model_dir, "--train_file",
                      write_rows(tmp_path / "s.csv", synthetic_rows(40, seed=13)), "--epochs", 1, "--max_length", 32,
                      "--checkpoint_dir", tmp_path, "--run_name", "s")
    assert single.returncode == 0, single.stderr
    wrong = run_main("evaluate.py", "--checkpoint", tmp_path / "s" / "final", "--data", lists)
    assert wrong.returncode == 2 and f"{lists} has lists of labels (row 1: several labels per row)" in wrong.stderr


def test_a_sweep_refused_before_any_trial_trained_leaves_nothing_behind(tiny_model_dir, tmp_path, run_main):
    """Class weights for labels the data has not are found once the data is read; the first launch then leaves no
    sweep directory, so the corrected command is not "another sweep"."""
    train = write_rows(tmp_path / "train.csv", synthetic_rows(60, seed=14))
    common = ["--model", tiny_model_dir, "--train_file", train, "--learning_rate", "1e-4,1e-3", "--epochs", 1,
              "--max_length", 32, "--sweep_dir", tmp_path / "sw"]
    bad = run_main("sweep.py", *common, "--class_weights", "1,2,3")
    assert bad.returncode == 2 and "--class_weights gives 3 weight(s) for 2 labels" in bad.stderr, bad.stderr
    assert not (tmp_path / "sw").exists()
    good = run_main("sweep.py", *common, "--class_weights", "1,2")
    assert good.returncode == 0, good.stderr
    assert [t["status"] for t in json.loads((tmp_path / "sw" / "sweep.json").read_text())["trials"]] == ["done", "done"]
