"""The baseline of ``bench/job.py``: the same job as a plain Hugging Face Trainer script, written as its
documentation and ``run_classification.py`` do it (it uses nothing of this project).

Train and validation files, one text column (or two for pairs), a class label, a score or a list of
labels; AutoModelForSequenceClassification with the task's ``problem_type``; dynamic padding; AdamW
with linear warm-up and decay; an evaluation and a checkpoint each epoch; bf16 on a GPU that has it.
It prints one JSON line: the validation metric of each epoch and the final model's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

T0 = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,  # noqa: E402
                          Trainer, TrainingArguments)


def metric_fn(task: str):
    def compute(pred):
        logits, labels = pred.predictions, pred.label_ids
        if task == "regression":
            return {"pearson": float(np.corrcoef(logits.reshape(-1), labels.reshape(-1))[0, 1])}
        if task == "multi_label":
            p, y = logits >= 0, labels >= 0.5  # sigmoid >= 0.5
            tp, fp, fn = (p & y).sum(), (p & ~y).sum(), (~p & y).sum()
            return {"micro_f1": float(2 * tp / max(2 * tp + fp + fn, 1))}
        return {"accuracy": float((logits.argmax(-1) == labels).mean())}
    return compute


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--train_file", required=True)
    ap.add_argument("--validation_file", required=True)
    ap.add_argument("--task", choices=("single_label", "multi_label", "regression"), required=True)
    ap.add_argument("--text_column", default="text")
    ap.add_argument("--text_pair_column")
    ap.add_argument("--label_column", default="label")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--learning_rate", type=float, default=2e-5)
    ap.add_argument("--max_length", type=int, default=128)
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--use_cpu", action="store_true", help="train on the CPU even where there is a GPU")
    args = ap.parse_args(argv)

    kind = "json" if args.train_file.endswith(".jsonl") else "csv"
    raw = load_dataset(kind, data_files={"train": args.train_file, "validation": args.validation_file})
    if args.task == "regression":
        names = [args.label_column]
    elif args.task == "multi_label":
        names = sorted({n for row in raw["train"][args.label_column] for n in row})
    else:
        names = sorted(set(raw["train"][args.label_column]))
    index = {n: i for i, n in enumerate(names)}
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def encode(batch):
        pairs = batch[args.text_pair_column] if args.text_pair_column else None
        out = tokenizer(batch[args.text_column], pairs, truncation=True, max_length=args.max_length)
        y = batch[args.label_column]
        if args.task == "regression":
            out["labels"] = [float(v) for v in y]
        elif args.task == "multi_label":
            out["labels"] = [[float(n in row) for n in names] for row in y]
        else:
            out["labels"] = [index[v] for v in y]
        return out

    data = raw.map(encode, batched=True, remove_columns=raw["train"].column_names)
    problem = {"regression": "regression", "multi_label": "multi_label_classification"}.get(
        args.task, "single_label_classification")
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=len(names), problem_type=problem, id2label=dict(enumerate(names)),
        label2id=index, ignore_mismatched_sizes=True,  # a fresh head, whatever the checkpoint had
        # fp32 master weights, as from an fp32 checkpoint; transformers 5 loads a bf16 copy as bf16 ("auto"),
        # and AdamW steps of 2e-5 vanish in bf16 weights
        dtype=torch.float32)
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    training_args = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=2 * args.batch_size, learning_rate=args.learning_rate, weight_decay=0.01,
        warmup_steps=0.06,  # below 1: a fraction of the steps (transformers 5)
        lr_scheduler_type="linear", eval_strategy="epoch", save_strategy="epoch",
        save_total_limit=2, logging_strategy="epoch", bf16=bf16, report_to="none", seed=args.seed,
        disable_tqdm=True, use_cpu=args.use_cpu or not torch.cuda.is_available())
    trainer = Trainer(model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["validation"],
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=metric_fn(args.task))
    t_train = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t_train
    trainer.save_model(f"{args.output_dir}/final")
    epochs = [{k[5:]: v for k, v in r.items() if k.startswith("eval_")} for r in trainer.state.log_history
              if "eval_loss" in r]
    a = trainer.args
    settings = {"epochs": a.num_train_epochs, "batch_size": a.per_device_train_batch_size, "learning_rate":
                a.learning_rate, "weight_decay": a.weight_decay, "warmup_steps": a.get_warmup_steps(
                    trainer.state.max_steps), "max_steps": trainer.state.max_steps, "device": str(a.device)}
    print(json.dumps({"epochs": epochs, "final": epochs[-1], "settings": settings, "train_loop_s": round(train_s, 2),
                      "total_s": round(time.perf_counter() - T0, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
