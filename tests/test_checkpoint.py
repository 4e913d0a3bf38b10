import math
import threading

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from encoderfit.run import checkpoint
from encoderfit.engine.loop import build_optimizer, build_scheduler
from encoderfit.modeling.model import load_model
from encoderfit.tasks.single_label import SingleLabelClassification


def _save(tmp_path, tiny_model_dir, name="ck"):
    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir), SingleLabelClassification(["neg", "pos", "mixed"]))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.01, fused=False)
    sched = build_scheduler(opt, total_steps=10, warmup_ratio=0.1)
    loop = {"epoch": 1, "global_step": 3, "next_batch": 3}
    run = {"config": {"lr": 1e-3}, "world_size": 1, "label_names": ["neg", "pos", "mixed"], "tokenizer": {}}
    state = checkpoint.training_state(opt, sched, loop=loop, rng=[checkpoint.rng_state()], run=run)
    return model, tok, checkpoint.save_checkpoint(tmp_path / name, model, tok, state)


def test_round_trip_gives_identical_logits_and_label_names(tmp_path, tiny_model_dir):
    model, tok, path = _save(tmp_path, tiny_model_dir)
    batch = tok(["a great film", "dull and long, very long"], padding=True, return_tensors="pt")
    model.eval()
    reloaded = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)
    assert reloaded.config.id2label == {0: "neg", 1: "pos", 2: "mixed"}
    assert reloaded.config.problem_type == "single_label_classification"  # pipeline() decodes with softmax
    assert (path / "model.safetensors").is_file()
    state = checkpoint.verify_checkpoint(path)
    assert state["global_step"] == 3 and state["config"] == {"lr": 1e-3} and state["loop"]["next_batch"] == 3
    assert "state" in state["optimizer"] and state["scheduler"]["last_epoch"] == 0


def test_pipeline_loads_the_checkpoint(tmp_path, tiny_model_dir):
    _, _, path = _save(tmp_path, tiny_model_dir)
    out = pipeline("text-classification", model=str(path), device="cpu")(["what a film"])
    assert out[0]["label"] in {"neg", "pos", "mixed"} and 0 < out[0]["score"] <= 1


def test_overwrite_is_atomic_and_leaves_no_temporaries(tmp_path, tiny_model_dir):
    _save(tmp_path, tiny_model_dir)
    _save(tmp_path, tiny_model_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_unwrap_strips_wrappers(tiny_model_dir):
    model = load_model(str(tiny_model_dir), SingleLabelClassification(["a", "b"]))

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    assert checkpoint.unwrap(Wrapper(Wrapper(model))) is model


def test_rng_state_round_trip_replays_the_same_numbers():
    import random
    checkpoint.set_rng_state(checkpoint.rng_state())
    saved = checkpoint.rng_state()
    first = (random.random(), torch.rand(3).tolist())
    checkpoint.set_rng_state(saved)
    assert (random.random(), torch.rand(3).tolist()) == first


def test_only_the_newest_step_checkpoints_are_kept(tmp_path, tiny_model_dir):
    from encoderfit.engine.distributed import ProcessContext
    model, tok, _ = _save(tmp_path, tiny_model_dir)
    writer = checkpoint.CheckpointWriter(tmp_path / "run", ProcessContext(0, 0, 1, torch.device("cpu")), keep=2)
    for step in (2, 4, 6):
        writer.save_step(model, tok, {"global_step": step})
    writer.wait()
    assert [p.name for p in checkpoint.step_checkpoints(tmp_path / "run")] == ["step-00000006", "step-00000004"]


def test_tools_find_the_training_max_length_for_step_checkpoints_too(tmp_path):
    import json
    from encoderfit.serve.inference import trained_max_length
    run = tmp_path / "run"
    for sub in ("final", "checkpoints/step-00000004"):
        (run / sub).mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": {"max_length": 77}}))
    assert trained_max_length(run / "final") == 77
    assert trained_max_length(run / "checkpoints" / "step-00000004") == 77


def _writer(tmp_path, keep=3):
    from encoderfit.engine.distributed import ProcessContext
    return checkpoint.CheckpointWriter(tmp_path / "run", ProcessContext(0, 0, 1, torch.device("cpu")), keep=keep)


def test_best_and_final_share_the_step_checkpoints_weights_and_hold_no_training_state(tmp_path, tiny_model_dir):
    model, tok, _ = _save(tmp_path, tiny_model_dir)
    writer = _writer(tmp_path)
    step = writer.save_step(model, tok, {"global_step": 4, "optimizer": {"big": 1}, "loop": {}})
    best = writer.save_model("best", model, tok, step=4)
    writer.wait()
    assert not (best / checkpoint.TRAINING_STATE).exists()
    assert sorted(p.name for p in best.iterdir()) == sorted(p.name for p in step.iterdir() if p.name !=
                                                            checkpoint.TRAINING_STATE)
    assert (best / "model.safetensors").stat().st_ino == (step / "model.safetensors").stat().st_ino
    with torch.no_grad():  # weights of another step: written, not linked
        next(model.parameters()).add_(1.0)
    final = writer.save_model("final", model, tok, step=5)
    assert (final / "model.safetensors").stat().st_nlink == 1
    reloaded = AutoModelForSequenceClassification.from_pretrained(final)
    assert torch.equal(next(reloaded.parameters()), next(model.parameters()))


def test_without_hard_links_the_files_are_copied(tmp_path, tiny_model_dir, monkeypatch):
    model, tok, _ = _save(tmp_path, tiny_model_dir)
    writer = _writer(tmp_path)
    step = writer.save_step(model, tok, {"global_step": 4})

    def no_links(*_):
        raise OSError(95, "Operation not supported")
    monkeypatch.setattr(checkpoint.os, "link", no_links)
    best = writer.save_model("best", model, tok, step=4)
    writer.wait()
    assert (best / "model.safetensors").stat().st_nlink == 1
    assert (best / "model.safetensors").read_bytes() == (step / "model.safetensors").read_bytes()


def test_a_finished_run_keeps_one_step_checkpoint_without_optimizer_state(tmp_path, tiny_model_dir):
    model, tok, _ = _save(tmp_path, tiny_model_dir)
    writer = _writer(tmp_path)
    for step in (2, 4, 6):
        writer.save_step(model, tok, {"global_step": step, "optimizer": {"big": 1}, "scheduler": {}, "loop": {}})
    writer.save_model("final", model, tok, step=6)
    writer.finish({"global_step": 6, "optimizer": {"big": 2}, "scheduler": {}, "loop": {"epoch": 3}})
    (kept,) = checkpoint.step_checkpoints(tmp_path / "run")
    assert kept.name == "step-00000006"
    state = checkpoint.load_training_state(kept)
    assert state == {"global_step": 6, "loop": {"epoch": 3}, "finished": True}
    assert not [p for p in kept.iterdir() if p.name.startswith(".")]  # no temporary left
    assert (kept / "model.safetensors").stat().st_ino == (tmp_path / "run" / "final" / "model.safetensors").stat().st_ino


def test_a_step_checkpoint_holds_the_state_it_was_asked_for_while_training_changes_it(tmp_path, tiny_model_dir,
                                                                                   monkeypatch):
    """Finished on the writer thread: what lands is the state at the call (model, optimizer moments, sums),
    not what the training thread has made of it since; and it is visible only once whole."""
    model, tok, _ = _save(tmp_path, tiny_model_dir)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0, fused=False)
    next(model.parameters()).sum().backward()
    opt.step()
    sums = torch.ones(3)
    state = {"global_step": 7, "optimizer": opt.state_dict(), "loop": {"sums": sums, "results": [{"epoch": 1}]}}
    want_moment = {k: v["exp_avg"].clone() for k, v in opt.state_dict()["state"].items()}
    want_weight = next(model.parameters()).detach().clone()
    writer = _writer(tmp_path)
    release = threading.Event()
    real_save_state = checkpoint._save_state
    monkeypatch.setattr(checkpoint, "_save_state", lambda tmp, st: (release.wait(10), real_save_state(tmp, st)))
    path = writer.save_step(model, tok, state)
    assert not path.exists()  # not visible before it is whole
    with torch.no_grad():  # training goes on: everything changes in place
        next(model.parameters()).add_(1.0)
    opt.step()
    sums.add_(5)
    state["loop"]["results"].append({"epoch": 2})
    release.set()
    writer.wait()
    saved = checkpoint.load_training_state(path)
    assert torch.equal(saved["loop"]["sums"], torch.ones(3)) and saved["loop"]["results"] == [{"epoch": 1}]
    for k, moment in want_moment.items():
        assert torch.equal(saved["optimizer"]["state"][k]["exp_avg"], moment)
    reloaded = AutoModelForSequenceClassification.from_pretrained(path)
    assert torch.equal(next(reloaded.parameters()), want_weight)


def test_a_failed_write_is_raised_by_wait_and_drops_what_was_queued_behind_it(tmp_path, tiny_model_dir,
                                                                               monkeypatch):
    model, tok, _ = _save(tmp_path, tiny_model_dir)
    writer = _writer(tmp_path, keep=1)  # keep one: the older checkpoint goes only once the new one is whole
    writer.save_step(model, tok, {"global_step": 2})
    writer.wait()

    def full(*_):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "_save_state", full)
    writer.save_step(model, tok, {"global_step": 4})
    writer.save_model("best", model, tok, step=4)  # links to a checkpoint that will not exist: dropped
    with pytest.raises(OSError, match="No space left"):
        writer.wait()
    run = tmp_path / "run"
    assert [p.name for p in checkpoint.step_checkpoints(run)] == ["step-00000002"]  # the older one kept
    assert not (run / "best").exists() and not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    writer.wait()  # raised once; the writer is usable again
    monkeypatch.undo()
    writer.save_step(model, tok, {"global_step": 6})
    writer.wait()
    assert [p.name for p in checkpoint.step_checkpoints(run)] == ["step-00000006"]


def test_a_cancelled_write_leaves_the_checkpoint_before_it_and_nothing_half_written(tmp_path, tiny_model_dir,
                                                                                    monkeypatch):
    """A second Ctrl-C: the run stops at once, dropping the step checkpoint not yet committed."""
    model, tok, _ = _save(tmp_path, tiny_model_dir)
    writer = _writer(tmp_path, keep=1)
    writer.save_step(model, tok, {"global_step": 2})
    writer.wait()
    started, release = threading.Event(), threading.Event()
    real_save_state = checkpoint._save_state
    monkeypatch.setattr(checkpoint, "_save_state",
                        lambda tmp, st: (started.set(), release.wait(10), real_save_state(tmp, st)))
    writer.save_step(model, tok, {"global_step": 4})
    writer.save_model("best", model, tok, step=4)
    assert started.wait(10)
    threading.Timer(0.2, release.set).start()  # the interrupt arrives while the state is being written
    writer.settle(raising=False, cancel=True)
    run = tmp_path / "run"
    assert [p.name for p in checkpoint.step_checkpoints(run)] == ["step-00000002"]
    assert not (run / "best").exists() and not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    writer.save_step(model, tok, {"global_step": 6})  # the writer works again afterwards
    writer.wait()
    assert [p.name for p in checkpoint.step_checkpoints(run)] == ["step-00000006"]


def test_a_write_cancelled_before_it_starts_leaves_no_temporary(tmp_path, tiny_model_dir, monkeypatch):
    model, tok, _ = _save(tmp_path, tiny_model_dir)
    writer = _writer(tmp_path)
    real_save_model = checkpoint._save_model

    def then_interrupted(*args):  # the second Ctrl-C lands just after the model's files, before the thread starts
        real_save_model(*args)
        writer._cancel.set()
    monkeypatch.setattr(checkpoint, "_save_model", then_interrupted)
    writer.save_step(model, tok, {"global_step": 2})
    writer.settle(raising=False, cancel=True)
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())
    assert not writer._cancel.is_set()  # cleared once drained


def test_the_host_copy_is_a_copy_of_every_container_and_tensor():
    from collections import namedtuple
    Pair = namedtuple("Pair", "a b")
    t = torch.ones(2)
    obj = {"x": [t, t], "p": Pair(t, 3), "n": (1, "s")}
    got = checkpoint.to_host(obj)
    t.add_(1)
    assert torch.equal(got["x"][0], torch.ones(2)) and got["x"][0] is got["x"][1]  # one tensor, copied once
    assert isinstance(got["p"], Pair) and torch.equal(got["p"].a, torch.ones(2)) and got["p"].b == 3
    assert got["n"] == (1, "s") and got["x"] is not obj["x"]


def test_the_schedule_is_transformers_linear_warmup_and_decay_and_resumes_from_its_state():
    from transformers import get_linear_schedule_with_warmup

    def rates(sched, steps):
        out = []
        for _ in range(steps):
            out.append(sched.get_last_lr()[0])
            sched.optimizer.step()
            sched.step()
        return out

    def optimizer():
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=3e-5)

    for total, ratio in [(30, 0.06), (7, 0.0), (100, 0.5), (10, 0.99), (1, 0.0)]:
        ours = build_scheduler(optimizer(), total_steps=total, warmup_ratio=ratio)
        theirs = get_linear_schedule_with_warmup(optimizer(), math.ceil(total * ratio), total)
        assert rates(ours, total + 2) == rates(theirs, total + 2), (total, ratio)
    # a checkpoint's scheduler state carries on where it stopped
    a = build_scheduler(optimizer(), total_steps=20, warmup_ratio=0.25)
    rates(a, 8)
    b = build_scheduler(optimizer(), total_steps=20, warmup_ratio=0.25)
    b.load_state_dict(a.state_dict())
    assert rates(b, 12) == rates(a, 12) and rates(b, 1) == [0.0]


def test_weight_decay_spares_exactly_the_parameters_transformers_trainer_spares():
    """AdamW's groups: weight decay on the weights Hugging Face Trainer decays, none on biases and LayerNorm
    weights (Trainer's own rule as the reference), with the given values."""
    from transformers import BertConfig, BertForSequenceClassification, Trainer

    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=32,
                                                     max_position_embeddings=32, num_labels=3))
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05, fused=False)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    spared = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    reference = set(Trainer.get_decay_parameter_names(None, model))
    assert decayed == reference and spared == set(names.values()) - reference
    assert any("LayerNorm.weight" in n for n in spared) and any(n.endswith(".bias") for n in spared)
    assert all(g["lr"] == 1e-3 for g in optimizer.param_groups)
