"""The training math against a reference loop written plainly from torch's own pieces.

The engine (the trainer's builder: AdamW and its groups, the schedule, the step with its loss normalization,
accumulation and clipping) and a reference loop (mean losses from torch.nn.functional, clip_grad_norm_, AdamW with
Hugging Face Trainer's decay groups, transformers' linear warm-up and decay) start from the same weights and see
the same batches: every step's loss and learning rate, and the final weights, must agree within fp32 rounding.
Half the learning rate, no clipping, decay on biases, or a loss not divided by the step's examples all fail here.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from encoderfit import tasks
from encoderfit.data.batches import Batch
from encoderfit.engine.build import Optimization, Speed, build_steps
from encoderfit.engine.distributed import ProcessContext

LR, DECAY, WARMUP, STEPS = 3e-3, 0.05, 0.25, 6


def _model(num_labels: int, problem_type: str):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=num_labels, problem_type=problem_type,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _batches(shape: str, k: int, count: int) -> list:
    """Micro-batches of random tokens, sizes and padding, with the task's labels."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for i in range(count):
        size, length = 3 + i % 3, 6 + 3 * (i % 4)
        ids = torch.randint(5, 120, (size, length), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, length - 2:] = 0  # some padding
        if shape == "regression":
            labels = torch.randn(size, generator=gen)
        elif shape == "multi_label":
            labels = (torch.rand(size, k, generator=gen) < 0.4).float()
        else:
            labels = torch.randint(0, k, (size,), generator=gen)
        out.append(Batch({"input_ids": ids, "attention_mask": mask}, labels, size, int(mask.sum())))
    return out


def _reference_loss(shape: str, logits: torch.Tensor, labels: torch.Tensor, weights) -> torch.Tensor:
    """The step's loss as the documentation defines it: the mean over the step's examples (weighted mean with
    class weights; BCE's mean over examples x labels)."""
    if shape == "regression":
        return F.mse_loss(logits.squeeze(-1), labels)
    if shape == "multi_label":
        return F.binary_cross_entropy_with_logits(logits, labels,
                                                  pos_weight=None if weights is None else torch.tensor(weights))
    return F.cross_entropy(logits, labels, weight=None if weights is None else torch.tensor(weights))


CASES = {  # shape, labels, class weights (pos_weight for multi-label), micro-batches per step, clipping
    "single-label, clipped": ("single_label", 3, None, 1, 0.05),
    "single-label, class weights": ("single_label", 3, [1.0, 3.0, 0.5], 1, 0.0),
    "single-label, class weights, accumulation": ("single_label", 3, [1.0, 3.0, 0.5], 3, 0.0),
    "single-label, accumulation, clipped": ("single_label", 3, None, 3, 0.05),
    "multi-label, pos_weight, accumulation": ("multi_label", 4, [2.0, 1.0, 5.0, 0.5], 2, 0.0),
    "multi-label, clipped": ("multi_label", 4, None, 1, 0.05),
    "regression, accumulation": ("regression", 1, None, 2, 0.0),
    "regression, clipped": ("regression", 1, None, 1, 0.05),
}


@pytest.mark.parametrize("fused", [False, True], ids=["foreach AdamW", "fused AdamW, clipping folded"])
@pytest.mark.parametrize("case", list(CASES))
def test_the_engine_trains_as_the_reference_loop(case, fused, monkeypatch):
    """The engine against a plain loop of torch and transformers parts. ``fused``: the engine's AdamW is the
    fused one, as on CUDA, so the clipping rides in its pass (engine/step.py's folds_clipping)."""
    from transformers import Trainer, get_linear_schedule_with_warmup
    from encoderfit.engine import build as engine_build

    if fused:
        real = engine_build.loop.build_optimizer
        monkeypatch.setattr(engine_build.loop, "build_optimizer", lambda *a, **kw: real(*a, **{**kw, "fused": True}))

    shape, k, weights, accum, clip = CASES[case]
    names = ["score"] if shape == "regression" else [f"l{i}" for i in range(k)]
    task = tasks.choose_task(shape, names, weights, 0.5)
    problem = task.problem_type
    model = _model(k, problem)
    reference = copy.deepcopy(model)
    batches = _batches(shape, k, STEPS * accum)
    ctx = ProcessContext(0, 0, 1, torch.device("cpu"))

    # the engine, through the trainer's own builder
    steps = build_steps(model, task, ctx, Optimization(LR, DECAY, WARMUP, clip, STEPS), Speed())
    assert steps.optimizer.defaults["fused"] is fused
    # the gradient's norm as AdamW used it (after clipping): the folded clipping writes the clipped gradients back
    ours_norms = []
    steps.optimizer.register_step_post_hook(lambda opt, args, kwargs: ours_norms.append(float(
        torch.linalg.vector_norm(torch.stack([p.grad.norm() for g in opt.param_groups for p in g["params"]
                                              if p.grad is not None])))))
    ours_loss, ours_lr = [], []
    for s in range(STEPS):
        group = batches[s * accum:(s + 1) * accum]
        ours_lr.append(steps.optimizer.param_groups[0]["lr"])
        out = steps.runner(group, sum(task.normalizer(b) for b in group))
        steps.scheduler.step()
        ours_loss.append(float(out.loss_sum) / sum(task.normalizer(b) for b in group))

    # the reference loop
    decay = set(Trainer.get_decay_parameter_names(None, reference))
    params = dict(reference.named_parameters())
    optimizer = torch.optim.AdamW([{"params": [p for n, p in params.items() if n in decay], "weight_decay": DECAY},
                                   {"params": [p for n, p in params.items() if n not in decay],
                                    "weight_decay": 0.0}], lr=LR)
    schedule = get_linear_schedule_with_warmup(optimizer, math.ceil(WARMUP * STEPS), STEPS)
    reference.train()
    ref_loss, ref_lr, norms, applied = [], [], [], []
    for s in range(STEPS):
        group = batches[s * accum:(s + 1) * accum]
        ref_lr.append(optimizer.param_groups[0]["lr"])
        logits = torch.cat([reference(**b.inputs).logits for b in group])
        labels = torch.cat([b.labels for b in group])
        loss = _reference_loss(shape, logits.float(), labels, weights)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), clip if clip else float("inf"))))
        applied.append(min(norms[-1], clip) if clip else norms[-1])
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        ref_loss.append(float(loss.detach()))

    assert ours_lr == pytest.approx(ref_lr, rel=1e-12, abs=0) and ref_lr[0] == 0.0 and max(ref_lr) == LR
    assert ours_loss == pytest.approx(ref_loss, rel=2e-5, abs=1e-7)
    # the gradients themselves (a loss summed instead of averaged scales them; AdamW would hide it)
    assert ours_norms == pytest.approx(applied, rel=1e-4)
    if clip:
        assert min(norms) > clip  # clipping was active on every step
    moved = 0
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=2e-6), name
        moved += int(not torch.equal(ours, _model(k, problem).state_dict()[name]))
    assert moved == len(list(model.parameters()))  # every weight trained, so every comparison meant something


# --- one evaluation pass, against transformers' model run plainly -----------------------------------------------

def _plain_outputs(checkpoint, texts, pairs=None) -> torch.Tensor:
    """transformers' own tokenizer and model in eval mode, a few examples at a time: the reference logits."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), 7):
            enc = tok(texts[i:i + 7], None if pairs is None else pairs[i:i + 7], truncation=True, max_length=32,
                      padding=True, return_tensors="pt")
            out.append(model(**enc).logits.float())
    return torch.cat(out)


def _f1(tp, fp, fn) -> float:
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


@pytest.mark.parametrize("shape", ["single_label", "pairs", "multi_label", "regression"])
def test_evaluation_is_the_plain_eval_pass(shape, tmp_path):
    """The model with dropout on: evaluate() must score what transformers' model in eval mode computes, with the
    task's loss (torch's mean losses) and metrics (counted here, or scipy's correlations). Evaluation in train
    mode, a loss summed or averaged per batch, or a metric off by an example fails here."""
    import pandas as pd
    from scipy import stats

    from conftest import make_tiny_bert, synthetic_rows
    from test_tasks import pair_rows, score_rows, topic_rows
    from encoderfit import evaluate, fit

    model_dir = make_tiny_bert(tmp_path / "model", dropout=0.3, seed=2)
    make = {"single_label": synthetic_rows, "pairs": pair_rows, "multi_label": topic_rows, "regression": score_rows}
    rows, test = make[shape](160, seed=3), make[shape](53, seed=4)  # 53: the last batch is a short one
    result = fit(pd.DataFrame(rows), model=str(model_dir), checkpoint_dir=tmp_path, run_name="r", epochs=1,
                 batch_size=16, learning_rate=2e-3, max_length=32, device="cpu", no_progress=True)
    ckpt = result.final_checkpoint
    report = evaluate(ckpt, pd.DataFrame(test), device="cpu", batch_size=8)
    assert report["examples"] == 53
    pairs = [r["sentence2"] for r in test] if shape == "pairs" else None
    logits = _plain_outputs(ckpt, [r["sentence1" if shape == "pairs" else "text"] for r in test], pairs)
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(ckpt)
    if shape == "regression":
        target = torch.tensor([r["score"] for r in test])
        pred = logits.squeeze(-1)
        assert report["loss"] == pytest.approx(float(F.mse_loss(pred, target)), rel=1e-5)
        assert report["mse"] == pytest.approx(float(F.mse_loss(pred, target)), rel=1e-5)
        assert report["mae"] == pytest.approx(float(F.l1_loss(pred, target)), rel=1e-5)
        # the predictions of a model one epoch old are close together: their correlation moves with fp32 rounding
        assert report["pearson"] == pytest.approx(stats.pearsonr(pred.numpy(), target.numpy())[0], abs=1e-4)
        assert report["spearman"] == pytest.approx(stats.spearmanr(pred.numpy(), target.numpy())[0], abs=1e-4)
        return
    names = [config.id2label[i] for i in range(config.num_labels)]
    if shape == "multi_label":
        target = torch.tensor([[float(n in r["labels"]) for n in names] for r in test])
        assert report["loss"] == pytest.approx(float(F.binary_cross_entropy_with_logits(logits, target)), rel=1e-5)
        chosen = logits.sigmoid() >= config.multi_label_threshold
        tp = int((chosen & (target == 1)).sum())
        fp, fn = int((chosen & (target == 0)).sum()), int((~chosen & (target == 1)).sum())
        assert report["micro_f1"] == pytest.approx(_f1(tp, fp, fn), abs=1e-9)
        assert report["subset_accuracy"] == pytest.approx(int((chosen == (target == 1)).all(1).sum()) / len(test), abs=1e-12)
        return
    target = torch.tensor([names.index(r["label"]) for r in test])
    assert report["loss"] == pytest.approx(float(F.cross_entropy(logits, target)), rel=1e-5)
    pred = logits.argmax(-1)
    assert report["accuracy"] == pytest.approx(int((pred == target).sum()) / len(test), abs=1e-12)
    f1s = [_f1(int(((pred == c) & (target == c)).sum()), int(((pred == c) & (target != c)).sum()),
               int(((pred != c) & (target == c)).sum())) for c in range(len(names))
           if bool((target == c).any() or (pred == c).any())]
    assert report["macro_f1"] == pytest.approx(sum(f1s) / len(f1s), abs=1e-9)


def test_training_steps_run_in_train_mode_and_evaluation_in_eval_mode(tmp_path, monkeypatch):
    """Dropout on while the weights learn, off while they are scored: each forward pass of a run, by whether it
    builds a graph (a training step) or not (evaluation). A model left in eval mode trains without dropout and
    passes every comparison of the engine with itself."""
    import pandas as pd
    from transformers import BertForSequenceClassification

    from conftest import make_tiny_bert, synthetic_rows
    from encoderfit import fit

    seen = []
    forward = BertForSequenceClassification.forward

    def recording(self, *args, **kwargs):
        seen.append((torch.is_grad_enabled(), self.training))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(BertForSequenceClassification, "forward", recording)
    model_dir = make_tiny_bert(tmp_path / "model", dropout=0.3, seed=3)
    fit(pd.DataFrame(synthetic_rows(80, seed=9)), model=str(model_dir), checkpoint_dir=tmp_path, run_name="r",
        epochs=2, batch_size=16, max_length=32, device="cpu", no_progress=True)
    steps = [mode for grad, mode in seen if grad]
    scoring = [mode for grad, mode in seen if not grad]
    assert len(steps) == 2 * 5 and all(steps)  # 72 training examples (80 less 10%) at 16: 5 steps an epoch
    assert len(scoring) >= 2 and not any(scoring)  # each epoch's validation, in eval mode
