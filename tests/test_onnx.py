"""ONNX export for serving: every task shape served by ONNX Runtime as transformers computes it, the int8 copy,
the export's own check on the run's validation split, and its errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_bert
from encoderfit import Classifier, UserError, evaluate, export_onnx
from encoderfit.cli import main
from encoderfit.serve import onnx as onnx_export

pytest.importorskip("onnxruntime")

TEXTS = ["the movie was great and superb", "awful boring plot",
         "the actors and the music " * 30,  # longer than the export's sample and than max_length: truncated
         "a", "it was fine, I guess, the second half more than the first"]
PAIRS = ["a film", "the plot is dull and slow", "music", "nothing at all " * 20, "the second half"]


def _checkpoint(base: Path, shape: str) -> Path:
    """The tiny BERT as a checkpoint of ``shape`` (random weights: the numbers, not the quality, are compared)."""
    from transformers import BertConfig, BertForSequenceClassification

    make_tiny_bert(base)  # the tokenizer files
    labels = {"single": ["neg", "pos"], "pairs": ["no", "maybe", "yes"], "multi": ["food", "music", "sports"],
              "regression": ["score"]}[shape]
    config = BertConfig.from_pretrained(base)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {n: i for i, n in enumerate(labels)}
    config.problem_type = {"multi": "multi_label_classification", "regression": "regression"}.get(
        shape, "single_label_classification")
    if shape == "multi":
        config.multi_label_threshold = 0.5
    if shape == "pairs":
        config.text_columns = ["premise", "hypothesis"]
    torch.manual_seed(3)
    BertForSequenceClassification(config).save_pretrained(base)
    return base


def _reference(ckpt: Path, texts, pairs=None) -> torch.Tensor:
    """transformers' own tokenizer and model, one text at a time without padding: the logits to serve."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    rows = []
    with torch.no_grad():
        for i, text in enumerate(texts):
            enc = tok(text, None if pairs is None else pairs[i], truncation=True, max_length=48, return_tensors="pt")
            rows.append(model(**enc).logits[0])
    return torch.stack(rows)


@pytest.mark.parametrize("shape", ["single", "pairs", "multi", "regression"])
def test_onnx_serves_each_task_shape_as_transformers_computes_it(shape, tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt", shape)
    record = export_onnx(ckpt, int8=shape == "single", check=False)
    files = {p.name for p in (ckpt / "onnx").iterdir()}
    assert files == ({"model.onnx", "model_qint8.onnx", "export.json"} if shape == "single"
                     else {"model.onnx", "export.json"})
    assert json.loads((ckpt / "onnx" / "export.json").read_text()) == record
    pairs = PAIRS if shape == "pairs" else None
    want = _reference(ckpt, TEXTS, pairs)
    # batches of 2 and 3: dynamic batch and sequence axes, padding inside a batch
    served = Classifier.load(ckpt, runtime="onnx", max_length=48, batch_size=3)
    logits = served.logits(TEXTS, pairs)
    assert torch.allclose(logits, want, atol=1e-5, rtol=0), (logits - want).abs().max()
    torch_preds = Classifier.load(ckpt, device="cpu", max_length=48).predict(TEXTS, pairs)
    for a, b in zip(served.predict(TEXTS, pairs), torch_preds):
        assert a.label == (pytest.approx(b.label, abs=1e-5) if shape == "regression" else b.label)
        assert a.scores == pytest.approx(b.scores, abs=1e-5)
    if shape == "single":  # int8 weights: close to the fp32 model, not equal to it
        q = Classifier.load(ckpt, runtime="onnx-int8", max_length=48).logits(TEXTS)
        assert 0 < (q - want).abs().max() < 0.1
        assert (ckpt / "onnx" / "model_qint8.onnx").stat().st_size < 0.5 * (ckpt / "onnx" / "model.onnx").stat().st_size


def test_export_checks_itself_on_the_runs_validation_split(trained, tmp_path, run_main, capfd):
    run = tmp_path / "run"
    shutil.copytree(trained, run)  # the shared run is read-only: the export writes into final/onnx/
    assert main(["export", str(run), "--int8"]) == 0  # a run directory: its final/
    stdout = capfd.readouterr().out
    record = json.loads((run / "final" / "onnx" / "export.json").read_text())
    check = record["check"]
    summary = json.loads((run / "summary.json").read_text())
    assert check["examples"] == 30 and check["failed"] is None and check["metric"] == "accuracy"
    assert check["fp32_max_abs_difference"] < 1e-4
    # the PyTorch score is training's own last validation accuracy; fp32 ONNX scores the same
    assert check["scores"]["torch"] == pytest.approx(summary["final_val_accuracy"], abs=1e-9)
    assert check["scores"]["onnx"] == check["scores"]["torch"]
    assert abs(check["int8_metric_drop"]) <= 0.01 + 1e-12
    assert (f"check on {check['data']} (30 examples): fp32 max |difference| of a probability "
            f"{check['fp32_max_abs_difference']:.1e} (limit 1e-4)") in stdout
    # a push of the checkpoint carries the export
    from encoderfit.serve.hub import files_to_upload

    assert {"onnx/model.onnx", "onnx/model_qint8.onnx", "onnx/export.json"} <= set(files_to_upload(run / "final"))
    # evaluate and predict through ONNX Runtime: the same numbers as the PyTorch checkpoint's
    base = evaluate(run / "final", device="cpu")
    for runtime in ("onnx", "onnx-int8"):
        report = evaluate(run / "final", runtime=runtime)
        assert report["runtime"] == runtime and report["examples"] == 30
        assert report["accuracy"] == pytest.approx(check["scores"][runtime], abs=1e-12)
    assert report["accuracy"] == pytest.approx(base["accuracy"], abs=0.0101)
    capfd.readouterr()
    proc = run_main("predict.py", "--checkpoint", run / "final", "--runtime", "onnx", "alpha beta", "gamma")
    assert proc.returncode == 0, proc.stderr
    assert "ONNX Runtime, fp32" in proc.stderr
    want = Classifier.load(run / "final", device="cpu").predict(["alpha beta", "gamma"])
    for p, line in zip(want, [ln for ln in proc.stdout.splitlines() if ln.strip()][-2:]):
        assert p.label in line and f"{p.score:.4f}" in line


def test_an_export_that_does_not_match_is_an_error_with_its_numbers(trained, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    monkeypatch.setattr(onnx_export, "PROBABILITY_LIMIT", 0.0)  # no export can be closer than 0
    with pytest.raises(UserError, match=r"the ONNX export does not match the PyTorch checkpoint: fp32 differs by "
                                        r"\S+ \(limit 0e\+00\)"):
        export_onnx(run / "final")
    assert json.loads((run / "final" / "onnx" / "export.json").read_text())["check"]["failed"]
    assert not (run / "final" / "onnx" / "model.onnx").exists()  # not left for the predictor to serve
    with pytest.raises(UserError, match="has no ONNX export"):
        Classifier.load(run / "final", runtime="onnx")


def test_onnx_errors_name_the_fix(tmp_path, capfd):
    ckpt = _checkpoint(tmp_path / "ckpt", "single")
    with pytest.raises(UserError, match=r"has no ONNX export \(onnx/model.onnx\): run encoderfit export"):
        Classifier.load(ckpt, runtime="onnx")
    with pytest.raises(UserError, match="runtime must be one of torch, onnx, onnx-int8"):
        Classifier.load(ckpt, runtime="tensorrt")
    with pytest.raises(UserError, match="--runtime onnx runs on the CPU"):
        Classifier.load(ckpt, runtime="onnx", device="cuda")
    # no run beside the checkpoint and no --data: nothing to check on, said before any export
    assert main(["export", str(ckpt)]) == 2
    assert "no run beside the checkpoint to check the export on: give labelled data with --data FILE, or " \
           "--no_check" in capfd.readouterr().err
    assert not (ckpt / "onnx" / "model.onnx").exists()
