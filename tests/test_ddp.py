"""DDP under torchrun on CPU (gloo): the same results as one process, exact eval, rank-0 writes, failures."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, cli_env, made_once, on_cpu, run_script, synthetic_rows, write_rows, tail


def torchrun(nproc: int, *args, extra=(), timeout=300, env=None, **popen) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", *extra]
    if not extra:
        cmd += ["--standalone"]
    cmd += [f"--nproc_per_node={nproc}", str(ROOT / "training" / "train_ddp.py"), *on_cpu("train_ddp.py", args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env or cli_env())


def step_losses(run_dir: Path) -> list:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "step"]


def epoch_record(run_dir: Path) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == "epoch"][-1]


def assert_same_run(a: Path, b: Path, rtol=1e-5, skip=None, stray=0.0):
    """The same step losses and final weights (``skip``: a name part of weights not compared; ``stray``: the
    share of a tensor's elements allowed outside the tolerance, for near-zero gradients that AdamW's
    normalization turns into lr-sized steps of either sign under another summation order)."""
    la, lb = step_losses(a), step_losses(b)
    assert len(la) == len(lb) > 0
    assert torch.allclose(torch.tensor(la), torch.tensor(lb), rtol=rtol, atol=1e-7), (la, lb)
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    compared = [k for k in wa if skip is None or skip not in k]
    assert len(compared) > len(wa) // 2
    for k in compared:
        off = ~torch.isclose(wa[k], wb[k], rtol=rtol, atol=1e-6)
        assert off.float().mean() <= stray, (k, int(off.sum()), wa[k].numel())


def _task_args(d: Path, tiny_model_dir) -> list:
    return ["--model", tiny_model_dir, "--train_file", d / "train.csv", "--validation_file", d / "val.csv",
            "--epochs", 2, "--learning_rate", 1e-3, "--max_length", 32, "--log_every", 1, "--precision", "fp32",
            "--device", "cpu", "--no_progress", "--cache_dir", d / "cache"]


@pytest.fixture(scope="module")
def task(tmp_path_factory, tiny_model_dir):
    """Training data whose size divides by every batch and world size used below (no wrap-around padding),
    and the two runs that several tests compare with, made once per session (for all workers of pytest -n):
    one process at batch 8 (``single/ref``) and two gloo processes at batch 4 (``ddp2/r``). The tests add
    their own runs beside them, each in a directory of its own."""
    def make(d: Path) -> None:
        write_rows(d / "train.csv", synthetic_rows(96, seed=3))
        write_rows(d / "val.csv", synthetic_rows(41, seed=4))  # odd: exact eval must count each once
        common = _task_args(d, tiny_model_dir)
        proc = run_script("train_single.py", *common, "--batch_size", 8, "--checkpoint_dir", d / "single",
                          "--run_name", "ref")
        assert proc.returncode == 0, proc.stderr
        proc = torchrun(2, *common, "--batch_size", 4, "--checkpoint_dir", d / "ddp2", "--run_name", "r")
        assert proc.returncode == 0, proc.stderr
        (d / "ddp2.out").write_text(proc.stdout)

    d = made_once(tmp_path_factory, "ddp-task", make)
    return d, _task_args(d, tiny_model_dir)


@pytest.fixture(scope="module")
def reference(task):
    """One process, batch 8: what the distributed runs must reproduce."""
    return task[0] / "single" / "ref"


@pytest.fixture(scope="module")
def two_processes(task):
    """Two gloo processes at batch 4 (the reference's global batch 8): what they printed."""
    return subprocess.CompletedProcess([], 0, (task[0] / "ddp2.out").read_text(), "")


def test_two_processes_at_half_batch_match_one_process(task, reference, two_processes):
    d, common = task
    proc = two_processes
    assert "global batch 8 (4 per process x 2 x 1 accumulation)" in proc.stdout
    assert_same_run(reference, d / "ddp2" / "r")
    # only rank 0 prints its epoch lines; one run directory, written once, with no temporaries
    assert proc.stdout.count("epoch 2/2 |") == 1
    assert sorted(p.name for p in (d / "ddp2").iterdir()) == ["r"]  # (the tests write no other run there)
    assert sorted(p.name for p in (d / "ddp2" / "r").iterdir()) == [
        ".lock", "best", "checkpoints", "config.json", "data.json", "final", "metrics.jsonl", "summary.json"]
    assert json.loads((d / "ddp2" / "r" / "config.json").read_text())["world_size"] == 2


def test_gradient_accumulation_matches_one_large_batch(task, reference, run_main, tmp_path):
    _, common = task
    proc = run_main("train_single.py", *common, "--batch_size", 2, "--grad_accum_steps", 4,
                    "--checkpoint_dir", tmp_path / "accum", "--run_name", "r")
    assert proc.returncode == 0, proc.stderr
    assert_same_run(reference, tmp_path / "accum" / "r")
    proc = torchrun(2, *common, "--batch_size", 2, "--grad_accum_steps", 2, "--checkpoint_dir", tmp_path / "accum2",
                    "--run_name", "r")
    assert proc.returncode == 0, proc.stderr
    assert_same_run(reference, tmp_path / "accum2" / "r")


@pytest.mark.parametrize("nproc", [3])
def test_evaluation_counts_every_example_once(task, reference, nproc, run_main, tmp_path):
    """41 validation examples over 3 ranks (14, 14, 13): the same accuracy as one process, exactly."""
    _, common = task
    # 96 = 3 x 32: the training batches line up too, so the weights match and so must the eval numbers
    proc = torchrun(nproc, *common, "--batch_size", 8, "--checkpoint_dir", tmp_path / f"eval{nproc}", "--run_name", "r",
                    "--learning_rate", 1e-9)
    assert proc.returncode == 0, proc.stderr
    single = run_main("train_single.py", *common, "--batch_size", 24, "--checkpoint_dir", tmp_path / "eval1",
                      "--run_name", "r", "--learning_rate", 1e-9)
    assert single.returncode == 0, single.stderr
    a, b = epoch_record(tmp_path / f"eval{nproc}" / "r"), epoch_record(tmp_path / "eval1" / "r")
    assert a["val_examples"] == b["val_examples"] == 41
    assert a["val_accuracy"] == b["val_accuracy"]
    assert abs(a["val_loss"] - b["val_loss"]) < 1e-6


def test_ddp_checkpoint_loads_on_one_device(task, two_processes):
    from transformers import AutoModelForSequenceClassification
    d, _ = task
    model = AutoModelForSequenceClassification.from_pretrained(d / "ddp2" / "r" / "final")
    assert not any(k.startswith("module.") for k in model.state_dict())
    assert model.config.id2label == {0: "negative", 1: "positive"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_one_machine_agree(task, reference, tmp_path):
    _, common = task
    port = _free_port()
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               "--rdzv_id=twonodes", str(ROOT / "training" / "train_ddp.py"),
               *map(str, common), "--batch_size", "4", "--checkpoint_dir", str(tmp_path / "nodes"), "--run_name", "r"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=cli_env()))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [tail(o[1]) for o in outs]
    assert_same_run(reference, tmp_path / "nodes" / "r")


def test_one_rank_failing_ends_the_job_with_its_message(task, tmp_path):
    """Rank 1 raises mid-epoch while rank 0 waits in a collective: the job ends, it does not hang."""
    d, common = task
    (tmp_path / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import torch\n"
        "    _step = torch.optim.AdamW.step\n"
        "    calls = [0]\n"
        "    def step(self, *a, **k):\n"
        "        calls[0] += 1\n"
        "        if calls[0] == 3:\n"
        "            raise RuntimeError('injected failure on rank 1 at step 3')\n"
        "        return _step(self, *a, **k)\n"
        "    torch.optim.AdamW.step = step\n")
    env = cli_env(PYTHONPATH=str(tmp_path))
    # a rank left waiting on its peer would hang: the timeout (an exception) fails the test
    proc = torchrun(2, *common, "--batch_size", 4, "--checkpoint_dir", tmp_path / "ck", env=env, timeout=300)
    assert proc.returncode != 0
    assert "injected failure on rank 1 at step 3" in proc.stderr
    assert not list((tmp_path / "ck").glob("*/final"))  # no checkpoint claims to be complete


def test_train_ddp_outside_torchrun_says_how_to_launch():
    proc = run_script("train_ddp.py", "--epochs", 1)
    assert proc.returncode == 2
    assert "torchrun --standalone --nproc_per_node=2" in proc.stderr


@pytest.mark.parametrize("args, expected", [
    (["--learning_rate", "nan"], "error: --learning_rate must be a finite number, got nan"),
    (["--epochs", "1.5"], "error: argument --epochs: invalid int value: '1.5' (see --help)"),
])
def test_bad_input_under_torchrun_stops_every_rank_with_one_line(task, tmp_path, args, expected):
    d, common = task
    proc = torchrun(2, *common, "--batch_size", 4, "--checkpoint_dir", tmp_path / "ck", *args, timeout=180)
    assert proc.returncode != 0
    ours = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert ours == [expected], tail(proc.stderr)  # said by rank 0 alone: the others stop on the same input
    assert not [ln for ln in proc.stderr.splitlines() if 'File "' in ln and ("/training/" in ln or "/encoderfit/" in ln)], proc.stderr


FLAT_VS_DDP = '''
import sys
import torch
import torch.distributed as dist
from transformers import BertConfig, BertForSequenceClassification
from encoderfit import tasks
from encoderfit.data.batches import Batch
from encoderfit.engine import loop as engine
from encoderfit.engine.distributed import ProcessContext
from encoderfit.engine.graphs import FlatGradients
from encoderfit.engine.step import StepContext, train_step

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
ctx = ProcessContext(rank, rank, world, torch.device("cpu"), torchrun=True)

def run(flat_steps, weights):
    torch.manual_seed(100 + rank)  # another start on each rank: rank 0's weights must reach the others
    model = BertForSequenceClassification(BertConfig(
        vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=3))
    task = tasks.choose_task("single_label", ["a", "b", "c"], weights, 0.5)
    train_model = engine.prepare_for_training(model, ctx, wrap_ddp=not flat_steps)
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    optimizer = engine.build_optimizer(model, lr=1e-2, weight_decay=0.01, fused=ctx.device.type == "cuda")
    scheduler = engine.build_scheduler(optimizer, total_steps=10, warmup_ratio=0.1)
    flat = FlatGradients(model, world) if flat_steps else None
    sc = StepContext(train_model, optimizer, scheduler, task, None, 1.0, ctx, recording=flat_steps, grad_sync=flat)
    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own examples, sizes and lengths
    torch.manual_seed(7 + rank)  # dropout: the same draws in both runs
    train_model.train()
    losses = []
    for i in range(8):
        size, length = 3 + rank + i % 2, 6 + 4 * (i % 3)
        ids = torch.randint(5, 200, (size, length), generator=data)
        batch = Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                      torch.randint(0, 3, (size,), generator=data), size, size * length)
        norm = task.normalizer(batch)
        if task.normalizer_differs_by_rank:
            norm = engine._global_reciprocal(norm, ctx)
        losses.append(float(train_step(sc, [batch], norm).loss_sum))
        scheduler.step()
    if flat is not None:  # every gradient is still a view into the buffer the all-reduce averages
        base, end = flat.buffers[0].data_ptr(), flat.buffers[0].data_ptr() + 4 * flat.buffers[0].numel()
        assert all(base <= p.grad.data_ptr() < end for p in model.parameters()), "a gradient left the buffer"
        assert flat.issued == 8
    return start, torch.cat([p.detach().flatten() for p in model.parameters()]), losses

for name, weights in (("none", None), ("weights", [1.0, 2.0, 0.5])):
    _, ddp, ddp_losses = run(False, weights)
    start, flat, flat_losses = run(True, weights)
    rank0 = flat.clone()
    dist.broadcast(rank0, 0)
    with open(f"{sys.argv[1]}/{name}-rank{rank}.txt", "w") as out:  # a file each: the ranks' stdout interleaves
        out.write(f"rank {rank} ddp-vs-flat {(ddp - flat).abs().max().item():.3e} ranks "
                  f"{(flat - rank0).abs().max().item():.3e} moved {(flat - start).abs().max().item():.3e} "
                  f"losses {ddp_losses == flat_losses}")
dist.destroy_process_group()
'''


def test_graphs_flat_gradient_all_reduce_averages_as_ddp_does_on_two_gloo_ranks(tmp_path):
    """The all-reduce recorded with CUDA graphs under torchrun, run eagerly on the CPU (the same code):
    two ranks with their own examples and batch shapes, and different starting weights, train as DDP's
    wrapper trains them, without and with class weights (a normalizer summed over the ranks)."""
    script = tmp_path / "flat_vs_ddp.py"
    script.write_text(FLAT_VS_DDP)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=cli_env(PYTHONPATH=str(ROOT / "src")))
    assert proc.returncode == 0, tail(proc.stderr)
    lines = [(tmp_path / f"{w}-rank{r}.txt").read_text() for w in ("none", "weights") for r in (0, 1)]
    for line in lines:
        fields = line.split()
        # the same weights as DDP's bit for bit, the same on both ranks, after steps that moved them
        assert float(fields[3]) == 0.0 and float(fields[5]) == 0.0 and float(fields[7]) > 1e-3, line
        assert fields[-1] == "True", line  # and the same losses, step by step
