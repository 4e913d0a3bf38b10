"""Task shapes beyond one text and one label: text pairs, regression, class weights.

Through the real CLI with the tiny model on synthetic data whose signal is known; metrics are checked
against independent computations (scipy, torch's own losses, transformers' pipeline)."""
import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FILLER, NEGATIVE, POSITIVE, made_once, run_script, synthetic_rows, write_rows
from test_resume import hooks  # noqa: F401 (a fixture: the STOP_AT_STEP hook)
from encoderfit import data
from encoderfit import tasks
from encoderfit.utils import UserError


def _sentence(rng, positive: bool) -> str:
    words = rng.choices(FILLER, k=rng.randint(3, 7))
    words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if positive else NEGATIVE))
    return " ".join(words)


def pair_rows(n: int, seed: int) -> list:
    """Label 'both' when both texts are positive, else 'not': either text alone caps accuracy at 75%."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.random() < 0.5, rng.random() < 0.5
        rows.append({"sentence1": _sentence(rng, a), "sentence2": _sentence(rng, b), "label": "both" if a and b else "not"})
    return rows


def score_rows(n: int, seed: int, pair: bool = False) -> list:
    """A score of 1.25 per positive word (0 to 5, with fractions: a regression by auto-detection)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(0, 4)
        words = [rng.choice(POSITIVE) for _ in range(k)] + [rng.choice(NEGATIVE) for _ in range(4 - k)]
        words += rng.choices(FILLER, k=3)
        rng.shuffle(words)
        if pair:
            rows.append({"sentence1": " ".join(words[:4]), "sentence2": " ".join(words[4:]), "score": k * 1.25})
        else:
            rows.append({"text": " ".join(words), "score": k * 1.25})
    return rows


def write_csv(path: Path, rows: list) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _train_args(tiny_model_dir, ck: Path, train: Path, *extra, epochs=3, name="r") -> list:
    return ["--model", tiny_model_dir, "--train_file", train, "--epochs", epochs, "--batch_size", 16,
            "--learning_rate", 3e-3, "--max_length", 48, "--no_progress", "--checkpoint_dir", ck,
            "--run_name", name, *extra]


def _train(tiny_model_dir, base: Path, train: Path, *extra, epochs=3, name="r"):
    proc = run_script("train_single.py", *_train_args(tiny_model_dir, base / "ck", train, *extra, epochs=epochs,
                                                      name=name))
    assert proc.returncode == 0, proc.stderr
    return base / "ck" / name, proc.stdout


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _once(tmp_path_factory, name: str, make) -> tuple:
    """(the run, what it printed, the base directory): ``make(base)`` trains one run per test session,
    shared by the workers of ``pytest -n`` (the tests read it; a resume test adds its runs beside it).
    Every worker's tiny model is the same seeded one, so whichever worker trains, the run is the same."""
    def made(base: Path) -> None:
        (base / "out.txt").write_text(make(base))

    base = made_once(tmp_path_factory, name, made)
    return base / "ck" / "r", (base / "out.txt").read_text(), base


@pytest.fixture(scope="module")
def pair_run(tiny_model_dir, tmp_path_factory):
    run, out, base = _once(tmp_path_factory, "pair-run", lambda base: _train(
        tiny_model_dir, base, write_csv(base / "pairs.csv", pair_rows(600, seed=1)))[1])
    return run, out, base / "pairs.csv"


@pytest.fixture(scope="module")
def score_run(tiny_model_dir, tmp_path_factory):
    run, out, base = _once(tmp_path_factory, "score-run", lambda base: _train(
        tiny_model_dir, base, write_csv(base / "scores.csv", score_rows(600, seed=2)))[1])
    return run, out, base / "scores.csv"


# ---------------------------------------------------------------- text pairs

def test_a_pair_task_learns_what_needs_both_texts(pair_run):
    run, out, _ = pair_run
    assert "text pairs sentence1 + sentence2" in out
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["text_columns"] == ["sentence1", "sentence2"]
    assert config["long_texts"]["mode"] == "truncate"  # --long_texts auto on pairs: cut longest first, as before
    # one text alone cannot pass 0.75: the model reads both
    assert _summary(run)["best_val_accuracy"] >= 0.95, out


def test_pair_checkpoint_in_predict_evaluate_and_pipeline_agree(pair_run, tmp_path, run_main):
    from transformers import pipeline

    run, _, train = pair_run
    pairs = [("the movie good great", "the plot excellent"), ("the movie good", "the plot awful dreadful"),
             ("bad film", "wonderful music")]
    args = [x for p in pairs for x in p]
    proc = run_main("predict.py", "--checkpoint", run, "--pairs", *args, "--output", tmp_path / "p.jsonl")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(r["text"], r["text_pair"]) for r in records] == pairs
    assert [r["label"] for r in records] == ["both", "not", "not"]
    # transformers' pipeline with {"text", "text_pair"} gives the same probabilities
    clf = pipeline("text-classification", model=str(run / "final"), device="cpu", top_k=None)
    for (a, b), record in zip(pairs, records):
        scores = {d["label"]: d["score"] for d in clf({"text": a, "text_pair": b})}
        for label, p in record["probabilities"].items():
            assert abs(scores[label] - p) < 1e-5
    # evaluate on training's split: the accuracy training reported for the same examples
    proc = run_main("evaluate.py", "--checkpoint", run, "--train_file", train, "--output", tmp_path / "e.json")
    assert proc.returncode == 0, proc.stderr
    assert "the same examples the checkpoint's training run validated on" in proc.stdout
    assert abs(json.loads((tmp_path / "e.json").read_text())["accuracy"] - _summary(run)["final_val_accuracy"]) < 1e-9
    # a table with the two columns: predicted and scored
    proc = run_main("predict.py", "--checkpoint", run, "--input", train)
    assert proc.returncode == 0, proc.stderr
    assert " ||| " in proc.stdout and "accuracy " in proc.stdout


def test_pair_input_mistakes_are_one_line_errors(pair_run, score_run, run_main):
    pair_ckpt, score_ckpt = pair_run[0], score_run[0]
    cases = [
        (pair_ckpt, ["one text only"], "classifies pairs of texts (sentence1 + sentence2)"),
        (pair_ckpt, ["--pairs", "a", "b", "c"], "an odd number"),
        (score_ckpt, ["--pairs", "a", "b"], "trained on single texts, not pairs"),
    ]
    for ckpt, args, expected in cases:
        proc = run_main("predict.py", "--checkpoint", ckpt, *args)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert expected in lines[0], lines[0]


def test_pair_columns_are_found_named_or_turned_off(tmp_path):
    rows = pair_rows(40, seed=3)
    path = write_csv(tmp_path / "p.csv", [{"question": r["sentence1"], "sentence": r["sentence2"], "label": r["label"]}
                                          for r in rows])

    def load(**kw):
        source = data.DataSource.from_settings(train_file=str(path), text_column=kw.pop("text_column", None),
                                               text_pair_column=kw.pop("text_pair_column", None))
        return data.load_labelled_splits(source, validation_fraction=0.25, split_seed=1, num_samples=None)

    found = load()
    assert found.info["text_columns"] == ["question", "sentence"]
    by_key = {r["question"] + "\x1f" + r["sentence"] for r in
              [{"question": r["sentence1"], "sentence": r["sentence2"]} for r in rows]}
    assert set(data.example_keys(found.train)) | set(data.example_keys(found.validation)) == by_key
    assert load(text_pair_column="none").info["text_columns"] == ["sentence"]  # one text: the 'sentence' column
    assert load(text_column="sentence", text_pair_column="question").info["text_columns"] == ["sentence", "question"]
    with pytest.raises(UserError, match="text pair column 'other' not found"):
        load(text_pair_column="other")
    with pytest.raises(UserError, match="the text column and the text pair column are both 'question'"):
        load(text_column="question", text_pair_column="question")


def test_a_pair_with_a_blank_second_text_is_dropped_and_counted(tmp_path):
    rows = pair_rows(40, seed=4)
    rows[5]["sentence2"] = "  "
    path = write_csv(tmp_path / "p.csv", rows)
    source = data.DataSource.from_settings(train_file=str(path))
    splits = data.load_labelled_splits(source, validation_fraction=0.25, split_seed=1, num_samples=None)
    assert len(splits.train) + len(splits.validation) == 39
    assert any("dropped 1 row(s)" in n and "either text" in n for n in splits.info["notes"])


# ---------------------------------------------------------------- regression

def test_regression_learns_a_score_and_reports_correct_metrics(score_run, tmp_path, run_main):
    from scipy import stats
    from transformers import pipeline

    run, out, train = score_run
    assert "task regression of 'score'" in out and "new head for 1 output" in out
    summary = _summary(run)
    assert summary["task"] == "regression" and summary["metric_for_best"] == "mse"  # the default: never undefined
    assert summary["best_val_pearson"] >= 0.95, out
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["problem_type"] == "regression" and config["id2label"] == {"0": "score"}

    # evaluate.py on training's split: the metrics training reported, and scipy's on predict's scores
    proc = run_main("evaluate.py", "--checkpoint", run, "--train_file", train, "--output", tmp_path / "e.json")
    assert proc.returncode == 0, proc.stderr
    ev = json.loads((tmp_path / "e.json").read_text())
    for key in ("pearson", "spearman", "mse", "mae"):
        assert abs(ev[key] - summary[f"final_val_{key}"]) < 1e-6, key
    rows = list(csv.DictReader(open(train, encoding="utf-8")))
    proc = run_main("predict.py", "--checkpoint", run, "--input", train, "--output", tmp_path / "p.jsonl")
    assert proc.returncode == 0, proc.stderr
    preds = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    y = [float(r["score"]) for r in rows]
    p = [r["score"] for r in preds]
    assert [r["true_score"] for r in preds] == y
    assert f"pearson {stats.pearsonr(p, y)[0]:.4f}" in proc.stdout
    mse = sum((a - b) ** 2 for a, b in zip(p, y)) / len(y)
    assert f"mse {mse:.4f}" in proc.stdout
    # the pipeline returns the raw score (problem_type regression: no softmax)
    scored = pipeline("text-classification", model=str(run / "final"), device="cpu")(rows[0]["text"])[0]
    assert scored["label"] == "score" and abs(scored["score"] - p[0]) < 1e-4


def test_regression_metrics_from_sums_match_scipy():
    from scipy import stats

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 6, (257,), generator=g).float() * 0.5   # ties, as real ratings have
    p = y + torch.randn(257, generator=g)
    task = tasks.Regression(["score"])
    sums = task.new_sums(torch.device("cpu"))
    for chunk in range(0, 257, 64):  # batches add up: the same as one pass
        logits, labels = p[chunk:chunk + 64, None], y[chunk:chunk + 64]
        task.add_sums(sums, task.loss_sum(logits, labels), logits, labels)
    m = task.metrics(sums, torch.stack([p, y], dim=1))
    assert abs(m["pearson"] - stats.pearsonr(p.double().numpy(), y.double().numpy())[0]) < 1e-9
    assert abs(m["spearman"] - stats.spearmanr(p.double().numpy(), y.double().numpy())[0]) < 1e-9
    assert abs(m["mse"] - float(((p - y) ** 2).double().mean())) < 1e-6
    assert abs(m["mae"] - float((p - y).abs().double().mean())) < 1e-6
    assert m["count"] == 257


def test_score_labels_choose_the_task_and_refuse_what_does_not_fit(tmp_path):
    rows = score_rows(40, seed=5)
    path = write_csv(tmp_path / "s.csv", rows)

    def load(task="auto", file=path):
        source = data.DataSource.from_settings(train_file=str(file))
        return data.load_labelled_splits(source, validation_fraction=0.25, split_seed=1, num_samples=None, task=task)

    got = load()
    assert got.info["task"] == "regression" and got.label_names == ["score"]
    assert sorted(list(got.train["labels"]) + list(got.validation["labels"])) == sorted(r["score"] for r in rows)
    assert got.info["validation"].startswith("random 25%")
    with pytest.raises(UserError, match=r"numbers with a fraction \(found: .*\), and --task single_label"):
        load("single_label")
    words = write_rows(tmp_path / "w.csv", synthetic_rows(40))
    with pytest.raises(UserError, match="--task regression needs numbers as labels"):
        load("regression", words)
    ints = write_csv(tmp_path / "i.csv", [{"text": r["text"], "score": int(r["score"])} for r in rows])
    assert load(file=ints).info["task"] == "single_label"    # integer ratings: classes unless asked
    assert load("regression", ints).info["task"] == "regression"


# ---------------------------------------------------------------- class weights

def test_class_weights_are_torch_weighted_cross_entropy():
    from encoderfit.data.batches import Batch

    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(12, 3, generator=g), torch.randint(0, 3, (12,), generator=g)
    task = tasks.SingleLabelClassification(["a", "b", "c"], [0.5, 2.0, 4.0])
    batch = Batch({}, labels, 12, 0)
    expected = torch.nn.functional.cross_entropy(logits, labels, weight=torch.tensor([0.5, 2.0, 4.0]))
    assert torch.allclose(task.loss_sum(logits, labels) / task.normalizer(batch), expected, rtol=1e-6)
    sums = task.new_sums(torch.device("cpu"))
    task.add_sums(sums, task.loss_sum(logits, labels), logits, labels)
    assert abs(task.metrics(sums)["loss"] - float(expected)) < 1e-6


def test_class_weight_flags_resolve_to_one_weight_per_label():
    names, counts = ["neg", "pos"], [90, 10]
    assert tasks.resolve_class_weights("balanced", names, counts) == [100 / 180, 100 / 20]
    assert tasks.resolve_class_weights("1,3", names, counts) == [1.0, 3.0]
    assert tasks.resolve_class_weights("pos=4", names, counts) == [1.0, 4.0]
    for spec, message in (("1,2,3", "3 weight\\(s\\) for 2 labels"), ("maybe=2", "label 'maybe'"),
                          ("1,-1", "positive finite"), ("heavy", "must be 'balanced'")):
        with pytest.raises(UserError, match=message):
            tasks.resolve_class_weights(spec, names, counts)


def test_balanced_class_weights_train_on_the_weighted_loss(tiny_model_dir, tmp_path, run_main):
    """The val loss a weighted run reports is the weighted mean cross-entropy of its own predictions."""
    rows = synthetic_rows(200, seed=6)
    rows = [r for r in rows if r["label"] == "negative"] + [r for r in rows if r["label"] == "positive"][:20]
    train = write_rows(tmp_path / "t.csv", rows)
    run, out = _train(tiny_model_dir, tmp_path, train, "--class_weights", "balanced", epochs=2)
    counts = json.loads((run / "data.json").read_text())["train_label_counts"]
    n = sum(counts)
    weights = [n / (2 * c) for c in counts]
    assert f"class weights: negative {weights[0]:.4g}, positive {weights[1]:.4g}" in out
    proc = run_main("predict.py", "--checkpoint", run, "--input", train, "--output", tmp_path / "p.jsonl")
    assert proc.returncode == 0, proc.stderr
    # the held-out rows are the validation split: data.json names them by their hash; recompute on them
    splits = data.load_labelled_splits(data.DataSource.from_settings(train_file=str(train)),
                                       validation_fraction=0.1, split_seed=42, num_samples=None)
    held = set(splits.validation["text"])
    preds = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    import math
    num = den = 0.0
    for r in preds:
        if r["text"] in held:
            w = weights[["negative", "positive"].index(r["true_label"])]
            num += -w * math.log(r["probabilities"][r["true_label"]])
            den += w
    assert abs(num / den - _summary(run)["final_val_loss"]) < 1e-4
    # the weights are kept with the model: evaluate.py reports the weighted loss training reported
    assert json.loads((run / "final" / "config.json").read_text())["class_weights"] == weights
    proc = run_main("evaluate.py", "--checkpoint", run, "--train_file", train, "--output", tmp_path / "e.json")
    assert proc.returncode == 0, proc.stderr
    assert abs(json.loads((tmp_path / "e.json").read_text())["loss"] - _summary(run)["final_val_loss"]) < 1e-6
    proc = run_main("train_single.py", "--model", tiny_model_dir, "--train_file", tmp_path / "s.csv",
                      "--task", "regression", "--class_weights", "balanced")
    assert proc.returncode == 2 and "a regression (--task regression) has none" in proc.stderr


# ---------------------------------------------------------------- under torchrun

def _one_process_and_two(run_main, model: Path, tmp_path: Path, train: Path, val: Path, *extra, lr=1e-3) -> tuple:
    """The same run as 1 process at batch 8 (in this one) and as 2 gloo processes at batch 4: their run
    directories and the second's output."""
    from test_ddp import torchrun

    common = ["--model", model, "--train_file", train, "--validation_file", val, "--epochs", 2,
              "--learning_rate", lr, "--max_length", 32, "--log_every", 1, "--precision", "fp32",
              "--device", "cpu", "--no_progress", "--cache_dir", tmp_path / "cache", *extra]
    one = run_main("train_single.py", *common, "--batch_size", 8, "--checkpoint_dir", tmp_path / "one",
                   "--run_name", "r")
    assert one.returncode == 0, one.stderr
    two = torchrun(2, *common, "--batch_size", 4, "--checkpoint_dir", tmp_path / "two", "--run_name", "r")
    assert two.returncode == 0, two.stderr
    return tmp_path / "one" / "r", tmp_path / "two" / "r", two.stdout


def test_pair_regression_under_ddp_is_one_process_at_the_global_batch(tiny_model_dir, tmp_path, run_main):
    """2 gloo processes x batch 4 train as 1 x 8, and evaluate each example once (Spearman from the
    gathered predictions, Pearson from the reduced sums): an STS-B-shaped task, pairs and scores."""
    from test_ddp import assert_same_run, epoch_record

    train = write_csv(tmp_path / "train.csv", score_rows(96, seed=7, pair=True))
    val = write_csv(tmp_path / "val.csv", score_rows(41, seed=8, pair=True))  # odd: no example twice
    # a learning rate at which the scores spread: Pearson of near-constant predictions amplifies rounding
    a, b, out = _one_process_and_two(run_main, tiny_model_dir, tmp_path, train, val, lr=2e-3)
    assert "text pairs sentence1 + sentence2" in out and "task regression" in out
    # the same steps and weights; attention key biases aside: their gradient is zero in exact arithmetic
    # (softmax ignores a shift shared by all keys), so AdamW turns rounding noise into lr-sized steps there
    assert_same_run(a, b, skip=".attention.self.key.bias")
    ra, rb = epoch_record(a), epoch_record(b)
    assert ra["val_examples"] == rb["val_examples"] == 41 and abs(ra["val_pearson"]) > 0.3, ra
    # the weights agree to ~1e-6; an example counted twice or lost would move MSE and MAE by ~1e-2. A model
    # this early scores examples close together: Pearson's correlation magnifies the 1e-6 into ~1e-4, and
    # Spearman's swaps near-tied ranks (~1e-3); losing a rank's gathered predictions would move it by ~1e-1
    for key, tol in (("val_pearson", 5e-4), ("val_spearman", 1e-2), ("val_mse", 5e-5), ("val_mae", 5e-5)):
        assert abs(ra[key] - rb[key]) < tol, (key, ra[key], rb[key])


# ---------------------------------------------------------------- multi-label

TOPICS = {"sports": ["goal", "match", "team"], "music": ["song", "band", "guitar"], "food": ["pizza", "bread", "soup"]}


def topic_rows(n: int, seed: int) -> list:
    """Each topic present with probability 0.4, independently: overlapping labels, some rows with none."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        labels = [t for t in TOPICS if rng.random() < 0.4]
        words = rng.choices(FILLER, k=4) + [rng.choice(TOPICS[t]) for t in labels]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "labels": labels})
    return rows


def write_topic_files(d: Path, rows: list) -> dict:
    """The same labels in the three formats: a list column, one separated string, 0/1 columns."""
    (d / "lists.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_csv(d / "sep.csv", [{"text": r["text"], "tags": "|".join(r["labels"])} for r in rows])
    write_csv(d / "cols.csv", [{"text": r["text"], **{t: int(t in r["labels"]) for t in TOPICS}} for r in rows])
    return topic_files(d)


def topic_files(d: Path) -> dict:
    """What ``write_topic_files`` wrote in ``d``: each format's file and the flags that read it."""
    return {"lists": (d / "lists.jsonl", []), "separator": (d / "sep.csv", ["--label_separator", "|",
                                                                           "--label_column", "tags"]),
            "columns": (d / "cols.csv", ["--label_columns", "sports,music,food"])}


@pytest.fixture(scope="module")
def topic_run(tiny_model_dir, tmp_path_factory):
    def make(base: Path) -> str:
        files = write_topic_files(base, topic_rows(600, seed=9))
        return _train(tiny_model_dir, base, files["lists"][0], "--max_length", 24, "--warmup_ratio", 0, epochs=6)[1]

    run, out, base = _once(tmp_path_factory, "topic-run", make)
    return run, out, topic_files(base)


def test_the_three_label_formats_give_the_same_multi_label_data(tmp_path):
    rows = topic_rows(60, seed=10)
    files = write_topic_files(tmp_path, rows)
    got = {}
    for name, (path, flags) in files.items():
        opts = dict(zip([f[2:] for f in flags[::2]], flags[1::2]))
        source = data.DataSource.from_settings(train_file=str(path), label_column=opts.get("label_column"),
                                               label_separator=opts.get("label_separator"),
                                               label_columns=opts.get("label_columns"))
        splits = data.load_labelled_splits(source, validation_fraction=0.25, split_seed=1, num_samples=None)
        assert splits.info["task"] == "multi_label"
        got[name] = {t: [n for n, on in zip(splits.label_names, y) if on]
                     for t, y in zip(list(splits.train["text"]) + list(splits.validation["text"]),
                                     list(splits.train["labels"]) + list(splits.validation["labels"]))}
    truth = {r["text"]: r["labels"] for r in rows}
    for name in got:  # every row's labels, whatever the format (column order may name them differently)
        assert {t: sorted(v) for t, v in got[name].items()} == {t: sorted(v) for t, v in truth.items()}, name


def test_multi_label_learns_overlapping_labels_and_the_tools_agree(topic_run, tmp_path, run_main):
    from transformers import pipeline

    run, out, files = topic_run
    assert "(multi-label)" in out
    summary = _summary(run)
    assert summary["task"] == "multi_label" and summary["metric_for_best"] == "micro_f1"
    assert summary["best_val_micro_f1"] >= 0.8, out  # predicting no label scores 0
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification" and config["multi_label_threshold"] == 0.5
    # evaluate.py on training's split: the metrics training reported, and per-label counts that add up
    path, _ = files["lists"]
    proc = run_main("evaluate.py", "--checkpoint", run, "--train_file", path, "--output", tmp_path / "e.json")
    assert proc.returncode == 0, proc.stderr
    ev = json.loads((tmp_path / "e.json").read_text())
    for key in ("micro_f1", "macro_f1", "subset_accuracy", "loss"):
        assert abs(ev[key] - summary[f"final_val_{key}"]) < 1e-6, key
    # micro-F1 recomputed from predict.py's decisions on every row, counted here
    proc = run_main("predict.py", "--checkpoint", run, "--input", path, "--output", tmp_path / "p.jsonl")
    assert proc.returncode == 0, proc.stderr
    preds = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    truth = [json.loads(x)["labels"] for x in path.read_text().splitlines()]
    tp = sum(len(set(p["labels"]) & set(t)) for p, t in zip(preds, truth))
    fp = sum(len(set(p["labels"]) - set(t)) for p, t in zip(preds, truth))
    fn = sum(len(set(t) - set(p["labels"])) for p, t in zip(preds, truth))
    assert 2 * tp / (2 * tp + fp + fn) >= 0.8
    for p in preds:  # the decisions are the probabilities at the threshold
        assert sorted(p["labels"]) == sorted(n for n, v in p["probabilities"].items() if v >= 0.5)
    # printed: each chosen label with its probability (what --output writes, to 4 places)
    texts = [p["text"] for p in preds[:6]]
    shown = run_main("predict.py", "--checkpoint", run, *texts)
    assert shown.returncode == 0, shown.stderr
    table = shown.stdout.splitlines()
    rows = table[table.index(next(ln for ln in table if ln.startswith("labels (probability)"))) + 1:][:6]
    for line, p in zip(rows, preds[:6]):
        want = ", ".join(f"{n} {p['probabilities'][n]:.4f}" for n in sorted(p["labels"], key=labels_order(config)))
        assert line.startswith((want or "-") + "  "), (line, want)
    # pipeline() gives the same sigmoid scores
    scores = pipeline("text-classification", model=str(run / "final"), device="cpu", top_k=None)([preds[0]["text"]])[0]
    for d in scores:
        assert abs(d["score"] - preds[0]["probabilities"][d["label"]]) < 1e-5


def labels_order(config: dict):
    """Sort key: a label's place in the checkpoint's label list."""
    names = [config["id2label"][k] for k in sorted(config["id2label"], key=int)]
    return names.index


@pytest.mark.parametrize("flags, message", [
    (["--label_separator", "|", "--task", "regression"], "a multi-label task, not --task regression"),
    (["--label_columns", "sports,chess"], "column(s) chess not found"),
    (["--threshold", "1.5"], "--threshold must be in (0, 1)"),
    (["--task", "multi_label", "--label_column", "label"], "--task multi_label needs several labels per row"),
    (["--threshold", "high"], "argument --threshold: a number in (0, 1), 'tune' or 'per_label', got 'high'"),
    (["--class_weights", "1,2"], "--class_weights gives 2 weight(s) for 3 labels"),
    (["--threshold", "tune", "--task", "single_label", "--label_column", "label"],
     "--threshold applies to multi-label classification; this data is a single-label task"),
])
def test_multi_label_mistakes_are_one_line_errors(tiny_model_dir, tmp_path, flags, message, run_main):
    files = write_topic_files(tmp_path, topic_rows(40, seed=11))
    train = files["columns"][0] if "--label_columns" in flags else files["lists"][0]
    if "--task" in flags:
        train = write_rows(tmp_path / "single.csv", synthetic_rows(40))
    proc = run_main("train_single.py", "--model", tiny_model_dir, "--train_file", train, *flags,
                      "--checkpoint_dir", tmp_path / "ck")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert message in lines[0], lines[0]


# ---------------------------------------------------------------- review findings

def test_integer_labels_written_as_text_stay_classes(tmp_path):
    rows = synthetic_rows(40, seed=12)
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": r["text"], "label": str(int(r["label"] == "positive"))}) + "\n"
                            for r in rows))
    source = data.DataSource.from_settings(train_file=str(path))
    for task in ("auto", "single_label"):
        got = data.load_labelled_splits(source, validation_fraction=0.25, split_seed=1, num_samples=None, task=task)
        assert got.info["task"] == "single_label" and got.label_names == ["0", "1"]


def test_balanced_weights_refuse_a_label_without_examples():
    with pytest.raises(UserError, match="label\\(s\\) c have no training examples"):
        tasks.resolve_class_weights("balanced", ["a", "b", "c"], [6, 4, 0])


def test_a_nan_metric_never_holds_the_best_checkpoint():
    from encoderfit.run.trainer import BestTracker

    class Log:
        lines = []

        def print(self, *a):
            self.lines.append(" ".join(map(str, a)))

    nan = float("nan")
    # undefined from the first epoch (a constant validation target): chosen by the loss throughout
    tracker = BestTracker("pearson", 2, tasks.Regression(["score"]), Log())
    epochs = [(nan, 2.0), (nan, 1.5), (nan, 1.8), (nan, 1.2)]
    picks = [tracker.improved({"pearson": p, "loss": loss}, e) for e, (p, loss) in enumerate(epochs, 1)]
    assert picks == [True, True, False, True] and tracker.best == 1.2 and tracker.best_epoch == 4
    assert tracker.metric == "loss" and tracker.sign == -1
    assert Log.lines == ["note: val pearson is undefined at epoch 1 (a correlation of values that are all equal, or no "
                         "examples to count): best/ is chosen by val loss from here on"]
    assert not tracker.should_stop()
    # undefined later: the loss of the epoch best/ holds is the one to beat, and a resume keeps the loss
    tracker = BestTracker("pearson", 0, tasks.Regression(["score"]), Log())
    epochs = [(0.5, 2.0), (0.7, 1.9), (0.9, 1.95), (nan, 1.97), (nan, 1.7)]  # 1.97: not below best/'s 1.95
    picks = [tracker.improved({"pearson": p, "loss": loss}, e) for e, (p, loss) in enumerate(epochs, 1)]
    assert picks == [True, True, True, False, True] and tracker.best_epoch == 5 and tracker.best == 1.7
    again = BestTracker("pearson", 0, tasks.Regression(["score"]), Log())
    again.load_state_dict(tracker.state_dict())
    assert (again.metric, again.best, again.best_loss) == ("loss", 1.7, 1.7)
    assert again.improved({"pearson": 0.99, "loss": 1.75}, 6) is False  # a better correlation no longer counts


def test_class_weights_under_ddp_are_one_process_at_the_global_batch(tiny_model_dir, tmp_path, run_main):
    """Each rank's share of the weights differs: the step divides by the weight sum over all ranks."""
    from test_ddp import assert_same_run, epoch_record

    train = write_rows(tmp_path / "train.csv", synthetic_rows(96, seed=13))
    val = write_rows(tmp_path / "val.csv", synthetic_rows(41, seed=14))
    a, b, _ = _one_process_and_two(run_main, tiny_model_dir, tmp_path, train, val, "--class_weights", "1,9")
    assert_same_run(a, b, skip=".attention.self.key.bias")
    # evaluate.py reads the weights from config.json: the weighted mean training reported (with 1,9 on
    # these labels the plain mean differs by far more than the tolerance)
    proc = run_main("evaluate.py", "--checkpoint", a, "--train_file", train, "--validation_file", val,
                    "--output", tmp_path / "e.json")
    assert proc.returncode == 0, proc.stderr
    assert abs(json.loads((tmp_path / "e.json").read_text())["loss"] - epoch_record(a)["val_loss"]) < 1e-5

# ---------------------------------------------------------------- tuned threshold, pos_weight

def noisy_topic_rows(n: int, seed: int, flip: float = 0.1) -> list:
    """``topic_rows`` with each label decision flipped with probability ``flip``: no threshold is perfect."""
    rng = random.Random(seed + 1000)
    rows = topic_rows(n, seed)
    for r in rows:
        r["labels"] = sorted(set(r["labels"]) ^ {t for t in TOPICS if rng.random() < flip})
    return rows


TUNED_FLAGS = ("--threshold", "tune", "--class_weights", "15,15,15", "--max_length", 24, "--log_every", 1,
               "--learning_rate", 5e-3, "--warmup_ratio", 0, "--seed", 3)


@pytest.fixture(scope="module")
def tuned_run(tiny_model_dir, tmp_path_factory):
    """With 10% of label decisions flipped, pos_weight 15 lifts a label's probability to about 0.6 where its
    word is absent (15 x 0.1 / (15 x 0.1 + 0.9)): 0.5 over-predicts, and the tuned threshold sits higher."""
    def make(base: Path) -> str:
        train, val = base / "train.jsonl", base / "val.jsonl"
        for path, rows in ((train, noisy_topic_rows(480, seed=21)), (val, noisy_topic_rows(120, seed=22))):
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return _train(tiny_model_dir, base, train, "--validation_file", val, *TUNED_FLAGS, epochs=4)[1]

    run, out, base = _once(tmp_path_factory, "tuned-run", make)
    train, val = base / "train.jsonl", base / "val.jsonl"
    return run, out, train, val, ["--validation_file", val, *TUNED_FLAGS]


def _micro_f1(probs: list, truth: list, names: list, t: float) -> float:
    tp = fp = fn = 0
    for p, labels in zip(probs, truth):
        for name in names:
            pred, true = p[name] >= t, name in labels
            tp, fp, fn = tp + (pred and true), fp + (pred and not true), fn + (true and not pred)
    return 2 * tp / (2 * tp + fp + fn)


def test_tuned_threshold_is_the_best_of_its_grid_and_every_tool_uses_it(tuned_run, tmp_path, run_main):
    import math

    run, out, _, val, _ = tuned_run
    assert "threshold: tuned at each evaluation" in out and "pos_weight (positive term of each label's loss): " \
        "food 15, music 15, sports 15" in out
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["event"] == "epoch"]
    threshold = epochs[-1]["val_threshold"]
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["multi_label_threshold"] == threshold and config["pos_weight"] == [15.0, 15.0, 15.0]
    assert f"threshold {threshold:.2f}" in out
    # predict.py's probabilities on the validation rows: the recorded threshold is the grid's best micro-F1
    proc = run_main("predict.py", "--checkpoint", run, "--input", val, "--output", tmp_path / "p.jsonl")
    assert proc.returncode == 0, proc.stderr
    preds = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    truth = [json.loads(x)["labels"] for x in val.read_text().splitlines()]
    names = list(TOPICS)
    f1 = {t: _micro_f1([p["probabilities"] for p in preds], truth, names, t) for t in tasks.TUNE_GRID}
    assert f1[threshold] >= max(f1.values()) - 1e-9
    assert abs(f1[threshold] - epochs[-1]["val_micro_f1"]) < 1e-6
    assert threshold >= 0.6 and f1[threshold] > f1[0.5] + 0.03, (threshold, f1[threshold], f1[0.5])
    for p in preds:  # predict.py decides at the recorded threshold
        assert sorted(p["labels"]) == sorted(n for n, v in p["probabilities"].items() if v >= threshold)
    # the val loss is pos_weight's BCE: recomputed from the probabilities, and evaluate.py reports it too
    bce = -sum(15 * math.log(p["probabilities"][n]) if n in y else math.log(1 - p["probabilities"][n])
               for p, y in zip(preds, truth) for n in names) / (len(preds) * len(names))
    assert abs(bce - epochs[-1]["val_loss"]) < 1e-3
    proc = run_main("evaluate.py", "--checkpoint", run, "--train_file", tuned_run[2], "--validation_file", val,
                    "--output", tmp_path / "e.json")
    assert proc.returncode == 0, proc.stderr
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["threshold"] == threshold
    for key in ("micro_f1", "macro_f1", "subset_accuracy", "loss"):
        assert abs(ev[key] - epochs[-1][f"val_{key}"]) < 1e-6, key


def test_pos_weight_is_torchs_and_balanced_is_negatives_per_positive():
    names = ["a", "b"]
    assert tasks.resolve_class_weights("balanced", names, [10, 40], multi_label_examples=50) == [4.0, 0.25]
    with pytest.raises(UserError, match="every training example has label\\(s\\) b"):
        tasks.resolve_class_weights("balanced", names, [10, 50], multi_label_examples=50)
    task = tasks.MultiLabelClassification(names, pos_weight=[3.0, 0.5])
    logits, labels = torch.randn(6, 2), (torch.rand(6, 2) > 0.5).float()
    want = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([3.0, 0.5]))(logits, labels)
    assert torch.allclose(task.loss_sum(logits, labels) / (6 * 2), want, atol=1e-6)
    # as evaluate() runs it: sums at the old threshold, then tuning; the metrics count the decisions again
    # at the new threshold from the outputs, and equal fresh sums taken at it
    tuned = tasks.MultiLabelClassification(names, threshold=tasks.TUNE)
    logits = torch.tensor([[3.0, -3.0], [0.2, 0.1], [0.3, 2.0], [-2.0, 0.15]])  # near-zero logits: negatives
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    stale = tuned.new_sums(torch.device("cpu"))
    tuned.add_sums(stale, tuned.loss_sum(logits, labels), logits, labels)
    outputs = torch.cat([logits, labels], dim=1)
    tuned.tune_on(outputs)
    # sigmoid: the negatives 0.525-0.550, the lowest positive 0.574: 0.55-0.57 are perfect; 0.55 is nearest 0.5
    assert tuned.threshold == 0.55
    fresh = tuned.new_sums(torch.device("cpu"))
    tuned.add_sums(fresh, tuned.loss_sum(logits, labels), logits, labels)
    got = tuned.metrics(stale, outputs)
    assert got["micro_f1"] == tuned.metrics(fresh)["micro_f1"] == 1.0 and got["subset_accuracy"] == 1.0
    assert tuned.metrics(stale)["micro_f1"] < 1.0


@pytest.mark.parametrize("shape, stop_at, resumes_at", [
    ("score_run", 50, "epoch 2, step 50 (batch 16 of the epoch)"),
    # after epoch 2's evaluation tuned the threshold that epoch 3's training sums decide at
    ("tuned_run", 75, "epoch 3, step 75 (batch 15 of the epoch)"),
])
def test_each_task_shape_resumes_bitwise(request, tiny_model_dir, hooks, shape, stop_at, resumes_at, run_main):
    """SIGTERM mid-epoch, then --resume auto (in this process): the uninterrupted run's steps, weights and epoch
    metrics."""
    from test_resume import env_with, records, weights

    run, _, train, *rest = request.getfixturevalue(shape)
    extra, epochs = (rest[1], 4) if shape == "tuned_run" else ((), 3)
    args = _train_args(tiny_model_dir, run.parent, train, *extra, epochs=epochs, name="stopped")
    stopped = run_script("train_single.py", *args, env=env_with(hooks, STOP_AT_STEP=stop_at))
    assert stopped.returncode == 143, stopped.stderr
    resumed = run_main("train_single.py", *args, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at {resumes_at}" in resumed.stdout
    a, b = weights(run.parent / "stopped"), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert [r["loss"] for r in records(run.parent / "stopped", "step")] == [r["loss"] for r in records(run, "step")]
    ea, eb = records(run.parent / "stopped", "epoch"), records(run, "epoch")
    keys = [k for k in eb[0] if k.startswith(("train_", "val_")) and not k.endswith("_s")]
    assert len(ea) == len(eb) == epochs and "val_loss" in keys
    for key in keys:
        assert [r[key] for r in ea] == [r[key] for r in eb], key


def test_tuned_weighted_multi_label_under_ddp_is_one_process_at_the_global_batch(tiny_model_dir, tmp_path, run_main):
    """Balanced pos_weight from the whole training split on every rank; the threshold tuned on the logits
    gathered from both ranks: the same threshold, metrics and weights as one process."""
    from test_ddp import assert_same_run, epoch_record

    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    for path, rows in ((train, noisy_topic_rows(96, seed=23)), (val, noisy_topic_rows(41, seed=24))):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b, out = _one_process_and_two(run_main, tiny_model_dir, tmp_path, train, val, "--threshold", "tune",
                                     "--class_weights", "balanced", lr=3e-3)
    assert "pos_weight (positive term of each label's loss)" in out
    assert_same_run(a, b, skip=".attention.self.key.bias")
    ra, rb = epoch_record(a), epoch_record(b)
    assert ra["val_examples"] == rb["val_examples"] == 41
    for key in ("val_threshold", "val_micro_f1", "val_macro_f1", "val_subset_accuracy"):
        assert ra[key] == rb[key], (key, ra[key], rb[key])
    assert abs(ra["val_loss"] - rb["val_loss"]) < 1e-5


@pytest.mark.parametrize("threshold", [0.5, 0.25])
def test_a_probability_at_the_threshold_is_chosen_in_metrics_and_in_predictions(threshold):
    """The documented rule is "at or above the threshold": a logit exactly at it counts as predicted, in the
    evaluation sums as in the predictor (a strict > would drop it)."""
    import math

    task = tasks.MultiLabelClassification(["a", "b", "c"], threshold)
    at = math.log(threshold / (1 - threshold))  # the logit whose sigmoid is the threshold
    logits = torch.tensor([[at, at - 1e-3, at + 1e-3], [at - 5, at, at + 5]])
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    sums = task.new_sums(torch.device("cpu"))
    task.add_sums(sums, task.loss_sum(logits, labels), logits, labels)
    counts = sums[3:].reshape(3, 3)  # rows: true positives, false positives, false negatives; a column a label
    # a: tp (row 1, at the threshold); b: fn (row 1, just under), tp (row 2, at it); c: fp (row 1), tp (row 2)
    assert counts.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 0]]
    assert [p["label"] for p in task.predictions(logits)] == [["a", "c"], ["b", "c"]]


def _grid_best(score, nearest: float) -> float:
    """The grid threshold with the best ``score(t)``, ties to the one nearest ``nearest`` (then the higher)."""
    best = max(score(t) for t in tasks.TUNE_GRID)
    tied = [t for t in tasks.TUNE_GRID if score(t) == best]
    return max(tied, key=lambda t: (-abs(t - nearest), t))


def test_per_label_thresholds_are_each_labels_best_f1_and_rare_labels_keep_the_common_one():
    """--threshold per_label against a direct count: the common threshold maximizes micro-F1; each label with
    20+ validation positives gets the threshold that maximizes its own F1; a rarer label keeps the common one."""
    import math

    gen = torch.Generator().manual_seed(5)
    n, names = 200, ["often", "low", "rare"]
    truth = torch.zeros(n, 3)
    truth[:90, 0], truth[100:140, 1], truth[150:162, 2] = 1, 1, 1   # 90, 40 and 12 positives
    # "low" is scored on a lower scale: its positives near 0.2, its negatives near 0.05; "often" near 0.7 / 0.3
    centre = torch.tensor([[0.3, 0.05, 0.2]]) + truth * torch.tensor([[0.4, 0.15, 0.5]])
    probs = (centre + 0.05 * torch.randn(n, 3, generator=gen)).clamp(0.01, 0.99)
    logits = torch.log(probs / (1 - probs))
    task = tasks.MultiLabelClassification(names, threshold="per_label")
    task.tune_on(torch.cat([logits, truth], dim=1))

    p, y = probs.tolist(), truth.bool().tolist()

    def counts(j, t):
        tp = sum(1 for r, q in zip(p, y) if r[j] >= t and q[j])
        fp = sum(1 for r, q in zip(p, y) if r[j] >= t and not q[j])
        return tp, fp, sum(q[j] for q in y) - tp

    def f1(j, t):
        tp, fp, fn = counts(j, t)
        return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0

    def micro(t):
        tp, fp, fn = (sum(c) for c in zip(*(counts(j, t) for j in range(3))))
        return 2 * tp / (2 * tp + fp + fn)

    common = _grid_best(micro, 0.5)
    want = [_grid_best(lambda t: f1(0, t), common), _grid_best(lambda t: f1(1, t), common), common]
    assert task.threshold == common and task.thresholds == pytest.approx(want)
    assert task.thresholds[1] < 0.3 < common  # the low-scale label gets its own, lower threshold
    # the metrics count the decisions at each label's threshold; with the common one "low" is never predicted
    sums = task.new_sums(torch.device("cpu"))
    task.add_sums(sums, task.loss_sum(logits, truth), logits, truth)
    got = task.metrics(sums)
    f1s = [f1(j, want[j]) for j in range(3)]
    assert got["macro_f1"] == pytest.approx(sum(f1s) / 3, abs=1e-9) and got["never_predicted"] == 0
    tp, fp, fn = (sum(c) for c in zip(*(counts(j, want[j]) for j in range(3))))
    assert got["micro_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-9)
    one = tasks.MultiLabelClassification(names, threshold="tune")
    one.tune_on(torch.cat([logits, truth], dim=1))
    one_sums = one.new_sums(torch.device("cpu"))
    one.add_sums(one_sums, one.loss_sum(logits, truth), logits, truth)
    assert one.threshold == common and one.metrics(one_sums)["never_predicted"] == 1
    assert got["macro_f1"] > one.metrics(one_sums)["macro_f1"] + 0.2
    # what the checkpoint records, read back: the same decisions
    back = tasks.MultiLabelClassification(names, threshold=task.config_extras()["multi_label_threshold"])
    assert back.per_label and back.thresholds == task.thresholds
    assert torch.equal(back.decode(logits)[1], task.decode(logits)[1])
    assert all(math.isclose(a, b) for a, b in zip(back.thresholds, want))


def test_a_per_label_run_records_its_thresholds_and_every_tool_decides_by_them(tiny_model_dir, tmp_path, run_main):
    from encoderfit import Classifier, evaluate, fit

    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    for path, rows in ((train, noisy_topic_rows(240, seed=21)), (val, noisy_topic_rows(90, seed=22))):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = fit(train, val, model=str(tiny_model_dir), threshold="per_label", epochs=2, batch_size=16,
                 learning_rate=5e-3, max_length=24, device="cpu", no_progress=True, checkpoint_dir=tmp_path / "ck",
                 run_name="pl")
    config = json.loads((result.best_checkpoint / "config.json").read_text())
    thresholds = config["multi_label_threshold"]
    assert isinstance(thresholds, list) and len(thresholds) == 3
    names = [config["id2label"][str(i)] for i in range(3)]
    clf = Classifier.load(result.best_checkpoint, device="cpu")
    texts = [json.loads(x)["text"] for x in val.read_text().splitlines()]
    for p in clf.predict(texts):
        assert p.label == [n for n, t in zip(names, thresholds) if p.scores[n] >= t]
    report = evaluate(result.best_checkpoint, device="cpu")  # the run's own val.jsonl
    assert report["threshold"] == thresholds and report["examples"] == 90
    assert report["micro_f1"] == pytest.approx(result.best_metrics["micro_f1"], abs=1e-9)
    assert isinstance(report["never_predicted"], list)
    card = (result.best_checkpoint / "README.md").read_text()
    assert "its own threshold (" + ", ".join(f"{n} **{t:g}**" for n, t in zip(names, thresholds)) + ")" in card


@pytest.mark.parametrize("shape", ["topic_run", "score_run"])
def test_evaluate_plot_draws_each_labels_f1_or_predicted_against_true(request, shape, tmp_path, monkeypatch):
    """evaluate --plot for multi-label (a bar of F1 per label) and regression (predicted against true): the
    drawn numbers are the report's."""
    from conftest import assert_real_png
    from encoderfit.cli import evaluate, plot

    run = request.getfixturevalue(shape)[0]
    figures = {}
    original = plot.Figure.savefig
    monkeypatch.setattr(plot.Figure, "savefig", lambda fig, path, *a, **k: (figures.setdefault("f", fig),
                                                                           original(fig, path, *a, **k))[1])
    png, out = tmp_path / "e.png", tmp_path / "e.json"
    assert evaluate.main(["--device", "cpu", "--checkpoint", str(run), "--plot", str(png), "--output", str(out)]) == 0
    assert_real_png(png, width=(500, 4000), height=(300, 4000))
    report = json.loads(out.read_text())
    ax = figures["f"].axes[0]
    if shape == "topic_run":
        widths = [bar.get_width() for bar in ax.patches]
        assert widths == pytest.approx([report["per_label"][n]["f1"] for n in report["per_label"]], abs=1e-12)
        assert [t.get_text() for t in ax.get_yticklabels()] == list(report["per_label"])
    else:
        points = ax.collections[0].get_offsets()
        assert len(points) == report["examples"]
        assert float(np.mean(points[:, 1])) == pytest.approx(report["mean_prediction"], abs=1e-5)
        assert float(np.mean(points[:, 0])) == pytest.approx(report["mean_target"], abs=1e-5)


def test_a_run_begun_under_another_default_metric_goes_on_choosing_by_it():
    """A regression checkpointed when Pearson was the default, resumed under MSE: best/ and early stopping keep
    comparing Pearson with Pearson (an MSE against a saved Pearson would never, or always, improve)."""
    from encoderfit.run.trainer import BestTracker

    class Log:
        def print(self, *a):
            pass

    tracker = BestTracker("mse", 2, tasks.Regression(["score"]), Log())
    tracker.load_state_dict({"best": 0.93, "best_epoch": 2, "stale": 0, "metric": "pearson", "best_loss": 1.2})
    assert (tracker.metric, tracker.sign, tracker.requested) == ("pearson", 1, "pearson")
    assert tracker.improved({"pearson": 0.95, "mse": 1.5, "loss": 1.5}, 3) is True
    assert tracker.improved({"pearson": 0.94, "mse": 0.1, "loss": 0.1}, 4) is False  # a lower MSE does not count
