"""evaluate.py and the metrics: numbers against a direct computation, the training split, the plot, bad input."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import conftest  # noqa: E402
from conftest import THREE_LABELS, run_script, synthetic_rows, write_rows

from encoderfit.cli import evaluate
from encoderfit.serve import inference
from encoderfit.metrics import classification_metrics, confusion_matrix

LABELS = THREE_LABELS


def direct_predictions(ckpt: Path, texts: list, max_length: int) -> list:
    """Predicted label names, one unpadded forward pass per text, with plain transformers."""
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    with torch.no_grad():
        ids = [int(model(**tokenizer(t, truncation=True, max_length=max_length, return_tensors="pt")).logits.argmax())
               for t in texts]
    return [model.config.id2label[i] for i in ids]


def direct_metrics(true: list, pred: list, labels: list) -> dict:
    """Accuracy, confusion matrix, per-class P/R/F1 and macro-F1 by counting, the textbook way."""
    cm = [[sum(1 for t, p in zip(true, pred) if t == a and p == b) for b in labels] for a in labels]
    per_class, f1s = {}, []
    for i, name in enumerate(labels):
        tp = cm[i][i]
        predicted = sum(cm[r][i] for r in range(len(labels)))
        support = sum(cm[i])
        p = tp / predicted if predicted else 0.0
        r = tp / support if support else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        per_class[name] = {"precision": p, "recall": r, "f1": f1, "support": support}
        if support or predicted:
            f1s.append(f1)
    return {"accuracy": sum(t == p for t, p in zip(true, pred)) / len(true), "confusion_matrix": cm,
            "per_class": per_class, "macro_f1": sum(f1s) / len(f1s)}


def assert_metrics_match(got: dict, want: dict) -> None:
    assert got["confusion_matrix"] == want["confusion_matrix"]
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)
    assert got["macro_f1"] == pytest.approx(want["macro_f1"], abs=1e-12)
    for name, m in want["per_class"].items():
        for key in ("precision", "recall", "f1", "support"):
            assert got["per_class"][name][key] == pytest.approx(m[key], abs=1e-12), (name, key)


def assert_real_png(path: Path) -> None:
    conftest.assert_real_png(path, width=(300, 4000), height=(300, 4000))


def noisy_validation(path: Path, n: int = 60) -> tuple:
    """A labelled file where a third of the labels are changed: the model gets those wrong."""
    rows = synthetic_rows(n, seed=11, labels=LABELS)
    rng = random.Random(0)
    for row in rows[::3]:
        row["label"] = rng.choice([x for x in LABELS if x != row["label"]])
    write_rows(path, rows)
    return [r["text"] for r in rows], [r["label"] for r in rows]


def test_cli_metrics_equal_a_direct_computation(tmp_path, trained, run_main):
    texts, labels = noisy_validation(tmp_path / "val.jsonl")
    out, png = tmp_path / "eval.json", tmp_path / "plots" / "cm.png"
    train = trained.parent.parent / "train.csv"
    proc = run_main("evaluate.py", "--checkpoint", trained / "final", "--train_file", train,
                    "--validation_file", tmp_path / "val.jsonl", "--output", out, "--plot", png, "--batch_size", 7)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["labels"] == list(LABELS) and result["examples"] == len(texts)
    assert result["max_length"] == 32  # what the checkpoint was trained with
    pred = direct_predictions(trained / "final", texts, max_length=32)
    want = direct_metrics(labels, pred, list(LABELS))
    assert 0.3 < want["accuracy"] < 0.95  # the noise makes every part of the matrix count
    assert_metrics_match(result, want)
    # the printed report carries the same numbers
    assert f"accuracy {want['accuracy']:.4f} | macro-F1 {want['macro_f1']:.4f}" in proc.stdout
    for name in LABELS:
        m = want["per_class"][name]
        assert f"{name:<9}  {m['precision']:>9.4f}  {m['recall']:>6.4f}  {m['f1']:>6.4f}  {m['support']:>7d}" \
            in proc.stdout
    row = "  ".join(f"{v:>{max(len(n), 2)}}" for v, n in zip(want["confusion_matrix"][0], LABELS))
    assert f"alpha             {row}" in proc.stdout
    assert_real_png(png)


def test_a_labelled_file_alone_is_evaluated_row_by_row(tmp_path, trained, capfd, run_main):
    texts, labels = noisy_validation(tmp_path / "test.csv")
    out = {name: tmp_path / f"{name}.json" for name in ("alone", "data", "with_train")}
    proc = run_main("evaluate.py", "--checkpoint", trained / "final", "--validation_file", tmp_path / "test.csv",
                    "--output", out["alone"])
    assert proc.returncode == 0, proc.stderr
    assert f"data: every row of {tmp_path / 'test.csv'} | 60 examples" in proc.stdout
    assert evaluate.main(["--device", "cpu", "--checkpoint", str(trained / "final"), "--data", str(tmp_path / "test.csv"),
                          "--output", str(out["data"])]) == 0
    assert evaluate.main(["--device", "cpu", "--checkpoint", str(trained / "final"), "--train_file", str(trained.parent.parent / "train.csv"),
                          "--validation_file", str(tmp_path / "test.csv"), "--output", str(out["with_train"])]) == 0
    capfd.readouterr()
    results = {name: json.loads(path.read_text()) for name, path in out.items()}
    want = direct_metrics(labels, direct_predictions(trained / "final", texts, max_length=32), list(LABELS))
    for result in results.values():
        assert result["examples"] == 60 and result["data"]["rows_read"][str(tmp_path / "test.csv")] == 60
        assert_metrics_match(result, want)


def test_default_split_is_the_one_training_held_out(trained, tmp_path, capsys):
    """With no data flag, the run's own recorded data flags: its validation split, as training scored it."""
    out = tmp_path / "eval.json"
    assert evaluate.main(["--device", "cpu", "--checkpoint", str(trained), "--output", str(out)]) == 0
    stdout = capsys.readouterr().out
    result = json.loads(out.read_text())
    data_info = json.loads((trained / "data.json").read_text())
    summary = json.loads((trained / "summary.json").read_text())
    assert result["data"]["validation_sha256"] == data_info["validation_sha256"]
    assert result["data"]["same_split_as_training"] is True
    assert "the same examples the checkpoint's training run validated on" in stdout
    assert result["examples"] == data_info["validation_examples"] == 30
    # training's own last evaluation, reproduced
    assert result["accuracy"] == pytest.approx(summary["final_val_accuracy"], abs=1e-9)
    assert result["loss"] == pytest.approx(summary["final_val_loss"], abs=1e-4)

    assert result["data"]["source"] == str(trained.parent.parent / "train.csv")

    # another split seed (the rest of the run's flags kept) holds out other examples, and says so plainly
    assert evaluate.main(["--device", "cpu", "--checkpoint", str(trained), "--split_seed", "7",
                          "--output", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "| other examples than the run validated on (a test set, or other split flags)" in stdout
    assert "note:" not in stdout
    other = json.loads(out.read_text())
    assert other["data"]["same_split_as_training"] is False and other["data"]["split_seed"] == 7
    assert other["data"]["source"] == result["data"]["source"] and other["examples"] == 30


def test_without_data_flags_a_run_whose_data_is_gone_is_refused_by_name(trained, tmp_path):
    """A copy of the run whose recorded training file is not there: one line naming it and the flag to give."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    record = json.loads((copy / "config.json").read_text())
    record["config"]["train_file"] = str(tmp_path / "moved.csv")
    (copy / "config.json").write_text(json.dumps(record))
    with pytest.raises(inference.UserError, match=r"trained with --train_file .*moved\.csv, which is not there now.*"
                                                   r"--validation_file"):
        evaluate.evaluate_checkpoint(_args(copy / "final"))
    # a run on data handed to fit() in memory
    data = json.loads((copy / "data.json").read_text())
    (copy / "data.json").write_text(json.dumps({**data, "source": "the training data given to fit()"}))
    with pytest.raises(inference.UserError, match=r"trained on data handed to fit\(\) in memory.*--validation_file"):
        evaluate.evaluate_checkpoint(_args(copy / "final"))


def _args(ckpt):
    args = evaluate.build_parser().parse_args(["--device", "cpu", "--checkpoint", str(ckpt)])
    evaluate._check(args)
    return args


def test_two_classes_with_an_untrained_head(tiny_model_dir, tmp_path, capsys):
    """The tiny random model (labels LABEL_0, LABEL_1): predictions are poor, the numbers must still agree."""
    rows = [dict(r, label=f"LABEL_{int(r['label'] == 'positive')}") for r in synthetic_rows(80, seed=4)]
    write_rows(tmp_path / "train.csv", rows)
    out, png = tmp_path / "eval.json", tmp_path / "cm.png"
    assert evaluate.main(["--device", "cpu", "--checkpoint", str(tiny_model_dir), "--train_file", str(tmp_path / "train.csv"),
                          "--validation_fraction", "0.5", "--max_length", "24", "--output", str(out),
                          "--plot", str(png)]) == 0
    result = json.loads(out.read_text())
    assert result["data"]["same_split_as_training"] is None  # no training run recorded beside this model
    splits = evaluate.load_validation(evaluate.build_parser().parse_args(
        ["--checkpoint", "x", "--train_file", str(tmp_path / "train.csv"), "--validation_fraction", "0.5"]))
    texts, labels = splits.texts, splits.labels
    assert len(texts) == 40
    want = direct_metrics(labels, direct_predictions(tiny_model_dir, texts, 24), ["LABEL_0", "LABEL_1"])
    assert_metrics_match(result, want)
    assert_real_png(png)
    capsys.readouterr()


def test_metrics_of_many_classes_against_counting():
    rng = np.random.default_rng(0)
    k = 7
    y_true = rng.integers(0, k - 2, 500)  # classes 5 and 6 never occur in the data ...
    y_pred = np.where(rng.random(500) < 0.6, y_true, rng.integers(0, k, 500))
    y_pred[y_pred == 4] = 3  # ... class 4 is never predicted, class 5 is (wrongly) ...
    y_pred[y_pred == 6] = 0  # ... and class 6 neither occurs nor is predicted: not in the macro average
    names = [f"c{i}" for i in range(k)]
    cm = confusion_matrix(y_true, y_pred, k)
    got = classification_metrics(cm, names)
    want = direct_metrics([names[i] for i in y_true], [names[i] for i in y_pred], names)
    assert_metrics_match(got, want)
    assert got["per_class"]["c4"]["precision"] == 0.0 and got["per_class"]["c5"]["recall"] == 0.0
    assert got["per_class"]["c5"]["predicted"] > 0 and got["per_class"]["c6"]["predicted"] == 0
    assert got["macro_f1"] == pytest.approx(np.mean([got["per_class"][f"c{i}"]["f1"] for i in range(6)]))
    assert cm.sum() == 500 and got["examples"] == 500
    # a hand-worked case: 2 classes
    cm2 = confusion_matrix([0, 0, 0, 1, 1], [0, 1, 0, 1, 0], 2)
    assert cm2.tolist() == [[2, 1], [1, 1]]
    m = classification_metrics(cm2, ["a", "b"])
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["per_class"]["a"]["f1"] == pytest.approx(2 / 3) and m["per_class"]["b"]["f1"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5) / 2)


def test_confusion_matrix_plot_of_many_long_labels(tmp_path):
    from encoderfit.cli.plot import plot_confusion_matrix

    k = 12
    cm = np.random.default_rng(1).integers(0, 30, (k, k)) + np.eye(k, dtype=int) * 100
    names = [f"a rather long category name {i}" for i in range(k)]
    assert_real_png(plot_confusion_matrix(cm, names, tmp_path / "cm.png", title="twelve classes"))


def _bad_inputs(tmp: Path, trained: Path, tiny: Path) -> dict:
    from encoderfit.modeling.model import default_model_dir

    train = trained.parent.parent / "train.csv"
    ck = ["--checkpoint", str(trained / "final")]
    rows = synthetic_rows(30, seed=2, labels=LABELS)
    rows[3]["label"] = "delta"
    write_rows(tmp / "unknown.csv", rows)
    (tmp / "nocols.csv").write_text("a,b\n1,2\n3,4\n")
    (tmp / "empty.csv").write_text("text,label\n")
    (tmp / "empty_dir").mkdir()
    (tmp / "a_file").write_text("")
    return {
        "missing checkpoint": (["--checkpoint", str(tmp / "nope"), "--train_file", str(train)],
                               "checkpoint not found"),
        "not a checkpoint": (["--checkpoint", str(tmp / "empty_dir"), "--train_file", str(train)],
                             "is not a model checkpoint"),
        "base model, no classifier": (["--checkpoint", str(default_model_dir()), "--train_file", str(train)],
                                      "is not a text-classification checkpoint"),
        "unknown label in validation file": ([*ck, "--train_file", str(train), "--validation_file",
                                              str(tmp / "unknown.csv")], "delta"),
        "labels the checkpoint does not know": (["--checkpoint", str(tiny), "--train_file", str(train)],
                                                "the data has labels the checkpoint does not know: alpha, beta"),
        "missing data file": ([*ck, "--train_file", str(tmp / "nope.csv")], "data file not found"),
        "no text column": ([*ck, "--train_file", str(tmp / "nocols.csv")], "no text column found"),
        "empty data": ([*ck, "--train_file", str(tmp / "empty.csv")], "no examples"),
        "plot not a png": ([*ck, "--train_file", str(train), "--plot", str(tmp / "cm.pdf")], "writes a PNG"),
        "bad fraction": ([*ck, "--validation_fraction", "1.5"], "--validation_fraction must be in (0, 1)"),
        "unknown label in a file alone": ([*ck, "--validation_file", str(tmp / "unknown.csv")],
                                          "the data has labels the checkpoint does not know: delta"),
        "dataset and a file": ([*ck, "--dataset", "x", "--data", str(train)],
                               "give either --dataset or --validation_file"),
        "data and validation file differ": ([*ck, "--data", str(train), "--validation_file", str(tmp / "u.csv")],
                                            "--data is another name for --validation_file"),
        "output under a file": ([*ck, "--data", str(train), "--output", str(tmp / "a_file" / "eval.json")],
                                "a_file is a file, not a directory"),
        "plot under a file": ([*ck, "--data", str(train), "--plot", str(tmp / "a_file" / "cm.png")],
                              "a_file is a file, not a directory"),
        "zero num_samples": ([*ck, "--num_samples", "0"], "--num_samples must be positive"),
        "negative split seed": ([*ck, "--train_file", str(train), "--split_seed", "-1"],
                                "--split_seed must be an integer from 0 to 4294967295, got -1"),
        "no checkpoint flag": (["--train_file", str(train)], "required: --checkpoint"),
    }


CASES = ["missing checkpoint", "not a checkpoint", "base model, no classifier", "unknown label in validation file",
         "labels the checkpoint does not know", "missing data file", "no text column", "empty data",
         "plot not a png", "bad fraction", "unknown label in a file alone", "dataset and a file",
         "data and validation file differ", "output under a file", "plot under a file", "zero num_samples",
         "negative split seed", "no checkpoint flag"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line_and_exit_code_2(tmp_path, trained, tiny_model_dir, capsys, case):
    args, expected = _bad_inputs(tmp_path, trained, tiny_model_dir)[case]
    assert evaluate.main(args) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert expected in lines[0]


def test_bad_input_through_the_script_has_no_traceback(tmp_path, tiny_model_dir):
    write_rows(tmp_path / "train.csv", synthetic_rows(40, labels=LABELS))
    proc = run_script("evaluate.py", "--checkpoint", tiny_model_dir, "--train_file", tmp_path / "train.csv")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: the data has labels the checkpoint does not know")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_test_file_scores_best_once_when_the_run_ends(tiny_model_dir, tmp_path, run_main):
    """--test_file / fit(test_data=...): best/ scored once, apart from model selection, as transformers computes it."""
    import pandas as pd

    from encoderfit import fit

    train = write_rows(tmp_path / "train.csv", synthetic_rows(150, seed=3, labels=LABELS))
    texts, labels = noisy_validation(tmp_path / "test.csv", n=45)
    common = dict(model=str(tiny_model_dir), epochs=2, batch_size=16, learning_rate=2e-3, max_length=32,
                  device="cpu", no_progress=True, checkpoint_dir=tmp_path / "ck")
    result = fit(train, run_name="file", test_file=str(tmp_path / "test.csv"), **common)
    summary = result.summary
    want = direct_metrics(labels, direct_predictions(result.best_checkpoint, texts, max_length=32), list(LABELS))
    assert result.test_metrics == summary["test_metrics"]
    assert set(summary["test_metrics"]) == {"accuracy", "macro_f1", "loss"}
    assert summary["test_metrics"]["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)
    assert summary["test_metrics"]["macro_f1"] == pytest.approx(want["macro_f1"], abs=1e-12)
    assert summary["test"] == {"data": str(tmp_path / "test.csv"), "examples": 45, "checkpoint": "best",
                               "epoch": summary["best_epoch"]}
    # selection stays on the validation split: no epoch record holds a test number
    rows = [json.loads(x) for x in (tmp_path / "ck" / "file" / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("test") for r in rows for k in r)
    # the same rows in memory: the same numbers
    frame = pd.read_csv(tmp_path / "test.csv")
    again = fit(train, run_name="frame", test_data=frame, **common)
    assert again.test_metrics == pytest.approx(result.test_metrics, abs=1e-12)
    assert again.summary["test"]["data"] == "the test data given to fit()"


def test_a_bad_test_file_is_refused_before_training(tiny_model_dir, tmp_path, run_main):
    train = write_rows(tmp_path / "train.csv", synthetic_rows(60, seed=3, labels=LABELS))
    write_rows(tmp_path / "odd.csv", [dict(r, label="delta") for r in synthetic_rows(10, seed=4, labels=LABELS)])
    for test, message in ((tmp_path / "missing.csv", f"error: --test_file {tmp_path / 'missing.csv'}: no such file"),
                          (tmp_path / "odd.csv", "error: the data has labels the checkpoint does not know: delta")):
        proc = run_main("train_single.py", "--model", tiny_model_dir, "--train_file", train, "--test_file", test,
                        "--max_length", 32, "--checkpoint_dir", tmp_path / "ck", "--epochs", 1)
        assert proc.returncode == 2 and proc.stderr.startswith(message), proc.stderr
        assert "epoch 1/1" not in proc.stdout
        assert sorted(p.name for p in (tmp_path / "ck").iterdir()) in ([], ["cache"])  # no run directory left


def test_a_link_to_a_checkpoint_is_read_as_its_run(trained, tmp_path):
    """A sweep's best/ is a link into its trial: evaluate follows the trial's run through it."""
    link = tmp_path / "best"
    link.symlink_to(trained / "final", target_is_directory=True)
    assert inference.run_directory(link) == trained.resolve()
    assert inference.trained_max_length(link) == 32
    report, _ = evaluate.evaluate_checkpoint(_args(link))
    assert report["data"]["same_split_as_training"] is True and report["examples"] == 30
    args = _args(link)
    args.validation_split = "test"
    with pytest.raises(inference.UserError, match="--validation_split names a split of --dataset"):
        evaluate.evaluate_checkpoint(args)


def test_a_finished_run_resumed_with_a_test_file_scores_its_best_on_it(trained, tmp_path, run_main):
    import shutil

    base = tmp_path / "ck"
    shutil.copytree(trained, base / "r")
    config = json.loads((base / "r" / "config.json").read_text())["config"]
    texts, labels = noisy_validation(tmp_path / "test.csv", n=30)
    proc = run_main("train_single.py", "--model", config["model"], "--train_file", config["train_file"],
                    "--epochs", 4, "--batch_size", 16, "--learning_rate", 2e-3, "--max_length", 32, "--log_every", 5,
                    "--checkpoint_dir", base, "--run_name", "r", "--resume", "auto", "--test_file", tmp_path / "test.csv")
    assert proc.returncode == 0, proc.stderr
    assert "has finished: nothing left to train" in proc.stdout and "test (best/, epoch" in proc.stdout
    summary = json.loads((base / "r" / "summary.json").read_text())
    want = direct_metrics(labels, direct_predictions(base / "r" / "best", texts, max_length=32), list(LABELS))
    assert summary["test_metrics"]["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)
