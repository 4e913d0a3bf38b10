"""Never lose a run: exact resume after a signal, a killed worker, damaged or mismatched checkpoints,
non-finite losses, and bad data."""
import json
import subprocess
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, cli_env, made_once, on_cpu, run_script, synthetic_rows, write_rows, tail

# Installed into the training processes through PYTHONPATH: after optimizer step STOP_AT_STEP, the chosen
# rank sends itself STOP_SIGNAL (first launch only), or NAN_AT_CALL turns one loss into NaN.
SITECUSTOMIZE = '''
import os, signal
if os.environ.get("STOP_AT_STEP") and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" \\
        and os.environ.get("RANK", "0") == os.environ.get("STOP_RANK", "0"):
    import torch
    _step = torch.optim.AdamW.step
    calls = [0]
    def step(self, *a, **k):
        out = _step(self, *a, **k)
        calls[0] += 1
        if calls[0] == int(os.environ["STOP_AT_STEP"]):
            os.kill(os.getpid(), getattr(signal, os.environ.get("STOP_SIGNAL", "SIGTERM")))
        return out
    torch.optim.AdamW.step = step
if os.environ.get("SIGINT_AT_MAP"):  # Ctrl-C while the data is being prepared
    import datasets
    _map = datasets.Dataset.map
    def map_then_interrupt(self, *a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return _map(self, *a, **k)
    datasets.Dataset.map = map_then_interrupt
if os.environ.get("STATE_ON_RANK0_ONLY") and os.environ.get("RANK", "0") != "0":  # as if on another disk
    import torch
    _load = torch.load
    def load(f, *a, **k):
        if "training_state" in str(f):
            raise FileNotFoundError(f"rank {os.environ['RANK']} may not read {f}: only rank 0 has it")
        return _load(f, *a, **k)
    torch.load = load
if os.environ.get("PAUSE_AT_STEP"):  # a live run, held after that optimizer step
    import time, torch
    _pstep = torch.optim.AdamW.step
    pcalls = [0]
    def paused_step(self, *a, **k):
        out = _pstep(self, *a, **k)
        pcalls[0] += 1
        if pcalls[0] == int(os.environ["PAUSE_AT_STEP"]):
            open(os.environ["PAUSE_FLAG"], "w").close()
            time.sleep(120)
        return out
    torch.optim.AdamW.step = paused_step
if os.environ.get("NAN_AT_CALL"):
    import torch
    _forward = torch.nn.CrossEntropyLoss.forward
    seen = [0]
    def forward(self, input, target):
        seen[0] += 1
        out = _forward(self, input, target)
        return out * float("nan") if seen[0] in {int(x) for x in os.environ["NAN_AT_CALL"].split(",")} else out
    torch.nn.CrossEntropyLoss.forward = forward
'''


@pytest.fixture(scope="module")
def hooks(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hooks")
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return d


def env_with(hooks: Path, **extra) -> dict:
    return cli_env(PYTHONPATH=str(hooks), **{k: str(v) for k, v in extra.items()})


def torchrun(nproc, *args, env, extra=("--standalone",), timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", *extra, f"--nproc_per_node={nproc}",
           str(ROOT / "training" / "train_ddp.py"), *on_cpu("train_ddp.py", args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def records(run_dir: Path, event: str) -> list:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


def weights(run_dir: Path) -> dict:
    return load_file(run_dir / "final" / "model.safetensors")


def test_sigterm_then_resume_is_bitwise_the_uninterrupted_run(tmp_path, hooks, run_main):
    """The real default model (with dropout) on one CPU process, fp32. The stopped run is a process of its own,
    with this process's thread count; the resumed and uninterrupted runs run in this process."""
    common = ["--num_samples", 96, "--epochs", 2, "--log_every", 1, "--checkpoint_dir", tmp_path]
    stopped = run_script("train_single.py", *common, "--run_name", "a",
                         env=env_with(hooks, STOP_AT_STEP=4, OMP_NUM_THREADS=torch.get_num_threads()))
    assert stopped.returncode == 143, stopped.stderr
    assert "stopped by SIGTERM after step 4" in stopped.stdout and "--resume auto --run_name a" in stopped.stdout
    assert "SIGTERM: stopping after the current step and saving a checkpoint..." in stopped.stderr  # said at once
    # 96 examples at 32: 3 steps an epoch; the end of epoch 1 saved step 3, the signal step 4
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]
    before = torch.load(tmp_path / "a" / "checkpoints" / "step-00000004" / "training_state.pt",
                        weights_only=False)["clock"]  # the stopped process's time, as its checkpoint keeps it
    resumed = run_main("train_single.py", *common, "--run_name", "a", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at epoch 2, step 4 (batch 1 of the epoch)" in resumed.stdout
    straight = run_main("train_single.py", *common, "--run_name", "b")
    assert straight.returncode == 0, straight.stderr
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert [r["loss"] for r in records(tmp_path / "a", "step")] == [r["loss"] for r in records(tmp_path / "b", "step")]
    assert [r["step"] for r in records(tmp_path / "a", "step")] == list(range(1, 7))  # no step logged twice
    assert records(tmp_path / "a", "epoch")[-1]["val_accuracy"] == records(tmp_path / "b", "epoch")[-1]["val_accuracy"]
    # the summary's time is the whole run's: the stopped process's up to its checkpoint, and the resumed one's
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    b = summary["time_breakdown_s"]
    assert b["processes"] == 2 and before["processes"] == 1
    # the stopped process's time, plus the resumed one's, which is at least its own start-up
    assert summary["total_time_s"] - before["wall_s"] >= b["start-up"] - before["start-up"] > 0
    assert b["start-up"] > before["start-up"] and b["model"] > before["model"]  # both processes' start-ups
    assert "over 2 processes (resumed)" in resumed.stdout


def _ddp_args(d: Path, tiny_model_dir) -> list:
    return ["--model", tiny_model_dir, "--train_file", d / "train.csv", "--validation_file", d / "val.csv",
            "--epochs", 2, "--batch_size", 4, "--learning_rate", 1e-3, "--max_length", 32, "--log_every", 1,
            "--device", "cpu", "--precision", "fp32", "--checkpoint_dir", d, "--cache_dir", d / "cache",
            "--save_every_steps", 4]


@pytest.fixture(scope="module")
def ddp_task(tmp_path_factory, tiny_model_dir, hooks):
    """The data of the DDP resume tests and their uninterrupted 2-process run (``straight``), made once per
    session for all workers of pytest -n; each test adds its own runs beside it."""
    def make(d: Path) -> None:
        write_rows(d / "train.csv", synthetic_rows(120, seed=7))
        write_rows(d / "val.csv", synthetic_rows(31, seed=8))
        proc = torchrun(2, *_ddp_args(d, tiny_model_dir), "--run_name", "straight", env=env_with(hooks))
        assert proc.returncode == 0, proc.stderr

    d = made_once(tmp_path_factory, "resume-ddp", make)
    return d, _ddp_args(d, tiny_model_dir)


@pytest.fixture(scope="module")
def ddp_reference(ddp_task):
    return ddp_task[0] / "straight"


def _close(a: Path, b: Path, tol=1e-6):
    wa, wb = weights(a), weights(b)
    for k in wb:
        assert torch.allclose(wa[k], wb[k], rtol=tol, atol=tol), k
    la = torch.tensor([r["loss"] for r in records(a, "step")])
    lb = torch.tensor([r["loss"] for r in records(b, "step")])
    assert la.shape == lb.shape and torch.allclose(la, lb, rtol=tol, atol=tol)


def test_ddp_signal_on_one_rank_stops_both_and_resume_matches(ddp_task, ddp_reference, hooks, tmp_path):
    common = [*ddp_task[1], "--checkpoint_dir", tmp_path]  # the test's own runs (a rerun starts afresh)
    # only rank 1 gets the signal: the ranks must still agree on where to stop
    stopped = torchrun(2, *common, "--run_name", "sig", env=env_with(hooks, STOP_AT_STEP=6, STOP_RANK=1))
    assert stopped.returncode != 0
    assert "stopped by SIGTERM after step 6" in stopped.stdout, stopped.stdout + stopped.stderr
    resumed = torchrun(2, *common, "--run_name", "sig", "--resume", "auto", env=env_with(hooks))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at epoch 1, step 6" in resumed.stdout
    _close(tmp_path / "sig", ddp_reference)


def _two_nodes(common: list, node_dirs: list, env: dict) -> list:
    """One torchrun launcher per "node" on loopback, each with its own checkpoint and cache directories."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs, logs = [], []
    for node, own in enumerate(node_dirs):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
               # static rendezvous: node_rank decides the ranks, so rank 0 is on the first "node"
               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
               str(ROOT / "training" / "train_ddp.py"),
               *map(str, common), "--checkpoint_dir", str(own), "--cache_dir", str(own / "cache")]
        own.mkdir(parents=True, exist_ok=True)
        out, err = open(own / f"stdout-{port}", "w+"), open(own / f"stderr-{port}", "w+")  # no pipe to fill up
        logs.append((out, err))
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True, env=env))
    codes = [p.wait(timeout=300) for p in procs]
    results = []
    for code, (out, err) in zip(codes, logs):
        out.seek(0), err.seek(0)
        results.append((code, out.read(), err.read()))
        out.close(), err.close()
    return results


def test_two_nodes_with_their_own_disks_train_stop_and_resume_like_one(ddp_task, ddp_reference, hooks, tmp_path):
    """No shared filesystem: each node tokenizes into its own cache, only rank 0 writes (and, on resume,
    reads) the checkpoint; the others get the state from it. The same run as two processes on one node."""
    d, common = ddp_task
    disks = [tmp_path / "node0", tmp_path / "node1"]
    run = [*common, "--run_name", "sep"]
    stopped = _two_nodes(run, disks, env_with(hooks, STOP_AT_STEP=6, STOP_RANK=0))
    assert all(code != 0 for code, _, _ in stopped)
    assert "stopped by SIGTERM after step 6" in stopped[0][1], tail(stopped[0][2])
    resumed = _two_nodes([*run, "--resume", "auto"], disks, env_with(hooks, STATE_ON_RANK0_ONLY=1))
    assert [code for code, _, _ in resumed] == [0, 0], [tail(err) for _, _, err in resumed]
    assert "resuming at epoch 1, step 6" in resumed[0][1]
    _close(disks[0] / "sep", ddp_reference)
    assert not (disks[1] / "sep").exists()  # the second node wrote no run files ...
    assert list((disks[1] / "cache").glob("data-*/meta.json"))  # ... but has its own tokenized cache


def test_worker_killed_under_max_restarts_completes_with_the_same_accuracy(ddp_task, ddp_reference, hooks,
                                                                          tmp_path):
    common = [*ddp_task[1], "--checkpoint_dir", tmp_path]  # the test's own run (a rerun starts afresh)
    proc = torchrun(2, *common, "--run_name", "killed", "--resume", "auto",
                    env=env_with(hooks, STOP_AT_STEP=10, STOP_RANK=1, STOP_SIGNAL="SIGKILL"),
                    extra=("--standalone", "--max-restarts=1"))
    assert proc.returncode == 0, tail(proc.stderr)
    assert "resuming at epoch 1, step 8" in proc.stdout  # the last checkpoint before the kill at step 10
    final = records(tmp_path / "killed", "epoch")[-1]
    reference = records(ddp_reference, "epoch")[-1]
    assert final["val_accuracy"] == reference["val_accuracy"]
    _close(tmp_path / "killed", ddp_reference)


def test_truncated_checkpoint_is_refused_and_auto_falls_back(tmp_path, tiny_model_dir, hooks, run_main):
    train = write_rows(tmp_path / "train.csv", synthetic_rows(64, seed=9))
    common = ["--model", tiny_model_dir, "--train_file", train, "--epochs", 1, "--batch_size", 4, "--max_length", 32,
              "--checkpoint_dir", tmp_path, "--run_name", "t", "--save_every_steps", 4, "--keep_checkpoints", 3]
    assert run_script("train_single.py", *common, env=env_with(hooks, STOP_AT_STEP=10)).returncode == 143
    newest, older = sorted((tmp_path / "t" / "checkpoints").iterdir())[-1], \
        sorted((tmp_path / "t" / "checkpoints").iterdir())[-2]
    weights_file = newest / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[: weights_file.stat().st_size // 2])
    proc = run_main("train_single.py", *common, "--resume", newest)
    assert proc.returncode == 2 and "unreadable" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_main("train_single.py", *common, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr
    assert f"checkpoint {newest.name} is unusable" in proc.stdout
    assert f"resumed from {older}" in proc.stdout


def test_mismatched_checkpoints_are_refused(tmp_path, tiny_model_dir, hooks, run_main):
    train = write_rows(tmp_path / "train.csv", synthetic_rows(40, seed=9))
    three = write_rows(tmp_path / "three.csv", synthetic_rows(40, seed=9, labels=("a", "b", "c")))
    common = ["--epochs", 1, "--batch_size", 4, "--max_length", 32, "--run_name", "m", "--checkpoint_dir", tmp_path]
    assert run_main("train_single.py", *common, "--model", tiny_model_dir, "--train_file", train).returncode == 0
    ckpt = sorted((tmp_path / "m" / "checkpoints").iterdir())[-1]
    cases = {
        "labels": (["--model", tiny_model_dir, "--train_file", three], "was trained on labels"),
        "batch size": (["--model", tiny_model_dir, "--train_file", train, "--batch_size", 8],
                       "--batch_size 4, this run has --batch_size 8"),
        "model": (["--model", tmp_path / "m" / "final", "--train_file", train], "was trained with --model"),
    }
    for name, (args, expected) in cases.items():
        proc = run_main("train_single.py", *common, *args, "--resume", ckpt)
        assert proc.returncode == 2 and expected in proc.stderr, (name, proc.stderr)
    proc = torchrun(2, *common, "--model", tiny_model_dir, "--train_file", train, "--resume", ckpt,
                    env=env_with(hooks))
    assert proc.returncode != 0 and "saved by 1 process(es) and this run has 2" in proc.stderr


def test_ctrl_c_while_the_data_is_prepared_stops_at_once_and_leaves_nothing(tmp_path, tiny_model_dir, hooks):
    train = write_rows(tmp_path / "train.csv", synthetic_rows(64, seed=2))
    proc = run_script("train_single.py", "--model", tiny_model_dir, "--train_file", train, "--checkpoint_dir",
                      tmp_path / "ck", "--run_name", "r", env=env_with(hooks, SIGINT_AT_MAP=1))
    assert proc.returncode == 130, proc.stderr
    assert "SIGINT: stopping now (nothing has been trained yet)" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ck" / "r").exists()  # no run directory from a start that did not happen


@pytest.mark.parametrize("change, message", [
    ("more rows", "the train examples changed (135 then, 202 now)"),
    ("same count, other rows", "the train examples changed (other rows of the same count)"),
])
def test_resume_refuses_data_that_changed_since_the_checkpoint(tmp_path, tiny_model_dir, hooks, run_main, change,
                                                              message):
    """Copying other rows over the same --train_file (size and mtime are not what is compared)."""
    train = write_rows(tmp_path / "train.csv", synthetic_rows(150, seed=2))
    common = ["--model", tiny_model_dir, "--train_file", train, "--epochs", 1, "--batch_size", 8, "--max_length", 32,
              "--checkpoint_dir", tmp_path / "ck", "--run_name", "r", "--save_every_steps", 2]
    stopped = run_script("train_single.py", *common, env=env_with(hooks, STOP_AT_STEP=4))
    assert stopped.returncode == 143, stopped.stderr
    rows = synthetic_rows(225, seed=3) if change == "more rows" else synthetic_rows(150, seed=9)
    write_rows(train, rows)
    resumed = run_main("train_single.py", *common, "--resume", "auto")
    assert resumed.returncode == 2, resumed.stdout
    assert message in resumed.stderr and "was trained on other data" in resumed.stderr, resumed.stderr
    assert len(resumed.stderr.strip().splitlines()) == 1


def test_a_second_launch_on_a_live_run_is_refused_and_a_dead_runs_lock_is_not(tmp_path, tiny_model_dir, hooks,
                                                                               run_main):
    import os
    import signal
    import time
    train = write_rows(tmp_path / "train.csv", synthetic_rows(64, seed=2))
    common = ["--model", tiny_model_dir, "--train_file", train, "--epochs", 1, "--batch_size", 8, "--max_length", 32,
              "--checkpoint_dir", tmp_path / "ck", "--run_name", "r", "--save_every_steps", 2, "--device", "cpu"]
    flag = tmp_path / "paused"
    live = subprocess.Popen([sys.executable, str(ROOT / "training" / "train_single.py"), *map(str, common)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env_with(hooks, PAUSE_AT_STEP=3, PAUSE_FLAG=flag))
    try:
        deadline = time.monotonic() + 120
        while not flag.exists() and live.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert flag.exists(), live.communicate()[1] if live.poll() is not None else "no pause"
        second = run_main("train_single.py", *common, "--resume", "auto")
        assert second.returncode == 2
        assert f"{tmp_path / 'ck' / 'r'} is in use by pid {live.pid}" in second.stderr, second.stderr
    finally:
        live.send_signal(signal.SIGKILL)  # dies holding the lock: the OS releases it
        live.communicate()
    resumed = run_main("train_single.py", *common, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at epoch 1, step 2" in resumed.stdout
    assert len(records(tmp_path / "ck" / "r", "epoch")) == 1  # one writer: one epoch record
    assert os.path.exists(tmp_path / "ck" / "r" / "final" / "model.safetensors")


def test_non_finite_loss_stops_naming_the_step_or_is_skipped(tmp_path, tiny_model_dir, hooks):
    train = write_rows(tmp_path / "train.csv", synthetic_rows(64, seed=2))
    common = ["--model", tiny_model_dir, "--train_file", train, "--epochs", 1, "--batch_size", 4, "--max_length", 32,
              "--checkpoint_dir", tmp_path, "--save_every_steps", 2, "--log_every", 4]
    proc = run_script("train_single.py", *common, "--run_name", "stop", env=env_with(hooks, NAN_AT_CALL=7))
    assert proc.returncode == 2, proc.stderr
    assert "non-finite loss at optimizer step 7 (epoch 1, batch 7 of the epoch)" in proc.stderr
    kept = sorted(p.name for p in (tmp_path / "stop" / "checkpoints").iterdir())
    assert kept == ["step-00000004", "step-00000006"]  # nothing saved after the bad step
    assert not (tmp_path / "stop" / "final").exists()
    proc = run_script("train_single.py", *common, "--run_name", "skip", "--skip_nonfinite",
                      env=env_with(hooks, NAN_AT_CALL="3,9"))
    assert proc.returncode == 0, proc.stderr
    assert "skipped 2 optimizer step(s) with a non-finite loss" in proc.stdout
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["skipped_nonfinite_steps"] == 2 and summary["final_val_loss"] == summary["final_val_loss"]


BAD_DATA = {
    "non-UTF-8 bytes": (b"text,label\ngood film,pos\nbad \xff film,neg\nok,neg\n", ".csv",
                        "line 3 is not valid UTF-8 (byte 0xff)"),
    "malformed CSV row": (b"text,label\na,pos\nb,neg,extra\nc,neg\n", ".csv", "Expected 2 fields in line 3"),
    "malformed JSONL row": (b'{"text": "a", "label": "pos"}\n{"text": "b" "label": "neg"}\n', ".jsonl",
                            "line 2 is not valid JSON"),
    "labels of mixed types": (b'{"text": "a", "label": 1}\n{"text": "b", "label": "neg"}\n', ".jsonl",
                              "all integers or all strings"),
    "missing label": (b"text,label\na,pos\nb,\nc,neg\n", ".csv", "have no label (first: row 2)"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_a_clear_error(tmp_path, tiny_model_dir, run_main, case):
    content, suffix, expected = BAD_DATA[case]
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    proc = run_main("train_single.py", "--model", tiny_model_dir, "--train_file", path,
                      "--checkpoint_dir", tmp_path / "ck")
    assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_long_texts_are_truncated_with_a_count(tmp_path, tiny_model_dir, run_main):
    rows = synthetic_rows(40, seed=3)
    rows[0]["text"] = " ".join(["good"] * 500)
    path = write_rows(tmp_path / "t.csv", rows)
    proc = run_main("train_single.py", "--model", tiny_model_dir, "--train_file", path, "--epochs", 1,
                    "--max_length", 16, "--checkpoint_dir", tmp_path / "ck", "--validation_fraction", 0.25,
                    "--long_texts", "truncate")
    assert proc.returncode == 0, proc.stderr
    assert "note: truncated" in proc.stdout and "to --max_length 16 tokens" in proc.stdout


def test_dataset_smaller_than_the_world_size_is_refused(tmp_path, tiny_model_dir, hooks):
    train = write_rows(tmp_path / "train.csv", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    proc = torchrun(3, "--model", tiny_model_dir, "--train_file", train, "--validation_file", train,
                    "--checkpoint_dir", tmp_path / "ck", env=env_with(hooks))
    assert proc.returncode != 0
    assert "2 training example(s) for 3 processes" in proc.stderr


def test_resume_from_an_older_checkpoint_replaces_the_abandoned_ones(tmp_path, tiny_model_dir, hooks, run_main):
    """The stopped run is a process of its own, with this process's thread count; the others run in this one."""
    train = write_rows(tmp_path / "train.csv", synthetic_rows(64, seed=4))
    common = ["--model", tiny_model_dir, "--train_file", train, "--validation_file", train, "--epochs", 1,
              "--batch_size", 4, "--max_length", 32, "--checkpoint_dir", tmp_path, "--save_every_steps", 4,
              "--keep_checkpoints", 3]
    assert run_script("train_single.py", *common, "--run_name", "a", env=env_with(
        hooks, STOP_AT_STEP=14, OMP_NUM_THREADS=torch.get_num_threads())).returncode == 143
    steps = lambda run: sorted(p.name for p in (tmp_path / run / "checkpoints").iterdir())  # noqa: E731
    assert steps("a") == ["step-00000008", "step-00000012", "step-00000014"]
    proc = run_main("train_single.py", *common, "--run_name", "a", "--keep_checkpoints", 1,
                    "--resume", tmp_path / "a" / "checkpoints" / "step-00000008")
    assert proc.returncode == 0, proc.stderr
    assert "resuming at epoch 1, step 8" in proc.stdout
    # step 12 and 14 were of the abandoned continuation; a finished run keeps only its last step checkpoint
    assert steps("a") == ["step-00000016"]
    assert run_main("train_single.py", *common, "--run_name", "b").returncode == 0
    first, again = weights(tmp_path / "b"), weights(tmp_path / "a")
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_fresh_start_in_an_unfinished_run_directory_drops_its_stale_metrics(tmp_path, tiny_model_dir, run_main):
    train = write_rows(tmp_path / "train.csv", synthetic_rows(32, seed=4))
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text('{"event": "step", "step": 5, "loss": 9.9}\n{"event": "ep')
    proc = run_main("train_single.py", "--model", tiny_model_dir, "--train_file", train, "--validation_file", train,
                    "--epochs", 1, "--batch_size", 8, "--max_length", 32, "--checkpoint_dir", tmp_path, "--run_name", "r",
                    "--resume", "auto", "--log_every", 1)
    assert proc.returncode == 0, proc.stderr
    assert "no checkpoint in" in proc.stdout
    assert [r["step"] for r in records(tmp_path / "r", "step")] == [1, 2, 3, 4]  # 32 / 8: none kept from before


def test_a_finished_run_resumed_has_nothing_to_train_and_keeps_its_models(tmp_path, tiny_model_dir, run_main):
    train = write_rows(tmp_path / "train.csv", synthetic_rows(64, seed=4))
    common = ["--model", tiny_model_dir, "--train_file", train, "--epochs", 2, "--batch_size", 8, "--max_length", 32,
              "--checkpoint_dir", tmp_path, "--run_name", "f", "--save_every_steps", 2, "--keep_checkpoints", 3]
    assert run_main("train_single.py", *common).returncode == 0
    run = tmp_path / "f"
    (kept,) = (run / "checkpoints").iterdir()  # 8 steps an epoch: the last one, step 16, alone
    assert kept.name == "step-00000016"
    state = torch.load(kept / "training_state.pt", weights_only=False)
    assert state["finished"] and "optimizer" not in state and state["epochs_completed"] == 2
    kept_files = ("metrics.jsonl", "summary.json", "checkpoints/step-00000016/training_state.pt",
                  "final/model.safetensors")
    before = {f: (run / f).read_bytes() for f in kept_files}
    again = run_main("train_single.py", *common, "--resume", "auto")
    assert again.returncode == 0, again.stderr
    assert f"{run} has finished: nothing left to train" in again.stdout and "epoch 1/2" not in again.stdout
    assert {f: (run / f).read_bytes() for f in kept_files} == before  # nothing rewritten, not even the clock
    proc = run_main("train_single.py", *common, "--resume", run / "final")
    assert proc.returncode == 2 and "that is a model alone" in proc.stderr and f"--resume {run}" in proc.stderr
    # a finish cut short before its summary: the resume writes it
    (run / "summary.json").unlink()
    assert run_main("train_single.py", *common, "--resume", "auto").returncode == 0
    assert json.loads((run / "summary.json").read_text())["epochs_run"] == 2


def test_best_is_linked_again_when_a_run_stopped_between_its_epochs_checkpoint_and_best(tmp_path, tiny_model_dir,
                                                                                       hooks):
    train = write_rows(tmp_path / "train.csv", synthetic_rows(64, seed=4))
    common = ["--model", tiny_model_dir, "--train_file", train, "--epochs", 2, "--batch_size", 8, "--max_length", 32,
              "--checkpoint_dir", tmp_path, "--run_name", "b", "--save_every_steps", 2]
    assert run_script("train_single.py", *common, env=env_with(hooks, STOP_AT_STEP=10)).returncode == 143
    run = tmp_path / "b"
    epoch_end, stopped = sorted((run / "checkpoints").iterdir())
    assert epoch_end.name == "step-00000008" and stopped.name == "step-00000010"
    shutil.rmtree(stopped)  # as if stopped after epoch 1's checkpoint was written and before best/ was
    shutil.rmtree(run / "best")
    resumed = run_script("train_single.py", *common, "--resume", "auto", env=env_with(hooks, STOP_AT_STEP=1))
    assert resumed.returncode == 143 and "resuming at epoch 2, step 8" in resumed.stdout
    assert (run / "best" / "model.safetensors").stat().st_ino == (epoch_end / "model.safetensors").stat().st_ino
