"""The Python API (fit, Classifier, evaluate): the same engine, numbers and errors as the command line."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import ROOT, made_once, make_tiny_bert, run_script, synthetic_rows, write_rows, tail
from test_tasks import pair_rows, score_rows, topic_rows
from encoderfit import Classifier, Prediction, RunResult, TrainConfig, UserError, evaluate, fit

COMMON = dict(epochs=2, batch_size=16, learning_rate=2e-3, max_length=32, device="cpu", no_progress=True,
              log_every=5)


def _flags(settings: dict) -> list:
    out = []
    for name, value in settings.items():
        out += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return out


@pytest.fixture(scope="module")
def frame_and_run(tiny_model_dir, tmp_path_factory):
    """The same examples trained twice: from a DataFrame through fit(), and from a CSV through the command."""
    rows = synthetic_rows(240, seed=5)

    def make(base: Path) -> None:
        write_rows(base / "train.csv", rows)
        proc = run_script("train_single.py", "--model", tiny_model_dir, "--train_file", base / "train.csv",
                          *_flags(COMMON), "--checkpoint_dir", base / "ck", "--run_name", "cli")
        assert proc.returncode == 0, proc.stderr

    base = made_once(tmp_path_factory, "api-cli-run", make)
    return pd.DataFrame(rows), base


def test_fit_on_a_dataframe_is_the_command_line_run_on_the_same_rows(frame_and_run, tiny_model_dir, tmp_path):
    frame, base = frame_and_run
    result = fit(frame, model=str(tiny_model_dir), checkpoint_dir=tmp_path, run_name="api", **COMMON)
    assert isinstance(result, RunResult) and result.completed and result.exit_code == 0
    cli = json.loads((base / "ck" / "cli" / "summary.json").read_text())
    ours = json.loads((tmp_path / "api" / "summary.json").read_text())
    assert ours == result.summary
    # the same examples, split and order: every metric of every epoch equal, bit for bit on the CPU
    for key in [k for k in cli if k.startswith(("best_val_", "final_val_"))] + ["best_epoch", "epochs_run"]:
        assert ours[key] == cli[key], key
    assert result.best_metrics == {m: cli[f"best_val_{m}"] for m in ("accuracy", "macro_f1", "loss")}
    assert result.final_metrics["accuracy"] == cli["final_val_accuracy"]
    assert result.best_checkpoint == tmp_path / "api" / "best" and result.best_checkpoint.is_dir()
    assert result.final_checkpoint == tmp_path / "api" / "final" and result.final_checkpoint.is_dir()
    assert [e["epoch"] for e in result.epochs] == [1, 2]
    assert [e["val_accuracy"] for e in result.epochs] == [e["val_accuracy"] for e in RunResult.read(base / "ck" / "cli").epochs]
    assert set(result.time_breakdown) >= {"start-up", "data", "model", "training", "total"}
    data = json.loads((tmp_path / "api" / "data.json").read_text())
    assert data["source"] == "the training data given to fit()"
    assert RunResult.read(tmp_path / "api").summary == result.summary


def test_fit_on_a_dataset_with_its_own_validation_and_on_a_path(tiny_model_dir, tmp_path):
    import datasets

    rows = synthetic_rows(200, seed=8)
    train, val = datasets.Dataset.from_list(rows[:160]), pd.DataFrame(rows[160:])
    result = fit(train, val, model=str(tiny_model_dir), checkpoint_dir=tmp_path, run_name="ds", **COMMON)
    info = json.loads((tmp_path / "ds" / "data.json").read_text())
    assert (info["train_examples"], info["validation_examples"]) == (160, 40)
    assert info["validation"] == "the validation data given to fit()"
    assert result.epochs[-1]["val_examples"] == 40
    # a path is a --train_file
    path = write_rows(tmp_path / "train.jsonl", rows)
    by_path = fit(path, model=tiny_model_dir, checkpoint_dir=tmp_path, run_name="path", **COMMON)
    assert json.loads((tmp_path / "path" / "data.json").read_text())["source"] == str(path)
    assert json.loads((tmp_path / "path" / "config.json").read_text())["config"]["train_file"] == str(path)
    assert by_path.completed


def test_in_memory_data_is_cached_by_its_contents(tiny_model_dir, tmp_path):
    rows = synthetic_rows(120, seed=2)
    settings = dict(model=str(tiny_model_dir), checkpoint_dir=tmp_path, cache_dir=tmp_path / "cache", **COMMON)
    fit(pd.DataFrame(rows), run_name="a", **{**settings, "epochs": 1})
    import datasets

    fit(datasets.Dataset.from_list(rows), run_name="b", **{**settings, "epochs": 1})
    assert len(list((tmp_path / "cache").glob("data-*"))) == 1  # the same rows, another container: the same cache
    changed = [dict(r) for r in rows]
    changed[0]["text"] += " again"
    fit(pd.DataFrame(changed), run_name="c", **{**settings, "epochs": 1})
    assert len(list((tmp_path / "cache").glob("data-*"))) == 2  # one text changed: another cache


@pytest.mark.parametrize("settings, flags", [
    (dict(epochs=0), ["--epochs", "0"]),
    (dict(learning_rate=-1.0), ["--learning_rate", "-1"]),
    (dict(warmup_ratio=1.5), ["--warmup_ratio", "1.5"]),
    (dict(label_separator="|", task="regression"), ["--label_separator", "|", "--task", "regression"]),
    (dict(run_name="a/b"), ["--run_name", "a/b"]),
])
def test_bad_settings_raise_the_message_the_command_prints(settings, flags, run_main):
    proc = run_main("train_single.py", *flags)
    assert proc.returncode == 2
    with pytest.raises(UserError) as caught:
        fit(pd.DataFrame(synthetic_rows(20)), **settings)
    assert proc.stderr == f"error: {caught.value}\n"


def test_settings_of_the_wrong_kind_are_refused_before_anything_runs():
    for settings, expected in [(dict(epochs="3"), "--epochs must be an integer, got '3'"),
                               (dict(epoch=3), "unknown setting(s) epoch"),
                               (dict(precision="fp64"), "--precision must be one of auto, bf16, fp16, fp32"),
                               (dict(no_progress="yes"), "--no_progress must be True or False")]:
        with pytest.raises(UserError, match=re.escape(expected)):
            fit(pd.DataFrame(synthetic_rows(20)), **settings)
    with pytest.raises(UserError, match="a file path, a pandas DataFrame or a datasets.Dataset"):
        fit([{"text": "a", "label": "b"}])
    with pytest.raises(UserError, match="give the training data once"):
        fit(pd.DataFrame(synthetic_rows(20)), train_file="x.csv")
    config = TrainConfig.from_settings(learning_rate=5e-5, epochs=4)
    assert (config.learning_rate, config.epochs) == (5e-5, 4) and config.replace(epochs=1).learning_rate == 5e-5


def _reference_probs(checkpoint: Path, texts, pairs=None, *, sigmoid=False, raw=False):
    """transformers' own model and tokenizer, straight: the independent reference for the predictor."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    enc = tok(texts, pairs, truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits.float()
    return logits if raw else (logits.sigmoid() if sigmoid else logits.softmax(-1)), model.config


def test_classifier_predicts_what_the_model_computes_for_each_task_shape(frame_and_run, tiny_model_dir, tmp_path):
    texts = ["the movie was great and superb", "awful boring plot", "the actors and the music"]
    # single-label
    clf = Classifier.load(frame_and_run[1] / "ck" / "cli" / "final", device="cpu")
    got = clf.predict(texts)
    probs, config = _reference_probs(clf.path, texts)
    assert clf.task == "single_label" and clf.label_names == ["negative", "positive"] and clf.max_length == 32
    for p, row in zip(got, probs.tolist()):
        assert isinstance(p, Prediction) and p.label == clf.label_names[max(range(2), key=row.__getitem__)]
        assert p.score == pytest.approx(max(row), abs=1e-6)
        assert p.scores == pytest.approx(dict(zip(clf.label_names, row)), abs=1e-6)
    # pairs
    prs = pair_rows(200, seed=4)
    pairs = fit(pd.DataFrame(prs), model=str(tiny_model_dir), checkpoint_dir=tmp_path, run_name="pairs", **COMMON)
    pclf = Classifier.load(pairs.final_checkpoint, device="cpu")
    a, b = [r["sentence1"] for r in prs[:4]], [r["sentence2"] for r in prs[:4]]
    probs, _ = _reference_probs(pclf.path, a, b)
    assert [p.scores for p in pclf.predict(a, pairs=b)] == [pytest.approx(dict(zip(pclf.label_names, r)), abs=1e-6)
                                                           for r in probs.tolist()]
    with pytest.raises(UserError, match="pairs of texts"):
        pclf.predict(a)
    # regression
    scores = fit(pd.DataFrame(score_rows(200, seed=6)), model=str(tiny_model_dir), checkpoint_dir=tmp_path,
                 run_name="scores", **COMMON)
    rclf = Classifier.load(scores.final_checkpoint, device="cpu")
    logits, _ = _reference_probs(rclf.path, texts, raw=True)
    assert rclf.task == "regression"
    assert [p.score for p in rclf.predict(texts)] == pytest.approx(logits.squeeze(-1).tolist(), abs=1e-5)
    assert all(p.label == p.score for p in rclf.predict(texts))
    # multi-label: the labels whose sigmoid reaches the recorded threshold
    multi = fit(pd.DataFrame(topic_rows(200, seed=7)), model=str(tiny_model_dir), checkpoint_dir=tmp_path,
                run_name="topics", **COMMON)
    mclf = Classifier.load(multi.final_checkpoint, device="cpu")
    probs, config = _reference_probs(mclf.path, texts, sigmoid=True)
    assert mclf.task == "multi_label"
    for p, row in zip(mclf.predict(texts), probs.tolist()):
        chosen = [n for n, v in zip(mclf.label_names, row) if v >= config.multi_label_threshold]
        assert p.label == chosen and p.score == pytest.approx([v for v in row if v >= config.multi_label_threshold])
        assert p.scores == pytest.approx(dict(zip(mclf.label_names, row)), abs=1e-6)


def test_evaluate_returns_the_report_the_command_writes(frame_and_run, tmp_path, run_main):
    frame, base = frame_and_run
    ckpt = base / "ck" / "cli" / "best"
    test = write_rows(tmp_path / "test.csv", synthetic_rows(60, seed=11))
    report = evaluate(ckpt, test, device="cpu")
    proc = run_main("evaluate.py", "--checkpoint", ckpt, "--data", test, "--output", tmp_path / "e.json")
    assert proc.returncode == 0, proc.stderr
    assert report == json.loads((tmp_path / "e.json").read_text())
    assert report["examples"] == 60 and 0 <= report["accuracy"] <= 1
    # with the run's data flags: its own validation split, the metrics training reported for that epoch
    split = evaluate(ckpt, train_file=base / "train.csv", device="cpu")
    summary = json.loads((base / "ck" / "cli" / "summary.json").read_text())
    assert split["data"]["same_split_as_training"] is True
    assert split["accuracy"] == summary["best_val_accuracy"]
    # the same rows in memory: the same numbers, the data named as given
    in_memory = evaluate(ckpt, pd.read_csv(test), device="cpu")
    assert {k: v for k, v in in_memory.items() if k != "data"} == {k: v for k, v in report.items() if k != "data"}
    assert in_memory["data"]["source"] == "the data given to evaluate()"
    with pytest.raises(UserError, match="data in memory is evaluated whole"):
        evaluate(ckpt, pd.read_csv(test), train_file=test)
    with pytest.raises(UserError, match="unknown setting"):
        evaluate(ckpt, test, batchsize=4)
    with pytest.raises(UserError, match="data file not found"):
        evaluate(ckpt, tmp_path / "missing.csv")


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch):
    """The README's first Python block under "Python API", executed as it stands (the bundled default model,
    on the CPU as on any machine without a GPU); its numbers checked against the files it wrote."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the documented example itself
    result = namespace["result"]
    summary = json.loads((tmp_path / "checkpoints" / "api-demo" / "summary.json").read_text())
    assert result.best_metrics == {m: summary[f"best_val_{m}"] for m in summary["metrics"]}
    assert result.best_checkpoint == Path("checkpoints/api-demo/best")
    predictions = namespace["clf"].predict(["what a wonderful film", "a waste of time"])
    assert [p.label for p in predictions] and all(p.label in ("pos", "neg") for p in predictions)
    assert all(abs(sum(p.scores.values()) - 1) < 1e-5 for p in predictions)


FIT_UNDER_TORCHRUN = '''
import json, os, sys
import pandas as pd
from encoderfit import fit
rows = json.loads(open(sys.argv[1]).read())
result = fit(pd.DataFrame(rows), model=sys.argv[2], checkpoint_dir=sys.argv[3], run_name="ddp", epochs=2,
             batch_size=8, learning_rate=2e-3, max_length=32, device="cpu", no_progress=True)
again = fit(pd.DataFrame(rows[:60]), model=sys.argv[2], checkpoint_dir=sys.argv[3], run_name="again", epochs=1,
            batch_size=8, max_length=32, device="cpu", no_progress=True)  # a second process group, same process
with open(os.path.join(sys.argv[3], "..", f"result-{os.environ['RANK']}.json"), "w") as fh:  # each rank its own
    json.dump({"completed": result.completed, "best": result.best_metrics, "epochs": len(result.epochs),
               "again": again.best_metrics, "summary": result.summary}, fh)
'''


def test_every_rank_runs_fit_under_torchrun_and_gets_the_same_result(tiny_model_dir, tmp_path):
    """Under torchrun, fit() is what each rank calls: one DDP run (rank 0 writes), one result on every rank."""
    import subprocess
    import sys

    from conftest import cli_env

    (tmp_path / "rows.json").write_text(json.dumps(synthetic_rows(120, seed=9)))
    (tmp_path / "script.py").write_text(FIT_UNDER_TORCHRUN)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           tmp_path / "script.py", tmp_path / "rows.json", tiny_model_dir, tmp_path / "ck"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=cli_env(PYTHONPATH=str(ROOT / "src")))
    assert proc.returncode == 0, tail(proc.stderr)
    results = {rank: json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in ("0", "1")}
    assert set(results) == {"0", "1"} and results["0"] == results["1"]
    assert results["0"]["completed"] and results["0"]["epochs"] == 2
    written = json.loads((tmp_path / "ck" / "ddp" / "config.json").read_text())
    assert written["world_size"] == 2  # one run of two processes, not two runs
    summary = json.loads((tmp_path / "ck" / "ddp" / "summary.json").read_text())
    assert results["0"]["best"] == {m: summary[f"best_val_{m}"] for m in summary["metrics"]}
    assert results["1"]["summary"] == summary  # rank 0's summary on every rank, written before fit() returned
    assert json.loads((tmp_path / "ck" / "again" / "config.json").read_text())["world_size"] == 2


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory) -> Path:
    """The tiny BERT with dropout on (0.3 in the hidden layers and the attention): where train and eval modes differ."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-dropout"), dropout=0.3, seed=1)


def test_with_dropout_evaluation_and_prediction_are_deterministic_and_match_training(dropout_model_dir, tmp_path):
    """Evaluation and prediction run the model in eval mode: repeated calls give the same numbers, and the run's
    own validation split scores what training reported for the epoch best/ holds (dropout left on would give
    other numbers on every call)."""
    train = write_rows(tmp_path / "train.csv", synthetic_rows(200, seed=13))
    result = fit(train, model=str(dropout_model_dir), checkpoint_dir=tmp_path, run_name="dropout", **COMMON)
    first = evaluate(result.best_checkpoint, train_file=train, device="cpu")
    second = evaluate(result.best_checkpoint, train_file=train, device="cpu")
    assert first == second
    assert first["data"]["same_split_as_training"] is True
    assert first["accuracy"] == result.best_metrics["accuracy"]
    assert first["loss"] == pytest.approx(result.best_metrics["loss"], rel=1e-5)
    clf = Classifier.load(result.best_checkpoint, device="cpu")
    texts = [r["text"] for r in synthetic_rows(20, seed=14)]
    assert [p.scores for p in clf.predict(texts)] == [p.scores for p in clf.predict(texts)]
