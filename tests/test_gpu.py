"""The CUDA path end to end, through the real command lines (runs only where there is a CUDA GPU).

The real default model (all-MiniLM-L6-v2, dropout 0.1) on the default data, with what ``auto`` picks
on one GPU: bf16 autocast and CUDA graphs of whole steps. Faults are injected from outside the
project (a ``sitecustomize`` on PYTHONPATH) at the learning-rate scheduler's ``step``, which the
loop calls once per optimizer step from Python whether the step is eager or a graph replay.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, cli_env, run_script, tail

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path needs a CUDA GPU")]

# STOP_AT_STEP: SIGTERM after that optimizer step (first launch only). POISON_AT_STEP: after that step,
# the [CLS] row of the word embeddings becomes NaN in place (under graphs too: the same storage), so the
# next step's loss is NaN. OOM_ONCE: the second recording of a step runs out of memory.
SITECUSTOMIZE = '''
import os, signal
import torch
from torch.optim.lr_scheduler import LambdaLR
_step = LambdaLR.step
calls = [0]
def step(self, *a, **k):
    out = _step(self, *a, **k)
    calls[0] += 1
    done = calls[0] - 1  # the first call is the scheduler's own, at construction
    if os.environ.get("STOP_AT_STEP") and done == int(os.environ["STOP_AT_STEP"]) \\
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and not os.environ.get("RESUMED"):
        os.kill(os.getpid(), signal.SIGTERM)
    if os.environ.get("POISON_AT_STEP") and done == int(os.environ["POISON_AT_STEP"]):
        embeddings = max((p for g in self.optimizer.param_groups for p in g["params"]), key=lambda p: p.shape[0])
        with torch.no_grad():
            embeddings[101] = float("nan")
    return out
LambdaLR.step = step
if os.environ.get("OOM_ONCE"):
    _forward = torch.nn.CrossEntropyLoss.forward
    captures = [0]
    def forward(self, input, target):
        if torch.cuda.is_current_stream_capturing():
            captures[0] += 1
            if captures[0] == 2:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return _forward(self, input, target)
    torch.nn.CrossEntropyLoss.forward = forward
'''

COMMON = ["--num_samples", 640, "--epochs", 2, "--batch_size", 32, "--max_length", 64, "--log_every", 5,
          "--no_progress"]


@pytest.fixture(scope="module")
def hooks(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gpu-hooks")
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return d


def env_with(hooks: Path, **extra) -> dict:
    return cli_env(PYTHONPATH=str(hooks), **{k: str(v) for k, v in extra.items()})


def records(run_dir: Path, event: str) -> list:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, hooks):
    """The uninterrupted GPU run: what a stopped and resumed one must reproduce."""
    d = tmp_path_factory.mktemp("gpu")
    proc = run_script("train_single.py", *COMMON, "--device", "cuda", "--checkpoint_dir", d, "--run_name", "straight",
                      "--cache_dir", d / "cache", env=env_with(hooks))
    assert proc.returncode == 0, tail(proc.stderr)
    assert "precision bf16 autocast" in proc.stdout and "CUDA graphs: on" in proc.stdout, proc.stdout
    return d


def test_graphs_on_the_real_model_sigterm_then_resume_match_the_uninterrupted_run(straight, hooks):
    """CLI -> loaders padded to multiples of 32 -> graphs -> checkpoint -> SIGTERM -> resume.

    Tolerance: the same kernels run in both (a replay and an eager step of the same recorded step
    launch the same kernels, and dropout's Philox offsets continue from the checkpointed generator),
    so the differences left come from non-deterministic reductions (atomic adds in the embedding and
    bias-gradient backward kernels) in bf16: 2e-3 on each logged loss, 2e-3 on each weight."""
    d = straight
    args = [*COMMON, "--device", "cuda", "--checkpoint_dir", d, "--cache_dir", d / "cache", "--run_name", "sig",
            "--save_every_steps", 7]
    stopped = run_script("train_single.py", *args, env=env_with(hooks, STOP_AT_STEP=23))
    assert stopped.returncode == 143, tail(stopped.stderr)
    assert "stopped by SIGTERM after step 23" in stopped.stdout
    resumed = run_script("train_single.py", *args, "--resume", "auto", env=env_with(hooks, RESUMED=1))
    assert resumed.returncode == 0, tail(resumed.stderr)
    assert "resuming at epoch 2, step 23" in resumed.stdout, resumed.stdout  # 20 steps an epoch
    la = torch.tensor([r["loss"] for r in records(d / "sig", "step")])
    lb = torch.tensor([r["loss"] for r in records(d / "straight", "step")])
    assert la.shape == lb.shape == (8,)
    print(f"max loss difference {float((la - lb).abs().max()):.2e}")
    torch.testing.assert_close(la, lb, rtol=0, atol=2e-3)
    wa, wb = load_file(d / "sig" / "final" / "model.safetensors"), load_file(d / "straight" / "final" / "model.safetensors")
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wb)
    print(f"max weight difference {worst:.2e}")
    assert worst < 2e-3


def test_best_and_final_load_in_pipeline_on_the_gpu(straight):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
    for name in ("best", "final"):
        clf = pipeline("text-classification", model=str(straight / "straight" / name), device="cuda")
        texts = ["a warm, funny and touching film", "an overlong, tedious mess"]
        out = clf(texts)
        # the pipeline on the GPU gives what the checkpoint's own forward computes in fp32 on the CPU
        model = AutoModelForSequenceClassification.from_pretrained(straight / "straight" / name).eval()
        tok = AutoTokenizer.from_pretrained(straight / "straight" / name)
        with torch.no_grad():
            probs = model(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
        for o, p in zip(out, probs):
            assert o["label"] == model.config.id2label[int(p.argmax())] and o["label"] in {"fresh", "rotten"}
            assert o["score"] == pytest.approx(float(p.max()), abs=2e-3)


def test_a_nan_under_graphs_stops_naming_the_step_with_no_checkpoint_after_it(tmp_path, hooks):
    proc = run_script("train_single.py", *COMMON, "--device", "cuda", "--checkpoint_dir", tmp_path,
                      "--run_name", "nan", "--save_every_steps", 4, env=env_with(hooks, POISON_AT_STEP=9))
    assert proc.returncode == 2, tail(proc.stderr)
    assert "non-finite loss at optimizer step 10 (epoch 1, batch 10 of the epoch)" in proc.stderr, proc.stderr
    kept = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir())
    assert kept == ["step-00000004", "step-00000008"]  # nothing after the bad step
    assert not (tmp_path / "nan" / "final").exists()


def test_out_of_memory_beside_the_graphs_drops_them_and_the_run_goes_on(tmp_path, hooks):
    proc = run_script("train_single.py", *COMMON, "--device", "cuda", "--checkpoint_dir", tmp_path, "--run_name", "oom",
                      env=env_with(hooks, OOM_ONCE=1))
    assert proc.returncode == 0, tail(proc.stderr)
    assert "all dropped 1 time(s) to free memory" in proc.stdout, proc.stdout
    assert len(records(tmp_path / "oom", "epoch")) == 2


@pytest.mark.parametrize("unpadded", ["off", "on"])
def test_compile_on_with_graphs_on_a_small_model(tmp_path, tiny_model_dir, unpadded):
    from conftest import synthetic_rows, write_rows
    train = write_rows(tmp_path / "train.csv", synthetic_rows(300, seed=1))
    proc = run_script("train_single.py", "--model", tiny_model_dir, "--train_file", train, "--epochs", 3,
                      "--batch_size", 16, "--learning_rate", 2e-3, "--max_length", 32, "--device", "cuda",
                      "--compile", "on", "--unpadded", unpadded, "--checkpoint_dir", tmp_path, "--run_name", "c",
                      timeout=900)
    assert proc.returncode == 0, tail(proc.stderr)
    said = "unpadded" if unpadded == "on" else "padded"  # on: the compile traces the packed path
    assert f"compile: on (each encoder layer) | CUDA graphs: on | batches: {said}" in proc.stdout, proc.stdout
    assert list((tmp_path / "cache" / "compile").iterdir())  # the compiled code, kept for the next run
    assert "given up" not in proc.stdout, proc.stdout  # the compiled layers are recorded in the graphs
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["final_val_accuracy"] >= 0.8  # the sentiment word decides the label: learned


def _torchrun(nproc: int, *args, env=None, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "training" / "train_ddp.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env or cli_env())


def test_torchrun_with_one_process_runs_nccl_ddp_checkpoints_and_resume(tmp_path, hooks, tiny_model_dir):
    """World size 1 under torchrun is a real process group (NCCL): eager steps in DDP's wrapper, and graphed
    steps that record the NCCL all-reduce with them, each the same run as one plain process; a
    SIGTERM-then-resume of the graphed run ends where the straight run does."""
    from conftest import synthetic_rows, write_rows
    train = write_rows(tmp_path / "train.csv", synthetic_rows(160, seed=2))
    args = ["--model", tiny_model_dir, "--train_file", train, "--epochs", 2, "--batch_size", 16, "--max_length", 32,
            "--learning_rate", 1e-3, "--log_every", 1, "--device", "cuda", "--precision", "fp32",
            "--checkpoint_dir", tmp_path, "--cache_dir", tmp_path / "cache", "--no_progress"]

    def losses(name):
        return torch.tensor([r["loss"] for r in records(tmp_path / name, "step")])
    for graphs in ("off", "auto"):
        single = run_script("train_single.py", *args, "--cuda_graphs", graphs, "--run_name", f"single-{graphs}")
        assert single.returncode == 0, tail(single.stderr)
        ddp = _torchrun(1, *args, "--cuda_graphs", graphs, "--run_name", f"ddp-{graphs}", "--save_every_steps", 3)
        assert ddp.returncode == 0, tail(ddp.stderr)
        assert "device cuda:0 x 1 process(es)" in ddp.stdout
        assert f"CUDA graphs: {'on' if graphs == 'auto' else 'off'}" in ddp.stdout  # auto: on under torchrun
        config = json.loads((tmp_path / f"ddp-{graphs}" / "config.json").read_text())
        assert config["world_size"] == 1 and config["backend"] == "nccl" and config["cuda_graphs"] == (graphs == "auto")
        # fp32, same kernels; DDP and the recorded all-reduce divide by 1
        torch.testing.assert_close(losses(f"ddp-{graphs}"), losses(f"single-{graphs}"), rtol=1e-4, atol=1e-5)
    # the graphed DDP run recorded its steps and kept them (not given up: they replayed the all-reduce)
    assert re.search(r"CUDA graphs: \d+ batch shapes, [1-9]\d* recorded", ddp.stdout) and "given up" not in ddp.stdout
    stopped = _torchrun(1, *args, "--run_name", "sig", "--save_every_steps", 3, env=env_with(hooks, STOP_AT_STEP=7))
    assert stopped.returncode != 0 and "stopped by SIGTERM after step 7" in stopped.stdout, stopped.stdout
    resumed = _torchrun(1, *args, "--run_name", "sig", "--save_every_steps", 3, "--resume", "auto",
                        env=env_with(hooks, RESUMED=1))
    assert resumed.returncode == 0, tail(resumed.stderr)
    assert "resuming at epoch 1, step 7" in resumed.stdout and "CUDA graphs: on" in resumed.stdout
    torch.testing.assert_close(losses("sig"), losses("ddp-auto"), rtol=1e-4, atol=1e-5)


def test_fp16_graphed_runs_in_one_process_and_under_torchrun_and_resume_exactly(tmp_path, hooks, tiny_model_dir):
    """--precision fp16 on the GPU: graphed steps with loss scaling in one process and under torchrun (the NCCL
    all-reduce recorded before the unscale), the same run both ways; stopped and resumed, the graphed run ends
    with the uninterrupted run's weights and loss scale."""
    from conftest import synthetic_rows, write_rows
    # data and rate the tiny model learns from in 2 epochs, whatever the precision (on 160 rows at 1e-3 it stays at
    # 0.5 accuracy, in fp32 too: measured on the CPU)
    train = write_rows(tmp_path / "train.csv", synthetic_rows(300, seed=1))
    args = ["--model", tiny_model_dir, "--train_file", train, "--epochs", 2, "--batch_size", 16, "--max_length", 32,
            "--learning_rate", 2e-3, "--log_every", 1, "--device", "cuda", "--precision", "fp16",
            "--checkpoint_dir", tmp_path, "--cache_dir", tmp_path / "cache", "--no_progress"]
    single = run_script("train_single.py", *args, "--run_name", "single")
    assert single.returncode == 0, tail(single.stderr)
    assert "precision fp16 autocast with loss scaling" in single.stdout and "CUDA graphs: on" in single.stdout
    ddp = _torchrun(1, *args, "--run_name", "ddp", "--save_every_steps", 3)
    assert ddp.returncode == 0, tail(ddp.stderr)
    said = re.search(r"fp16 loss scaling: scale (\S+) at the end; (\d+) of (\d+) optimizer steps skipped", ddp.stdout)
    assert said and said.group(3) == "34", ddp.stdout
    assert re.search(r"CUDA graphs: \d+ batch shapes, [1-9]\d* recorded", ddp.stdout) and "given up" not in ddp.stdout

    def losses(name):
        return torch.tensor([r["loss"] for r in records(tmp_path / name, "step")])
    torch.testing.assert_close(losses("ddp"), losses("single"), rtol=0, atol=2e-3)
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["final_val_accuracy"] >= 0.8
    stopped = _torchrun(1, *args, "--run_name", "sig", "--save_every_steps", 3, env=env_with(hooks, STOP_AT_STEP=7))
    assert stopped.returncode != 0 and "stopped by SIGTERM after step 7" in stopped.stdout, stopped.stdout
    resumed = _torchrun(1, *args, "--run_name", "sig", "--save_every_steps", 3, "--resume", "auto",
                        env=env_with(hooks, RESUMED=1))
    assert resumed.returncode == 0, tail(resumed.stderr)
    assert said.group(0) in resumed.stdout, resumed.stdout
    # the tolerance of the bf16 resume test above: non-deterministic atomic adds in two backward kernels
    torch.testing.assert_close(losses("sig"), losses("ddp"), rtol=0, atol=2e-3)
    a, b = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("sig", "ddp"))
    assert max(float((a[k] - b[k]).abs().max()) for k in b) < 2e-3


def test_graphed_ddp_steps_with_class_weights_match_eager_ddp(tmp_path, tiny_model_dir):
    """Class weights make the loss normalizer differ by rank: a device tensor summed over the ranks each step,
    which the recorded step reads like the learning rate."""
    from conftest import synthetic_rows, write_rows
    train = write_rows(tmp_path / "train.csv", synthetic_rows(160, seed=3))
    args = ["--model", tiny_model_dir, "--train_file", train, "--epochs", 1, "--batch_size", 16, "--max_length", 32,
            "--learning_rate", 1e-3, "--log_every", 1, "--device", "cuda", "--precision", "fp32",
            "--class_weights", "balanced", "--checkpoint_dir", tmp_path, "--cache_dir", tmp_path / "cache",
            "--no_progress"]
    for graphs in ("off", "on"):
        proc = _torchrun(1, *args, "--cuda_graphs", graphs, "--run_name", graphs)
        assert proc.returncode == 0, tail(proc.stderr)
    assert re.search(r"CUDA graphs: \d+ batch shapes, [1-9]\d* recorded", proc.stdout), proc.stdout
    a, b = (torch.tensor([r["loss"] for r in records(tmp_path / n, "step")]) for n in ("on", "off"))
    assert len(a) == len(b) >= 8  # 144 training rows (the rest is the validation split) at 16 a step
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_more_processes_than_gpus_is_one_line_on_every_rank(tmp_path, tiny_model_dir):
    from conftest import synthetic_rows, write_rows
    n = torch.cuda.device_count() + 1
    train = write_rows(tmp_path / "train.csv", synthetic_rows(40, seed=2))
    proc = _torchrun(n, "--model", tiny_model_dir, "--train_file", train, "--epochs", 1, "--device", "cuda",
                     "--checkpoint_dir", tmp_path, timeout=300)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    want = f"{n} processes on this node but {torch.cuda.device_count()} CUDA GPU(s)"
    # every rank that gets that far says it (torchrun may stop the slower ones first, so count at least one)
    assert errors and all(want in ln for ln in errors), tail(proc.stderr)
    # no traceback from our processes (torchrun prints its own when a worker fails)
    assert not [ln for ln in proc.stderr.splitlines() if 'File "' in ln and ("/training/" in ln or "/encoderfit/" in ln)], proc.stderr
    assert not list(tmp_path.glob("run-*"))  # nothing was started


@pytest.mark.parametrize("shape", ["pair regression", "class weights", "multi label", "windows"])
def test_graphed_steps_of_each_task_shape_match_eager_steps(tmp_path, tiny_model_dir, shape):
    """The task's loss, normalizer and metric sums recorded in the graphs: the same steps as eager ones
    (fp32: the same kernels), and the task's own validation metrics at the end."""
    from conftest import synthetic_rows, write_rows
    from test_tasks import score_rows, write_csv
    if shape == "pair regression":
        train, extra, metric = write_csv(tmp_path / "t.csv", score_rows(160, seed=3, pair=True)), [], "val_pearson"
    elif shape == "multi label":  # a tuned threshold, which the recorded steps read from device memory
        from test_tasks import noisy_topic_rows
        train = tmp_path / "t.jsonl"
        train.write_text("".join(json.dumps(r) + "\n" for r in noisy_topic_rows(480, seed=21)))
        extra, metric = ["--threshold", "tune", "--class_weights", "15,15,15", "--epochs", 4,
                         "--learning_rate", 5e-3], "val_micro_f1"
    elif shape == "windows":  # long texts in windows: training on windows, evaluation pooled on the GPU
        from test_long_texts import long_rows, write_jsonl
        # 120 texts, 2 epochs: ~35 steps. (240 texts for 4 epochs, ~150 steps at 2e-3, drifted apart by 0.17 in
        # loss at the end on an H200: rounding amplified by AdamW, as the multi-label case notes)
        train = write_jsonl(tmp_path / "t.jsonl", long_rows(120, seed=8))
        extra, metric = ["--long_texts", "windows"], "val_accuracy"
    else:
        rows = synthetic_rows(200, seed=4)
        rows = [r for r in rows if r["label"] == "negative"] + [r for r in rows if r["label"] == "positive"][:40]
        train, extra, metric = write_rows(tmp_path / "t.csv", rows), ["--class_weights", "balanced"], "val_loss"
    args = ["--model", tiny_model_dir, "--train_file", train, "--epochs", 2, "--batch_size", 16, "--max_length", 32,
            "--learning_rate", 2e-3, "--log_every", 1, "--device", "cuda", "--precision", "fp32", *extra,
            "--checkpoint_dir", tmp_path, "--cache_dir", tmp_path / "cache", "--no_progress"]
    runs = {}
    for graphs in ("on", "off"):
        proc = run_script("train_single.py", *args, "--cuda_graphs", graphs, "--run_name", graphs)
        assert proc.returncode == 0, tail(proc.stderr)
        assert f"CUDA graphs: {graphs}" in proc.stdout
        if graphs == "on":  # really replayed: recorded, and never given up for eager steps
            assert "recorded at the end" in proc.stdout and "given up" not in proc.stdout, proc.stdout
            assert "0 recorded at the end" not in proc.stdout, proc.stdout
        runs[graphs] = proc
    la = torch.tensor([r["loss"] for r in records(tmp_path / "on", "step")])
    lb = torch.tensor([r["loss"] for r in records(tmp_path / "off", "step")])
    # fp32, but graphs pad lengths to multiples of 32 and eager steps to the batch's longest text: the
    # reductions round differently, and the difference grows with the steps (4 epochs at 5e-3 with
    # pos_weight 15 reach 3e-4 by the end; 2 epochs stay within 1e-4)
    rtol = 1e-3 if shape in ("multi label", "windows") else 1e-4
    torch.testing.assert_close(la, lb, rtol=rtol, atol=1e-5)
    ea, eb = records(tmp_path / "on", "epoch")[-1], records(tmp_path / "off", "epoch")[-1]
    assert abs(ea[metric] - eb[metric]) < 1e-3, (ea, eb)
    if shape == "multi label":
        # the training sums after a tuned evaluation decide at the new threshold, replayed or not (a
        # threshold frozen into the graphs at 0.5 moves subset accuracy by ~0.1 here)
        on, off = records(tmp_path / "on", "epoch"), records(tmp_path / "off", "epoch")
        # (the same threshold, or a neighbour where logits 1e-4 apart move a grid point's F1 past another's)
        assert all(abs(r["val_threshold"] - q["val_threshold"]) <= 0.02 + 1e-9 for r, q in zip(on, off)), (on, off)
        assert any(r["val_threshold"] != 0.5 for r in on[:-1]), on
        for r, q in zip(on, off):
            assert abs(r["train_subset_accuracy"] - q["train_subset_accuracy"]) < 0.01, (on, off)
    if shape == "windows":  # the GPU's pooling in training's evaluation is evaluate.py's
        assert ea["val_windows"] > 2 * ea["val_examples"], ea  # (learning is tested on the CPU: test_long_texts)
        proc = run_script("evaluate.py", "--checkpoint", tmp_path / "on" / "final", "--train_file", train,
                          "--device", "cuda", "--precision", "fp32", "--output", tmp_path / "eval.json")
        assert proc.returncode == 0, tail(proc.stderr)
        got = json.loads((tmp_path / "eval.json").read_text())
        assert got["examples"] == ea["val_examples"] and got["accuracy"] == ea["val_accuracy"]
        assert abs(got["loss"] - ea["val_loss"]) < 1e-4


def test_a_sweep_runs_graphed_trials_one_worker_per_gpu_and_each_trial_is_its_run_alone(tmp_path, tiny_model_dir):
    from conftest import synthetic_rows, write_rows
    train = write_rows(tmp_path / "train.csv", synthetic_rows(240, seed=1))
    val = write_rows(tmp_path / "val.csv", synthetic_rows(80, seed=2))
    common = ["--model", tiny_model_dir, "--train_file", train, "--validation_file", val, "--epochs", 2,
              "--batch_size", 16, "--max_length", 32, "--device", "cuda", "--no_progress"]
    gpus = torch.cuda.device_count()
    proc = run_script("sweep.py", *common, "--learning_rate", "1e-3,3e-3", "--parallel_trials", gpus,
                      "--sweep_dir", tmp_path / "sw", timeout=900)
    assert proc.returncode == 0, tail(proc.stderr)
    assert "worker 0 on GPU 0" in proc.stdout
    record = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [t["status"] for t in record["trials"]] == ["done", "done"]
    for k in range(gpus):
        log = (tmp_path / "sw" / f"worker-{k}.log").read_text()
        assert "device cuda" in log and "CUDA graphs: on" in log  # each worker sees its own GPU as cuda:0
    alone = run_script("train_single.py", *common, "--learning_rate", "3e-3", "--cache_dir", tmp_path / "sw" / "cache",
                       "--checkpoint_dir", tmp_path, "--run_name", "alone", timeout=900)
    assert alone.returncode == 0, tail(alone.stderr)
    a = json.loads((tmp_path / "sw" / "trial-002" / "summary.json").read_text())
    b = json.loads((tmp_path / "alone" / "summary.json").read_text())
    assert a["best_val_accuracy"] == b["best_val_accuracy"]
    assert abs(a["best_val_loss"] - b["best_val_loss"]) <= 1e-3 * b["best_val_loss"]
    too_many = run_script("sweep.py", *common, "--learning_rate", "1e-3,3e-3", "--parallel_trials", gpus + 1,
                          "--sweep_dir", tmp_path / "sw2")
    assert too_many.returncode == 2 and f"this machine shows {gpus} CUDA GPU(s)" in too_many.stderr
    assert too_many.stderr.count("\n") == 1


def _packed_against_padded(kind, *, offset=None):
    """Loss and gradients of one bf16 training step, packed (the flash kernel) and padded (SDPA), for one model."""
    from test_packing import TOKENIZER, _model, _rows

    from encoderfit.modeling import packing
    from encoderfit.data.batches import PadCollator

    rows = _rows([9, 4, 17, 30, 6, 38, 12, 3, 35, 25], seed=2, pairs=kind == "bert")  # within 40 positions
    if kind == "distilbert":  # no segment ids
        rows = [{k: v for k, v in r.items() if k != "token_type_ids"} for r in rows]
    model = _model(kind).cuda()

    def step(batch):
        model.zero_grad()
        batch = batch.to(torch.device("cuda"))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(**batch.model_inputs()).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), batch.labels, reduction="sum")
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = step(PadCollator(TOKENIZER, 8)(rows))
    packing.prepare(model)
    off = packing.position_offset(model) if offset is None else offset
    got = step(packing.PackCollator(TOKENIZER, max_length=40, position_offset=off)(rows))  # the positions
    return want, got


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_packed_steps_with_the_flash_kernel_match_padded_steps(kind):
    """bf16 tolerance: the two paths round differently (flash vs cuDNN/efficient attention, other GEMM
    shapes), so 2% of each gradient's norm; a RoBERTa-style model given positions from 0 is off by far more
    (its position embeddings' gradient lands on the wrong rows)."""
    (loss_a, grads_a), (loss_b, grads_b) = _packed_against_padded(kind)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-2, atol=1e-3)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        err = (grads_b[name] - grads_a[name]).norm() / grads_a[name].norm().clamp_min(1e-6)
        assert err < 2e-2, (name, float(err))
    if kind == "roberta":
        (_, grads_a), (_, grads_wrong) = _packed_against_padded(kind, offset=0)
        name = next(n for n in grads_a if "position_embeddings" in n)  # the rows used move by one
        err = (grads_wrong[name] - grads_a[name]).norm() / grads_a[name].norm()
        assert err > 0.5, float(err)


def test_unpadded_training_under_graphs_learns_as_padded_training_does(tmp_path, tiny_model_dir):
    """The CLI end to end: packed batches recorded as CUDA graphs (few shapes), the same losses as padded
    batches within bf16 rounding, and the same validation accuracy."""
    from conftest import synthetic_rows, write_rows
    train = write_rows(tmp_path / "train.csv", synthetic_rows(400, seed=5))
    args = ["--model", tiny_model_dir, "--train_file", train, "--epochs", 3, "--batch_size", 16, "--max_length", 64,
            "--learning_rate", 2e-3, "--log_every", 1, "--device", "cuda", "--checkpoint_dir", tmp_path,
            "--cache_dir", tmp_path / "cache", "--no_progress"]
    out = {}
    for mode in ("on", "off"):
        proc = run_script("train_single.py", *args, "--unpadded", mode, "--run_name", mode)
        assert proc.returncode == 0, tail(proc.stderr)
        assert f"batches: {'unpadded' if mode == 'on' else 'padded'}" in proc.stdout, proc.stdout
        assert re.search(r"CUDA graphs: \d+ batch shapes, [1-9]\d* recorded", proc.stdout), proc.stdout
        assert "given up" not in proc.stdout
        out[mode] = proc
    shapes = int(re.search(r"CUDA graphs: (\d+) batch shapes", out["on"].stdout).group(1))
    assert shapes <= 12, out["on"].stdout  # few row lengths
    la = torch.tensor([r["loss"] for r in records(tmp_path / "on", "step")])
    lb = torch.tensor([r["loss"] for r in records(tmp_path / "off", "step")])
    assert len(la) == len(lb) and abs(float(la[:5].mean() - lb[:5].mean())) < 0.02 * float(lb[:5].mean())
    ea, eb = records(tmp_path / "on", "epoch"), records(tmp_path / "off", "epoch")
    for a, b in zip(ea, eb):
        assert abs(a["train_loss"] - b["train_loss"]) < 0.05 * b["train_loss"] + 0.01, (ea, eb)
    assert ea[-1]["val_accuracy"] >= 0.9 and abs(ea[-1]["val_accuracy"] - eb[-1]["val_accuracy"]) <= 0.05, (ea, eb)
    config = json.loads((tmp_path / "on" / "config.json").read_text())
    assert config["unpadded"] is True and json.loads((tmp_path / "off" / "config.json").read_text())["unpadded"] is False
