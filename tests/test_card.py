"""The model card each run writes into final/ and best/: read back and checked against the run, and its usage
snippets run as written (they must give what the checkpoint's own predictor gives)."""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from conftest import synthetic_rows
from test_tasks import pair_rows, score_rows, topic_rows

SHAPES = {"single_label": synthetic_rows, "pairs": pair_rows, "multi_label": topic_rows, "regression": score_rows}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    from encoderfit import fit

    base = tmp_path_factory.mktemp("cards")
    out = {}
    for shape, make in SHAPES.items():
        # multi-label long enough to learn several labels per text (its snippet must return label sets)
        rows, epochs = (240, 6) if shape == "multi_label" else (120, 2)
        out[shape] = fit(pd.DataFrame(make(rows, seed=8)), model=str(tiny_model_dir), checkpoint_dir=base,
                         run_name=shape, epochs=epochs, batch_size=16, learning_rate=2e-3, max_length=32,
                         device="cpu", no_progress=True)
    return out


def _blocks(text: str) -> list:
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_the_card_says_what_the_run_did(runs, shape):
    from huggingface_hub import ModelCard

    result = runs[shape]
    summary, data = result.summary, json.loads((result.final_checkpoint.parent / "data.json").read_text())
    model = json.loads((result.final_checkpoint / "config.json").read_text())
    for name, which in (("final", "final"), ("best", "best")):
        card = ModelCard.load(result.final_checkpoint.parent / name / "README.md")
        meta = card.data.to_dict()
        task = summary["task"]
        assert meta["pipeline_tag"] == "text-classification" and meta["library_name"] == "transformers"
        assert task.replace("_", "-") in meta["tags"] and "base_model" not in meta  # a local model: no Hub name
        labels = [model["id2label"][k] for k in sorted(model["id2label"], key=int)]
        text = card.text
        for label in labels:
            assert f"`{label}`" in text
        if task == "multi_label":
            assert f"at least **{model['multi_label_threshold']}**" in text
        assert f"--long_texts {model['long_texts']['mode']}" in text
        train_sha = data["fingerprint"]["train"]
        assert f"SHA-256 `{train_sha}`" in text and f"{data['train_examples']} training" in text
        assert "learning_rate 0.002" in text and f"epochs {6 if task == 'multi_label' else 2}" in text
        rows = dict(re.findall(r"^\| (\w+) \| ([\d.na/-]+) \|$", text, re.M))
        assert set(rows) == set(summary["metrics"])
        for m, shown in rows.items():  # that checkpoint's own validation metrics
            assert float(shown) == pytest.approx(summary[f"{which}_val_{m}"], abs=5e-5), (name, m)
        epoch = summary["best_epoch"] if name == "best" else summary["epochs_run"]
        assert f"`{name}/`, after epoch {epoch}" in text


@pytest.mark.parametrize("shape", list(SHAPES))
def test_the_cards_usage_snippets_give_the_predictors_answer(runs, shape):
    """Both snippets, executed as written on the checkpoint: pipeline() with the task's arguments gives the label
    set (multi-label, at the threshold), the raw score (regression) or the label and probability that the
    project's predictor gives."""
    card = (runs[shape].best_checkpoint / "README.md").read_text()
    pipe_code, ours_code = _blocks(card)
    ref = str(runs[shape].best_checkpoint)
    # on the CPU in fp32 both (on a GPU machine, pipeline() and the predictor would choose their own devices)
    pipe_code = _swapped(pipe_code, {f'model="{ref}")': f'model="{ref}", device="cpu")'})
    ours_code = _swapped(ours_code, {f'Classifier.load("{ref}")': f'Classifier.load("{ref}", device="cpu")'})
    rows = SHAPES[shape](12, seed=21)
    sizes = set()
    for row in rows:  # the snippets' example text swapped for texts of the data (label sets of several sizes)
        if shape == "pairs":
            swap = {'"a first text"': json.dumps(row["sentence1"]), '"its second text"': json.dumps(row["sentence2"])}
        else:
            swap = {'"a text to classify"': json.dumps(row["text"])}
        pipe, ours = {}, {}
        exec(_swapped(pipe_code, swap), pipe)
        exec(_swapped(ours_code, swap), ours)
        want = ours["predictions"][0]
        if shape == "multi_label":
            assert sorted(pipe["labels"]) == sorted(want.label)  # a set: pipeline() orders by score
            sizes.add(len(want.label))
        elif shape == "regression":
            assert pipe["score"] == pytest.approx(want.score, abs=1e-5)
        else:
            got = pipe["result"] if isinstance(pipe["result"], dict) else pipe["result"][0]
            assert got["label"] == want.label and got["score"] == pytest.approx(want.score, abs=1e-5)
    if shape == "multi_label":
        assert len(sizes) > 1 and max(sizes) >= 2, sizes  # a top-1 answer could not pass this


def _swapped(code: str, swap: dict) -> str:
    for old, new in swap.items():
        assert old in code
        code = code.replace(old, new)
    return code
