"""CUDA graphs of whole training steps give the same training as eager steps (needs a CUDA GPU)."""
import copy
import warnings

import pytest
import torch

from encoderfit.engine import loop as engine
from encoderfit.data.batches import Batch
from encoderfit.engine.distributed import ProcessContext
from encoderfit.engine.graphs import StepGraphs
from encoderfit.run.runlog import RunLogger
from encoderfit.engine.step import EagerSteps, StepContext, new_scaler
from encoderfit.tasks.single_label import SingleLabelClassification

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")]


class Batches:
    """Fixed host batches of a few shapes, each shape more than twice, served by a DataLoader with
    worker processes and a pin-memory thread (which calls CUDA while a graph is being recorded)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(torch.utils.data.DataLoader(self.batches, batch_size=None, num_workers=2, pin_memory=True))


def _batches(n_steps: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n_steps):
        # shapes A B C A B C A B C D A B D C A: D first comes once graphs exist
        size, length = [(8, 32), (8, 64), (5, 32), (4, 96)][int("012012012301231"[i % 15])]
        ids = torch.randint(5, vocab, (size, length), generator=g)
        mask = torch.ones(size, length, dtype=torch.long)
        for row in range(size):  # real padding inside the batch
            cut = int(torch.randint(length // 2, length + 1, (1,), generator=g))
            ids[row, cut:], mask[row, cut:] = 0, 0
        inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        out.append(Batch(inputs, torch.randint(0, 3, (size,), generator=g), size, int(mask.sum())))
    return out


def _train(model, batches, *, graphs: bool, amp, fail_once=None):
    device = torch.device("cuda")
    ctx = ProcessContext(0, 0, 1, device)
    optimizer = engine.build_optimizer(model, lr=1e-3, weight_decay=0.01, fused=device.type == "cuda")
    scheduler = engine.build_scheduler(optimizer, total_steps=len(batches), warmup_ratio=0.3)
    task = SingleLabelClassification(["a", "b", "c"])
    sc = StepContext(model, optimizer, scheduler, task, amp, 0.5, ctx)
    steps = StepGraphs(sc) if graphs else EagerSteps(sc)
    if fail_once is not None:
        fail_once(steps)
    state = engine.LoopState()
    state.start_sums(task, device)
    engine.train_epoch(steps, Batches(batches), engine.LoopConfig(epochs=1, log_every=4), state, engine.Hooks(),
                       RunLogger(None, ctx, show_progress=False))
    return state, steps


def _before_each_step(steps, check):
    """Runs ``check()`` at the start of each of ``steps``'s steps, eager or recorded: it may raise."""
    step = steps._run

    def checked_step(batch, normalizer):
        check()
        return step(batch, normalizer)
    steps._run = checked_step


def _simulated_out_of_memory():
    raise torch.OutOfMemoryError("CUDA out of memory (simulated)")


def _out_of_memory_once(steps):
    """The first eager step of a new shape after some graphs exist runs out of memory, before doing anything."""
    failed = []

    def check():
        if steps.graphs and not failed and not torch.cuda.is_current_stream_capturing():
            failed.append(True)
            _simulated_out_of_memory()
    _before_each_step(steps, check)


def _out_of_memory_while_recording(steps):
    """The second recording runs out of memory (the capture itself stays valid)."""
    failed = []

    def check():
        if steps.graphs and not failed and torch.cuda.is_current_stream_capturing():
            failed.append(True)
            _simulated_out_of_memory()
    _before_each_step(steps, check)


def _out_of_memory_always(steps):
    """Every step, eager or recorded, runs out of memory while some graph is held."""
    _before_each_step(steps, lambda: steps.graphs and _simulated_out_of_memory())


def _host_sync_in_step(steps):
    """A step that synchronizes with the host cannot be recorded (the capture is invalidated)."""
    _before_each_step(steps, torch.cuda.synchronize)


def _error_while_recording(steps):
    """The step raises while it is being recorded (the capture ends cleanly, with an error)."""
    def check():
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("simulated failure inside the recording")
    _before_each_step(steps, check)


def _chained(steps):
    """In one process: an eager out-of-memory, then one while recording, then a step that cannot be recorded."""
    calls = {"eager": 0, "recording": 0, "released": 0}

    def check():
        capturing = torch.cuda.is_current_stream_capturing()
        if steps.graphs and not capturing and calls["eager"] == 0:
            calls["eager"] += 1
            _simulated_out_of_memory()
        if steps.graphs and capturing and calls["eager"] and calls["recording"] == 0:
            calls["recording"] += 1
            _simulated_out_of_memory()
        if steps.releases == 2 and capturing:
            torch.cuda.synchronize()
    _before_each_step(steps, check)


def _tiny_bert(dropout: float = 0.0):
    from transformers import BertConfig, BertForSequenceClassification
    config = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128, num_labels=3,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(0)
    return BertForSequenceClassification(config).cuda()


@pytest.mark.parametrize("amp, fail_once", [(None, None), (torch.bfloat16, None), (None, _out_of_memory_once),
                                            (None, _host_sync_in_step)])
def test_graphed_steps_train_like_eager_steps(amp, fail_once):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    base = _tiny_bert()
    batches = _batches(15, base.config.vocab_size)
    eager_model, graphed_model = copy.deepcopy(base), copy.deepcopy(base)
    eager, _ = _train(eager_model, batches, graphs=False, amp=amp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graphed, steps = _train(graphed_model, batches, graphs=True, amp=amp, fail_once=fail_once)
    # four shapes, each recorded on its second batch; after running out of memory (at D's first batch),
    # all are dropped and recorded again when next seen
    if fail_once is _host_sync_in_step:  # given up at the first recording: every step eager
        assert steps.recorded == 0 and steps.releases == 0
        # the cause, not the error that ending the spoiled recording raises on top of it
        assert "cannot be recorded" in steps.given_up and "previous error" not in steps.given_up
    else:
        assert steps.recorded == 4
        assert steps.releases == (1 if fail_once else 0) and steps.given_up is None
    assert graphed.global_step == eager.global_step == 15
    tol = 1e-4 if amp is None else 2e-2
    torch.testing.assert_close(graphed.epoch_sums, eager.epoch_sums, rtol=tol, atol=tol)
    moved = 0.0
    for (name, p), q, b in zip(graphed_model.named_parameters(), eager_model.parameters(), base.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=name)
        moved = max(moved, (p - b).abs().max().item())
    assert moved > 1e-3  # the replays really trained the model (lr 1e-3 for 15 steps)


def test_graphed_steps_use_dropout_afresh_each_replay():
    """With dropout on, two replays of one graph on the same batch give different losses."""
    model = _tiny_bert(dropout=0.3)
    device = torch.device("cuda")
    optimizer = engine.build_optimizer(model, lr=0.0, weight_decay=0.0, fused=device.type == "cuda")  # weights stay put
    scheduler = engine.build_scheduler(optimizer, total_steps=10, warmup_ratio=0.0)
    task = SingleLabelClassification(["a", "b", "c"])
    steps = StepGraphs(StepContext(model, optimizer, scheduler, task, None, 1.0, ProcessContext(0, 0, 1, device)))
    batch = _batches(1, model.config.vocab_size)[0]
    model.train()
    losses = [steps([batch], batch.num_examples).loss_sum.item() for _ in range(4)]  # eager, record+replay, 2 replays
    assert steps.recorded == 1
    assert len(set(losses[1:])) == 3, losses


@pytest.mark.parametrize("failure, given_up", [(_host_sync_in_step, True), (_error_while_recording, True),
                                               (_out_of_memory_while_recording, False), (_out_of_memory_once, False),
                                               (_chained, True)])
def test_a_model_with_dropout_trains_on_after_a_failed_recording(failure, given_up):
    """Each kind of failure, and all of them in turn in one process, with dropout on: training goes on
    (the aborted capture's CUDA generator state is undone), and afterwards a new recording with dropout
    works in the same process."""
    model = _tiny_bert(dropout=0.1)
    base = copy.deepcopy(model)
    batches = _batches(30, model.config.vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state, steps = _train(model, batches, graphs=True, amp=torch.bfloat16, fail_once=failure)
    assert state.global_step == 30
    assert torch.isfinite(state.epoch_sums).all() and state.epoch_sums[2] == sum(b.num_examples for b in batches)
    assert (steps.given_up is not None) == given_up, steps.given_up
    if not given_up:
        assert steps.releases == 1 and steps.recorded == 4
    if failure is _chained:
        assert steps.releases == 2 and "cannot be recorded" in steps.given_up
    moved = max((p - b).abs().max().item() for p, b in zip(model.parameters(), base.parameters()))
    assert moved > 1e-3
    # the process is healthy: a fresh set of graphs records and replays a dropout model
    fresh, again = _train(_tiny_bert(dropout=0.1), batches[:9], graphs=True, amp=None)
    assert again.recorded == 3 and again.given_up is None and fresh.global_step == 9


def test_graphs_are_given_up_after_running_out_of_memory_three_times():
    """Memory too tight for more than one graph: after three releases, training goes on eagerly.

    A B C A B C A B C: A recorded at step 4; B's recording fails (release 1) and B runs eagerly; C
    recorded; A fails (release 2); B recorded; C fails (release 3): given up from step 9 on."""
    model = _tiny_bert()
    batches = _batches(30, model.config.vocab_size)
    with pytest.warns(UserWarning, match="CUDA graphs given up"):
        state, steps = _train(model, batches, graphs=True, amp=None, fail_once=_out_of_memory_always)
    assert steps.releases == 3 and steps.recorded == 0
    assert "out of memory" in steps.given_up
    assert state.global_step == 30
    assert "given up" in steps.summary()


def test_fp16_graphed_steps_skip_a_planted_overflow_like_eager_steps():
    """fp16 with loss scaling recorded in the graphs: the scale, its growth tracker and the found-inf flag are
    device tensors the replays update. An overflow planted in a replayed step (and one in an eager first step)
    is skipped there alone, in both runners, and both runs end with the same weights and scale."""
    torch.backends.cuda.matmul.allow_tf32 = False
    base = _tiny_bert()
    batches = _batches(15, base.config.vocab_size)
    planted = {7, 9}  # step 9 (shape D's first batch) runs eagerly in the graphed run; step 7 replays B

    def run(graphs: bool):
        model = copy.deepcopy(base)
        factor = torch.ones((), device="cuda")
        model.classifier.weight.register_hook(lambda grad: grad * factor)
        device = torch.device("cuda")
        optimizer = engine.build_optimizer(model, lr=1e-3, weight_decay=0.01, fused=True)
        # no warm-up: at a learning rate of 0 a step that is not skipped would leave the weights as they were too
        scheduler = engine.build_scheduler(optimizer, total_steps=len(batches), warmup_ratio=0.0)
        sc = StepContext(model, optimizer, scheduler, SingleLabelClassification(["a", "b", "c"]), torch.float16,
                         0.5, ProcessContext(0, 0, 1, device), scaler=new_scaler(device))
        steps = StepGraphs(sc) if graphs else EagerSteps(sc)
        unchanged, scales = [], []
        for i, batch in enumerate(batches):
            factor.fill_(float("inf") if i in planted else 1.0)  # on the device: the replay reads it
            before = [p.detach().clone() for p in model.parameters()]
            steps([batch], batch.num_examples)
            scheduler.step()
            unchanged.append(all(torch.equal(a, p) for a, p in zip(before, model.parameters())))
            scales.append(sc.scaler.get_scale())
        return model, steps, unchanged, scales

    eager_model, _, eager_unchanged, eager_scales = run(graphs=False)
    graphed_model, graphed, graphed_unchanged, graphed_scales = run(graphs=True)
    assert graphed.recorded == 4 and graphed.given_up is None
    assert eager_unchanged == graphed_unchanged == [i in planted for i in range(15)]
    assert eager_scales == graphed_scales and graphed_scales[-1] == 65536 / 4
    assert "2 of 15 optimizer steps skipped" in graphed.summary()
    for (name, p), q in zip(graphed_model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-3, msg=name)
