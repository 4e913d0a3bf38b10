"""predict.py and the shared inference code: probabilities against a direct forward pass, input formats, bad input."""
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import ROOT, THREE_LABELS, cli_env, run_script, synthetic_rows, write_rows

from encoderfit.serve import inference
from encoderfit.cli import predict
from encoderfit.utils import UserError

LABELS = THREE_LABELS
TEXTS = ["topic2 was quite good", "the movie topic0", "topic1",
         "story scenes actors music and plot were really quite something topic1 film film film",
         "a", "plot topic2 plot", "the film was a film about a film and topic0 was in it, really",
         "music", "actors topic1 scenes", "quite really quite"]


def direct_probabilities(ckpt: Path, texts: list, max_length: int = 128):
    """Softmax of the logits of one unpadded forward pass per text, with plain transformers."""
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    with torch.no_grad():
        rows = [model(**tokenizer(t, truncation=True, max_length=max_length, return_tensors="pt")).logits[0]
                for t in texts]
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return torch.stack(rows).softmax(dim=-1), names


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_probabilities_equal_a_direct_forward_pass(tmp_path, trained, run_main):
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(TEXTS[:5]) + "\n\n  \n" + "\n".join(TEXTS[5:]) + "\n")  # blank lines are skipped
    out = tmp_path / "sub" / "pred.jsonl"
    # batch 3: several batches, and sorting by length reorders texts across them
    proc = run_main("predict.py", "--checkpoint", trained / "final", "--input", src, "--output", out,
                    "--batch_size", 3)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {len(TEXTS)} prediction(s) to {out}" in proc.stdout
    assert "skipped 2 blank line(s)" in proc.stderr
    records = read_jsonl(out)
    expected, names = direct_probabilities(trained / "final", TEXTS)
    assert names == list(LABELS)
    assert [r["text"] for r in records] == TEXTS  # input order, not length order
    for rec, probs in zip(records, expected):
        assert set(rec) == {"text", "label", "score", "probabilities"}
        assert list(rec["probabilities"]) == list(LABELS)
        got = torch.tensor([rec["probabilities"][n] for n in LABELS])
        torch.testing.assert_close(got, probs, atol=1e-5, rtol=1e-4)
        assert rec["label"] == LABELS[int(probs.argmax())]
        assert rec["score"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert sum(rec["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    # the model learned the task: the topic word decides the label
    assert [r["label"] for r in records[:3]] == ["gamma", "alpha", "beta"]


def test_table_lists_probability_label_and_cut_text_in_input_order(trained, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "70")
    long_text = "topic0 " + "film " * 40
    texts = ["topic1 music", long_text, "topic2"]
    assert predict.main(["--device", "cpu", "--checkpoint", str(trained / "final"), *texts]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split() == ["prob", "label", "text"]
    assert len(lines) == 1 + len(texts)
    expected, _ = direct_probabilities(trained / "final", texts, max_length=32)  # what the checkpoint trained with
    for line, text, probs in zip(lines[1:], texts, expected):
        prob, label, shown = line.split(maxsplit=2)
        assert float(prob) == pytest.approx(float(probs.max()), abs=1e-4)
        assert label == LABELS[int(probs.argmax())]
        assert len(line) <= 70
        assert shown == text if len(text) < 40 else (shown.endswith("...") and text.startswith(shown[:-3]))
    assert "labels alpha, beta, gamma" in captured.err
    assert "max_length 32 |" in captured.err  # the checkpoint's --max_length, not 512 or the model's 128


def test_max_length_defaults_to_the_checkpoints_own(trained, capsys):
    long_text = "topic0 " + "film " * 60
    out = {}
    for flag in ([], ["--max_length", "128"]):
        assert predict.main(["--device", "cpu", "--checkpoint", str(trained / "final"), "--output", "-", *flag, long_text]) == 0
        captured = capsys.readouterr()
        out[len(flag)] = json.loads(captured.out)["probabilities"]
    for key, max_length in ((0, 32), (2, 128)):
        expected, _ = direct_probabilities(trained / "final", [long_text], max_length=max_length)
        got = torch.tensor([out[key][n] for n in LABELS])
        torch.testing.assert_close(got, expected[0], atol=1e-5, rtol=1e-4)
    assert out[0] != out[2]  # the default truncates where training did


def test_a_labelled_table_is_scored_against_the_checkpoints_labels(tmp_path, trained, capsys):
    rows = synthetic_rows(24, seed=6, labels=LABELS)
    for r in rows[:4]:
        r["label"] = r["label"] + " "  # stripped, as training strips them
    rows[5]["label"] = ""  # no label: classified, not scored
    src = write_rows(tmp_path / "test.csv", rows, label_key="category")
    out = tmp_path / "pred.jsonl"
    assert predict.main(["--device", "cpu", "--checkpoint", str(trained / "final"), "--input", str(src), "--output", str(out)]) == 0
    captured = capsys.readouterr()
    records = read_jsonl(out)
    assert [r["true_label"] for r in records] == [r["label"].strip() or None for r in rows]
    scored = [r for r in records if r["true_label"] is not None]
    correct = sum(r["label"] == r["true_label"] for r in scored)
    assert f"accuracy {correct / 23:.4f} | {correct} of 23 labelled text(s) correct (label column 'category')" \
        in captured.out
    assert "1 text(s) without a label are not counted" in captured.err
    assert "surrounding whitespace" in captured.err

    # labels the checkpoint does not know: asked for with --label_column, an error; found by name, a note
    rows[0]["label"] = "delta"
    write_rows(src, rows, label_key="category")
    assert predict.main(["--device", "cpu", "--checkpoint", str(trained / "final"), "--input", str(src), "--label_column",
                         "category"]) == 2
    assert "labels the checkpoint does not know: delta" in capsys.readouterr().err
    assert predict.main(["--device", "cpu", "--checkpoint", str(trained / "final"), "--input", str(src)]) == 0
    captured = capsys.readouterr()
    assert "not scoring against column 'category'" in captured.err and "accuracy" not in captured.out


@pytest.mark.parametrize("script", ["predict.py", "evaluate.py"])
def test_the_tools_answer_help_and_bad_flags_before_loading_torch(script):
    import subprocess

    for args, code in ((["--help"], 0), (["--checkpoint", "x", "--batch_size", "many"], 2)):
        proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "training" / script), *args],
                              capture_output=True, text=True, env=cli_env(), timeout=60)
        assert proc.returncode == code, proc.stderr
        imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
                    if line.startswith("import time:")}
        assert not imported & {"torch", "transformers", "datasets", "numpy", "pandas"}, sorted(imported)
    assert "--max_length" in run_script(script, "--help").stdout


def test_batched_length_sorted_logits_equal_one_text_at_a_time(trained):
    clf = inference.load_classifier(trained / "final", torch.device("cpu"))
    expected, _ = direct_probabilities(trained / "final", TEXTS)
    for batch_size in (1, 4, 64):
        logits = inference.predict_logits(clf, TEXTS, batch_size=batch_size, max_length=128)
        assert logits.dtype == torch.float32 and logits.shape == (len(TEXTS), 3)
        torch.testing.assert_close(logits.softmax(-1), expected, atol=1e-5, rtol=1e-4)
    # truncation: max_length 4 keeps [CLS] + 2 tokens + [SEP], the same as truncating directly
    from encoderfit.modeling.long_texts import LongTexts
    assert clf.long_texts.mode == "head_tail"  # the checkpoint's, which the default run recorded
    short, _ = direct_probabilities(trained / "final", TEXTS, max_length=4)
    torch.testing.assert_close(inference.predict_logits(clf, TEXTS, batch_size=4, max_length=4,
                                                        long_texts=LongTexts("truncate")).softmax(-1),
                               short, atol=1e-5, rtol=1e-4)
    assert clf.max_positions == 128  # the tiny model's position table, below the tokenizer's 512


@pytest.mark.parametrize("suffix,key,flag", [(".csv", "review", []), (".tsv", "sentence", []),
                                             (".jsonl", "body", ["--text_column", "body"]),
                                             (".parquet", "text", [])])
def test_table_files_with_found_or_named_text_column(tmp_path, trained, capsys, suffix, key, flag):
    rows = synthetic_rows(12, seed=5, labels=LABELS)
    rows[4]["text"] = ""  # an empty text: skipped, and said so
    src = write_rows(tmp_path / f"in{suffix}", rows, text_key=key)
    out = tmp_path / "out.jsonl"
    assert predict.main(["--device", "cpu", "--checkpoint", str(trained / "final"), "--input", str(src), "--output", str(out),
                         *flag]) == 0
    assert "skipped 1 row(s) with an empty text" in capsys.readouterr().err
    assert [r["text"] for r in read_jsonl(out)] == [r["text"] for i, r in enumerate(rows) if i != 4]


def test_json_array_file(tmp_path, trained, capsys):
    (tmp_path / "in.json").write_text(json.dumps([{"id": 1, "content": "topic2 film"}, {"id": 2, "content": "topic0"}]))
    assert predict.main(["--device", "cpu", "--checkpoint", str(trained / "final"), "--input", str(tmp_path / "in.json")]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split(maxsplit=2)[2] for r in rows] == ["topic2 film", "topic0"]


def test_output_dash_writes_json_lines_to_stdout(trained, capsys):
    assert predict.main(["--device", "cpu", "--checkpoint", str(trained), "--output", "-", "topic1 film"]) == 0  # run dir: its final/
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["text"] == "topic1 film" and record["label"] in LABELS


def _bad_inputs(tmp: Path, trained: Path) -> dict:
    from encoderfit.modeling.model import default_model_dir

    ck = ["--checkpoint", str(trained / "final")]
    (tmp / "empty_dir").mkdir()
    (tmp / "blank.txt").write_text("\n  \n\n")
    (tmp / "header_only.csv").write_text("text,label\n")
    (tmp / "nocols.csv").write_text("a,b\n1,2\n")
    (tmp / "data.xml").write_text("<a/>")
    (tmp / "ok.txt").write_text("topic1\n")
    no_tokenizer = tmp / "no_tokenizer"  # a trained checkpoint whose tokenizer files were not copied along
    no_tokenizer.mkdir()
    for f in (trained / "final").iterdir():
        if f.name in ("config.json", "model.safetensors"):
            (no_tokenizer / f.name).write_bytes(f.read_bytes())
    return {
        "checkpoint without tokenizer files": (["--checkpoint", str(no_tokenizer), "x"], "has no tokenizer files"),
        "missing checkpoint": (["--checkpoint", str(tmp / "nope"), "x"], "checkpoint not found"),
        "not a checkpoint": (["--checkpoint", str(tmp / "empty_dir"), "x"], "is not a model checkpoint"),
        "base model, no classifier": (["--checkpoint", str(default_model_dir()), "x"],
                                      "is not a text-classification checkpoint (architecture: BertModel)"),
        "missing input file": ([*ck, "--input", str(tmp / "nope.txt")], "input file not found"),
        "no text column": ([*ck, "--input", str(tmp / "nocols.csv")], "no text column found"),
        "named column missing": ([*ck, "--input", str(tmp / "header_only.csv"), "--text_column", "body"],
                                 "text column 'body' not found"),
        "blank input": ([*ck, "--input", str(tmp / "blank.txt")], "no texts to classify"),
        "header only": ([*ck, "--input", str(tmp / "header_only.csv")], "no texts to classify"),
        "empty texts": ([*ck, "", " "], "no texts to classify"),
        "nothing given": (ck, "nothing to classify"),
        "texts and file": ([*ck, "x", "--input", str(tmp / "ok.txt")], "not both"),
        "unknown format": ([*ck, "--input", str(tmp / "data.xml")], "unknown input format '.xml'"),
        "max_length over the limit": ([*ck, "--max_length", "1000", "x"], "more than this model takes (128"),
        "zero batch size": ([*ck, "--batch_size", "0", "x"], "--batch_size must be positive"),
        "output is a directory": ([*ck, "--output", str(tmp), "x"], "--output is a directory"),
        "output under a file": ([*ck, "--output", str(tmp / "ok.txt" / "x.jsonl"), "x"],
                                "ok.txt is a file, not a directory"),
        "label column of a text file": ([*ck, "--input", str(tmp / "ok.txt"), "--label_column", "y"],
                                        "--label_column applies to table files"),
        "named label column missing": ([*ck, "--input", str(tmp / "nocols.csv"), "--text_column", "a",
                                        "--label_column", "y"], "label column 'y' not found"),
        "same text and label column": ([*ck, "--input", str(tmp / "nocols.csv"), "--text_column", "a",
                                        "--label_column", "a"], "the text column and the label column are both 'a'"),
        "bad device": ([*ck, "--device", "gpu", "x"], "--device must be"),
        "no checkpoint flag": (["x"], "the following arguments are required: --checkpoint"),
    }


@pytest.mark.parametrize("case", ["missing checkpoint", "not a checkpoint", "base model, no classifier",
                                  "checkpoint without tokenizer files",
                                  "missing input file", "no text column", "named column missing", "blank input",
                                  "header only", "empty texts", "nothing given", "texts and file",
                                  "unknown format", "max_length over the limit", "zero batch size", "output is a directory",
                                  "output under a file", "label column of a text file", "named label column missing",
                                  "same text and label column", "bad device",
                                  "no checkpoint flag"])
def test_bad_input_is_one_error_line_and_exit_code_2(tmp_path, trained, capsys, case):
    args, expected = _bad_inputs(tmp_path, trained)[case]
    assert predict.main(args) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert expected in lines[0]
    assert captured.out == ""


def test_bad_input_through_the_script_has_no_traceback(tmp_path):
    proc = run_script("predict.py", "--checkpoint", tmp_path / "missing", "some text")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: checkpoint not found: {tmp_path / 'missing'}"


def test_read_texts_rejects_nothing_usable(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": None}) + "\n" + json.dumps({"text": "  "}) + "\n")
    with pytest.raises(UserError, match="no texts to classify"):
        inference.read_texts(str(tmp_path / "a.jsonl"))
