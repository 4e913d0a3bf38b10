"""CUDA graphs of whole training steps give the same training as eager steps (needs a CUDA GPU)."""
import copy
import warnings

import pytest
import torch

from training import engine
from training.distributed import ProcessContext
from training.metrics import ClassificationMetrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


class Batches:
    """Fixed host batches of a few shapes, each shape more than twice, served by a DataLoader with
    worker processes and a pin-memory thread (which calls CUDA while a graph is being recorded)."""

    def __init__(self, batches):
        self.batches = batches
        sizes = [len(b["labels"]) for b in batches]
        self.batch_sampler = type("S", (), {"batch_sizes": lambda self: sizes})()

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
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                    "labels": torch.randint(0, 3, (size,), generator=g)})
    return out


def _train(model, batches, *, graphs: bool, amp, fail_once=None):
    device = torch.device("cuda")
    ctx = ProcessContext(0, 0, 1, device)
    optimizer = engine.build_optimizer(model, lr=1e-3, weight_decay=0.01, device=device)
    scheduler = engine.build_scheduler(optimizer, total_steps=len(batches), warmup_ratio=0.3)
    steps = engine.StepGraphs(model, optimizer, amp_dtype=amp, max_grad_norm=0.5, num_labels=3,
                              device=device) if graphs else None
    if fail_once is not None:
        fail_once(steps)
    state = engine.LoopState(epoch_metrics=ClassificationMetrics(device, 3), interval=ClassificationMetrics(device))
    engine.train_epoch(model, Batches(batches), optimizer, scheduler, ctx=ctx, amp_dtype=amp, grad_accum_steps=1,
                       max_grad_norm=0.5, log_every=4, state=state, guard=engine.NonFiniteGuard(device),
                       graphs=steps)
    return state, steps


def _before_each_step(steps, check):
    """Runs ``check()`` at the start of each of ``steps``'s steps, eager or recorded: it may raise."""
    step = steps._step

    def checked_step(static):
        check()
        step(static)
    steps._step = checked_step


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


def _out_of_memory_always(steps):
    """Every step, eager or recorded, runs out of memory while some graph is held."""
    _before_each_step(steps, lambda: steps.graphs and _simulated_out_of_memory())


def _host_sync_in_step(steps):
    """A step that synchronizes with the host cannot be recorded."""
    _before_each_step(steps, torch.cuda.synchronize)


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
        assert steps.captured == 0 and steps.releases == 0
        # the cause, not the error that ending the spoiled recording raises on top of it
        assert "cannot be recorded" in steps.given_up and "previous error" not in steps.given_up
    else:
        assert steps.captured == 4
        assert steps.releases == (1 if fail_once else 0) and steps.given_up is None
    assert graphed.global_step == eager.global_step == 15
    tol = 1e-4 if amp is None else 2e-2
    torch.testing.assert_close(graphed.epoch_metrics.totals, eager.epoch_metrics.totals, rtol=tol, atol=tol)
    moved = 0.0
    for (name, p), q, b in zip(graphed_model.named_parameters(), eager_model.parameters(), base.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=name)
        moved = max(moved, (p - b).abs().max().item())
    assert moved > 1e-3  # the replays really trained the model (lr 1e-3 for 15 steps)


def test_graphed_steps_use_dropout_afresh_each_replay():
    """With dropout on, two replays of one graph on the same batch give different losses."""
    model = _tiny_bert(dropout=0.3)
    device = torch.device("cuda")
    optimizer = engine.build_optimizer(model, lr=0.0, weight_decay=0.0, device=device)  # weights stay put
    steps = engine.StepGraphs(model, optimizer, amp_dtype=None, max_grad_norm=1.0, num_labels=3, device=device)
    batch = _batches(1, model.config.vocab_size)[0]
    model.train()
    losses = [steps(batch)[0].item() for _ in range(4)]  # eager, record + replay, replay, replay
    assert steps.captured == 1
    assert len(set(losses[1:])) == 3, losses


def test_graphs_are_given_up_after_running_out_of_memory_three_times():
    """Memory too tight for more than one graph: after three releases, training goes on eagerly.

    A B C A B C A B C: A recorded at step 4; B's recording fails (release 1) and B runs eagerly; C
    recorded; A fails (release 2); B recorded; C fails (release 3): given up from step 9 on."""
    model = _tiny_bert()
    batches = _batches(30, model.config.vocab_size)
    with pytest.warns(UserWarning, match="CUDA graphs given up"):
        state, steps = _train(model, batches, graphs=True, amp=None, fail_once=_out_of_memory_always)
    assert steps.releases == 3 and steps.captured == 0
    assert "out of memory" in steps.given_up
    assert state.global_step == 30
    assert "given up" in steps.summary()
