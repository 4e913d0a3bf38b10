"""The speed levers' CPU semantics. fp16 with loss scaling: the engine's step against torch's own AMP recipe
(GradScaler, as its docs write the loop), a planted overflow that skips exactly its step, and the scale kept
across a resume; on a CUDA GPU, eager and recorded as graphs: tests/test_graphs.py and tests/test_gpu.py.
The regional compile: what it compiles and where its cache goes (run on the GPU in tests/test_gpu.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_bert, run_script, synthetic_rows, write_rows
from encoderfit.data.batches import Batch
from encoderfit.engine import loop as engine
from encoderfit.engine.build import Optimization, Speed, build_steps
from encoderfit.engine.distributed import ProcessContext
from encoderfit.engine.step import StepContext, folds_clipping, train_step
from encoderfit.tasks.single_label import SingleLabelClassification
from encoderfit.utils import UserError, autocast_dtype
from test_resume import SITECUSTOMIZE, env_with

OVERFLOW_HOOK = '''
import os
import torch


class _Overflow(torch.autograd.Function):
    """Identity forward; a backward too large for fp16 (what an overflowing step looks like)."""
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1e30


if os.environ.get("OVERFLOW_AT_CALL"):
    _forward = torch.nn.CrossEntropyLoss.forward
    seen = [0]

    def forward(self, input, target):
        seen[0] += 1
        at = {int(x) for x in os.environ["OVERFLOW_AT_CALL"].split(",")}
        return _forward(self, _Overflow.apply(input) if seen[0] in at else input, target)
    torch.nn.CrossEntropyLoss.forward = forward
'''


def batches(n: int, *, size=6, length=12, vocab=200, seed=0) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (size, length), generator=g)
        mask = torch.ones(size, length, dtype=torch.long)
        mask[0, length // 2:] = 0
        inputs = {"input_ids": ids * mask, "attention_mask": mask}
        out.append(Batch(inputs, torch.randint(0, 2, (size,), generator=g), size, int(mask.sum())))
    return out


def tiny(seed=0):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=32, hidden_dropout_prob=0.0,
                                                    attention_probs_dropout_prob=0.0))


class Plant:
    """Multiplies the classifier weight's gradient by ``factor[0]`` (inf at the planted step, else 1)."""
    def __init__(self, model):
        self.factor = torch.ones(())
        model.classifier.weight.register_hook(lambda grad: grad * self.factor)


def ours(data, overflow_at: int, lr=1e-3, clip=0.5) -> tuple:
    model = tiny()
    plant = Plant(model)
    ctx = ProcessContext(0, 0, 1, torch.device("cpu"))
    steps = build_steps(model, SingleLabelClassification(["a", "b"]), ctx,
                        Optimization(lr, 0.01, 0.25, clip, len(data)), Speed(amp_dtype=torch.float16))
    before, scales = None, []
    for i, batch in enumerate(data):
        plant.factor.fill_(float("inf") if i == overflow_at else 1.0)
        if i == overflow_at:
            before = {k: v.clone() for k, v in model.state_dict().items()}
        steps.runner([batch], batch.num_examples)
        steps.scheduler.step()
        scales.append(steps.scaler.get_scale())
        if i == overflow_at:
            after = model.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before), "the overflowing step changed weights"
    return model, scales, steps


def reference(data, overflow_at: int, lr=1e-3, clip=0.5) -> torch.nn.Module:
    """torch's AMP recipe, written as its docs write it, with the same AdamW groups and schedule."""
    model = tiny()
    plant = Plant(model)
    optimizer = engine.build_optimizer(model, lr=lr, weight_decay=0.01, fused=True)
    scheduler = engine.build_scheduler(optimizer, total_steps=len(data), warmup_ratio=0.25)
    scaler = torch.amp.GradScaler("cpu")
    for i, batch in enumerate(data):
        plant.factor.fill_(float("inf") if i == overflow_at else 1.0)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(**batch.inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), batch.labels, reduction="sum") / batch.num_examples
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
    return model


def test_fp16_steps_are_torchs_amp_recipe_and_a_planted_overflow_skips_exactly_its_step():
    data = batches(6)
    model, scales, steps = ours(data, overflow_at=2)
    ref = reference(data, overflow_at=2)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name
    # the scale halves at the overflow and only there; AdamW took 5 of the 6 steps
    assert scales == [65536.0, 65536.0, 32768.0, 32768.0, 32768.0, 32768.0]
    assert "scale 32768 at the end; 1 of 6 optimizer steps skipped" in steps.runner.summary()
    # a different run is told apart: no overflow (one more step taken), half the learning rate, no clipping
    for other in (ours(data, overflow_at=-1)[0], ours(data, overflow_at=2, lr=5e-4)[0],
                  ours(data, overflow_at=2, clip=0.0)[0]):
        assert max((a - b).abs().max().item() for a, b in zip(other.state_dict().values(),
                                                                 ref.state_dict().values())) > 1e-4


def clipped_run(data, *, fold: bool, device="cpu", lr=1e-3, clip=0.05) -> tuple:
    """Our step with the fused AdamW (``fold``: clipping folded into its pass), or torch's own recipe:
    clip_grad_norm_, then the unfused AdamW. Returns the model, and the norms torch's clipping saw (ours: its
    optimizer)."""
    model = tiny().to(device)
    optimizer = engine.build_optimizer(model, lr=lr, weight_decay=0.01, fused=fold)
    scheduler = engine.build_scheduler(optimizer, total_steps=len(data), warmup_ratio=0.25)
    sc = StepContext(model, optimizer, scheduler, SingleLabelClassification(["a", "b"]), None, clip,
                     ProcessContext(0, 0, 1, torch.device(device)))
    assert folds_clipping(sc) == fold
    norms = []
    for batch in data:
        batch = batch.to(torch.device(device))
        if fold:
            train_step(sc, [batch], batch.num_examples)
        else:
            optimizer.zero_grad()
            logits = model(**batch.inputs).logits
            loss = torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum") / batch.num_examples
            loss.backward()
            if clip > 0:
                norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
            optimizer.step()
        scheduler.step()
    return model, optimizer if fold else norms


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_clipping_folded_into_the_fused_adamw_trains_as_clip_grad_norm_then_adamw(device):
    data = batches(10)
    for clip in (0.05, 0.4):  # the clipping acts at every step; at some steps only (the clamp at 1 matters)
        ref, norms = clipped_run(data, fold=False, device=device, clip=clip)
        clipped = sum(n > clip for n in norms)
        assert clipped == len(data) if clip == 0.05 else 0 < clipped < len(data), norms
        ours, optimizer = clipped_run(data, fold=True, device=device, clip=clip)
        assert _max_diff(ours, ref) < 1e-6
        assert not hasattr(optimizer, "grad_scale")  # nothing left for a later step, or a checkpoint, to see
        # told apart: no clipping, half the learning rate
        for other in (clipped_run(data, fold=True, device=device, clip=0.0)[0],
                      clipped_run(data, fold=True, device=device, lr=5e-4, clip=clip)[0]):
            assert _max_diff(other, ref) > 1e-4


def test_an_fp16_step_that_failed_after_unscaling_runs_again(monkeypatch):
    """Running out of memory in the clipping (after the gradients were unscaled): the graphs' runner runs such a
    step again, which GradScaler would refuse ('unscale_() has already been called') had the step not been
    forgotten. The step, an overflowing one, then counts once and halves the scale once."""
    data = batches(2)
    model, _, steps = ours(data[:1], overflow_at=-1)
    model.classifier.weight.register_hook(lambda grad: grad * float("inf"))  # the retried step overflows
    real, failed = torch.nn.utils.clip_grad_norm_, []

    def fail_once(*args, **kwargs):
        if not failed:
            failed.append(True)
            raise torch.OutOfMemoryError("simulated")
        return real(*args, **kwargs)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", fail_once)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(torch.OutOfMemoryError):
        steps.runner([data[1]], data[1].num_examples)
    assert not hasattr(steps.optimizer, "found_inf")
    out = steps.runner([data[1]], data[1].num_examples)
    assert failed and out.applied and steps.scaler.get_scale() == 32768.0 and int(steps.scaler.overflows) == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # skipped: nothing moved


def test_precision_auto_and_the_refusals():
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "auto") is None and autocast_dtype(cpu, "fp16") is torch.float16
    assert autocast_dtype(cpu, "bf16") is torch.bfloat16 and autocast_dtype(cpu, "fp32") is None
    if torch.cuda.is_available():
        native = torch.cuda.get_device_capability() >= (8, 0)
        assert autocast_dtype(torch.device("cuda"), "auto") is (torch.bfloat16 if native else torch.float16)
        if not native:
            with pytest.raises(UserError, match="no native bfloat16"):
                autocast_dtype(torch.device("cuda"), "bf16")


def _steps(run: Path) -> list:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == "step"]


def test_fp16_run_with_an_overflow_resumes_exactly_with_its_loss_scale(tmp_path, run_main, monkeypatch):
    """The CLI, fp16 on the CPU: the overflow at the third step is skipped; stopped by SIGTERM after step 4 (a
    process of its own) and resumed, the run ends with the uninterrupted run's weights, losses, loss scale and
    skip count (a scale not restored would start again at 65536; a count not restored would say 0). The
    resumed and uninterrupted runs run in this process, and the stopped one with its thread count: compared
    to 1e-6."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE + OVERFLOW_HOOK)
    model = make_tiny_bert(tmp_path / "model")
    write_rows(tmp_path / "train.csv", synthetic_rows(48, seed=3))
    write_rows(tmp_path / "val.csv", synthetic_rows(16, seed=4))
    common = ["--model", model, "--train_file", tmp_path / "train.csv", "--validation_file", tmp_path / "val.csv",
              "--epochs", 2, "--batch_size", 16, "--learning_rate", 1e-3, "--max_length", 32, "--log_every", 1,
              "--precision", "fp16", "--checkpoint_dir", tmp_path, "--cache_dir", tmp_path / "cache"]
    stopped = run_script("train_single.py", *common, "--run_name", "a",
                         env=env_with(hooks, STOP_AT_STEP=4, OVERFLOW_AT_CALL=3,
                                      OMP_NUM_THREADS=torch.get_num_threads()))  # this process's threads
    assert stopped.returncode == 143, stopped.stderr
    assert "precision fp16 autocast with loss scaling" in stopped.stdout
    assert "note: fp16 on the CPU runs far slower than fp32" in stopped.stdout
    resumed = run_main("train_single.py", *common, "--run_name", "a", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    namespace = {}
    exec(OVERFLOW_HOOK.replace('os.environ.get("OVERFLOW_AT_CALL")', "True").replace(
        'os.environ["OVERFLOW_AT_CALL"]', '"3"').replace("torch.nn.CrossEntropyLoss.forward = forward", ""), namespace)
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", namespace["forward"])  # the hook, in this process
    straight = run_main("train_single.py", *common, "--run_name", "b")
    assert straight.returncode == 0, straight.stderr
    said = "fp16 loss scaling: scale 32768 at the end; 1 of 6 optimizer steps skipped for overflowing gradients"
    assert said in straight.stdout and said in resumed.stdout, (straight.stdout, resumed.stdout)
    a, b = (load_file(tmp_path / r / "final" / "model.safetensors") for r in "ab")
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    la, lb = ([r["loss"] for r in _steps(tmp_path / r)] for r in "ab")
    assert len(la) == len(lb) == 6
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["precision"] == "fp16"


def test_the_regional_compile_finds_each_encoders_layer_stack_and_keeps_its_cache_where_asked(tmp_path, monkeypatch):
    """What --compile on compiles: the repeated layer of BERT, DistilBERT and RoBERTa, each layer in place (the
    state dict's names unchanged, so checkpoints load as before); the whole model where there is no stack. The
    compiled code goes to the run's cache unless TORCHINDUCTOR_CACHE_DIR says otherwise. (Running it: the GPU
    tests.)"""
    import transformers
    from encoderfit.engine.loop import compile_cache, compile_model, repeated_layers
    small = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=100,
                 max_position_embeddings=40)
    for config, where in ((transformers.BertConfig(num_hidden_layers=3, **small), "bert.encoder.layer"),
                          (transformers.RobertaConfig(num_hidden_layers=3, **small), "roberta.encoder.layer"),
                          (transformers.DistilBertConfig(n_layers=3, dim=32, n_heads=2, hidden_dim=64, vocab_size=100,
                                                         max_position_embeddings=40), "distilbert.transformer.layer")):
        model = transformers.AutoModelForSequenceClassification.from_config(config)
        names = list(model.state_dict())
        found = repeated_layers(model)
        assert found is model.get_submodule(where) and len(found) == 3
        assert compile_model(model, "regional") is model and list(model.state_dict()) == names
        assert all(layer._compiled_call_impl is not None for layer in found)
        assert all(m._compiled_call_impl is None for m in model.modules() if all(m is not x for x in found))
    flat = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())  # no layer stack: compiled whole
    assert repeated_layers(flat) is None and compile_model(flat, "regional") is not flat
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    monkeypatch.setenv("TRITON_CACHE_DIR", "")  # whatever was there comes back after the test
    monkeypatch.delenv("TRITON_CACHE_DIR")
    # torch's own default, which importing torch._dynamo writes into the environment, is not the user's choice
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert compile_cache(tmp_path / "cache" / "compile") == str(tmp_path / "cache" / "compile")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "cache" / "compile" / "triton")
    # a later run of this process (a sweep's next trial, a notebook's next fit) uses its own cache
    assert compile_cache(tmp_path / "next") == str(tmp_path / "next")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "next" / "triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "my-triton"))  # the user's own: kept
    compile_cache(tmp_path / "third")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "my-triton")
    # what Inductor itself wrote under its default directory is torch's choice, not the user's
    monkeypatch.setenv("TRITON_CACHE_DIR", os.path.join(default_cache_dir(), "triton", "0"))
    compile_cache(tmp_path / "fourth")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "fourth" / "triton")
    # the user's own Inductor directory after a run of ours: Triton's follows it, not ours
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "users"))
    assert compile_cache(tmp_path / "fifth") == str(tmp_path / "users") and "TRITON_CACHE_DIR" not in os.environ
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache(tmp_path / "other") == str(tmp_path / "mine")


def test_a_model_without_a_layer_stack_is_not_compiled_by_auto_and_compiled_whole_when_asked():
    from encoderfit.config import TrainConfig
    from encoderfit.engine.distributed import ProcessContext
    from encoderfit.run.trainer import fit_compile
    cpu = ProcessContext(0, 0, 1, torch.device("cpu"))
    flat, stacked = torch.nn.Sequential(torch.nn.Linear(4, 4)), tiny()
    assert fit_compile("regional", TrainConfig(compile="auto"), flat, cpu) == "off"
    assert fit_compile("regional", TrainConfig(compile="on"), flat, cpu) == "whole"
    assert fit_compile("regional", TrainConfig(compile="on"), stacked, cpu) == "regional"
    assert fit_compile("whole", TrainConfig(compile="whole"), flat, cpu) == "whole"
    assert fit_compile("off", TrainConfig(compile="off"), stacked, cpu) == "off"


def test_a_batch_crosses_processes_by_value_and_arrives_the_same(tmp_path):
    """Loader workers send batches pickled as numpy arrays (cheaper than torch's shared-memory handles for
    small tensors): what arrives equals what was sent, dtypes, shapes, None fields and all, and a tensor that
    needs gradients pickles as torch's own does."""
    import pickle
    sent = Batch({"input_ids": torch.arange(12).view(3, 4), "attention_mask": torch.ones(3, 4, dtype=torch.long)},
                 torch.tensor([0.5, 1.0, 2.0]), 3, 11, docs=torch.tensor([0, 0, 1]), max_length=7)
    got = pickle.loads(pickle.dumps(sent))
    assert got.key == sent.key and (got.num_examples, got.num_tokens, got.max_length) == (3, 11, 7)
    assert all(torch.equal(a, b) for a, b in zip(got.tensors().values(), sent.tensors().values()))
    assert torch.equal(got.docs, sent.docs)
    assert b"numpy" in pickle.dumps(sent) and b"_batch_of_arrays" in pickle.dumps(sent)
    bare = pickle.loads(pickle.dumps(Batch({"input_ids": torch.ones(2, 3, dtype=torch.long)}, None, 2, 6)))
    assert bare.labels is None and bare.docs is None and bare.inputs["input_ids"].dtype == torch.long
    half = Batch({"x": torch.ones(2, dtype=torch.bfloat16)}, None, 2, 2)  # numpy has no bf16: torch's pickling
    assert pickle.loads(pickle.dumps(half)).inputs["x"].dtype == torch.bfloat16
    grad = Batch({"x": torch.ones(2, requires_grad=True)}, None, 2, 2)
    assert b"_batch_of_arrays" not in pickle.dumps(grad) and pickle.loads(pickle.dumps(grad)).inputs["x"].requires_grad
    # through a DataLoader with worker processes: the same batches as in-process
    from torch.utils.data import DataLoader
    rows = [sent] * 4
    through = list(DataLoader(rows, batch_size=None, num_workers=2))
    assert all(b.key == sent.key and torch.equal(b.inputs["input_ids"], sent.inputs["input_ids"]) for b in through)
