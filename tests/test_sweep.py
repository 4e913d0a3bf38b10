"""training/sweep.py through its command line: a grid over one prepared data set, a sampled search that
prunes, trials side by side (--parallel_trials), resumed, under DDP, and a trial re-run from its own
config.json (--config)."""
import json
import os
import time
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, assert_real_png, cli_env, made_once, on_cpu, run_script, synthetic_rows, write_rows
from test_resume import env_with, hooks  # noqa: F401 (hooks: the STOP_AT_STEP fixture)


def _data(d: Path) -> list:
    train = write_rows(d / "train.csv", synthetic_rows(240, seed=1))
    val = write_rows(d / "val.csv", synthetic_rows(80, seed=2))
    return ["--train_file", train, "--validation_file", val, "--max_length", 32, "--batch_size", 16,
            "--warmup_ratio", 0, "--no_progress"]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _epochs(run: Path) -> list:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == "epoch"]


@pytest.fixture(scope="module")
def grid(tiny_model_dir, tmp_path_factory):
    """A 4-trial grid of learning rates: 1e-5 is too small to learn the task in 3 epochs, 3e-3 learns it."""
    def make(d: Path) -> None:
        test = write_rows(d / "test.csv", synthetic_rows(60, seed=3))
        proc = run_script("sweep.py", "--model", tiny_model_dir, *_data(d), "--epochs", 3, "--test_file", test,
                          "--learning_rate", "1e-5,1e-4,1e-3,3e-3", "--seed", 1, "--sweep_dir", d / "sw")
        assert proc.returncode == 0, proc.stderr
        (d / "out.txt").write_text(proc.stdout)
    return made_once(tmp_path_factory, "sweep-grid", make)


def test_a_grid_finds_the_learning_rate_the_task_needs(grid):
    sw = grid / "sw"
    record = json.loads((sw / "sweep.json").read_text())
    assert [t["flags"] for t in record["trials"]] == [{"learning_rate": lr} for lr in ("1e-5", "1e-4", "1e-3", "3e-3")]
    for trial in record["trials"]:  # sweep.json is what each trial's own run says
        summary = _summary(sw / trial["name"])
        assert trial["status"] == "done" and trial["value"] == summary["best_val_accuracy"]
        assert trial["epochs_run"] == 3 and trial["time_s"] == summary["total_time_s"]
        config = json.loads((sw / trial["name"] / "config.json").read_text())["config"]
        assert config["learning_rate"] == float(trial["flags"]["learning_rate"])
        assert config["seed"] == 1
    value = {t["flags"]["learning_rate"]: t["value"] for t in record["trials"]}
    assert value["1e-5"] < 0.6 and value["3e-3"] > 0.9, value
    assert record["best"] in ("trial-003", "trial-004") and max(value.values()) == value[
        record["trials"][int(record["best"][-3:]) - 1]["flags"]["learning_rate"]]
    assert (sw / "best").resolve() == (sw / record["best"] / "best").resolve()
    assert (sw / "best" / "model.safetensors").is_file()
    assert_real_png(sw / "sweep.png")
    # the table: sorted by the metric, best first
    out = (grid / "out.txt").read_text()
    table = out[out.index("trial      learning_rate"):].splitlines()[1:5]
    values = [float(line.split()[2]) for line in table]
    assert values == sorted(values, reverse=True) and table[0].startswith(record["best"])
    assert out[:out.index("sweep of")].count("data: ") == 4 and (sw / "cache").is_dir()
    assert len([p for p in (sw / "cache").iterdir() if p.is_dir()]) == 1  # tokenized once for every trial


def test_the_chosen_trial_is_tested_once_on_the_test_file(grid, tmp_path, run_main):
    out = (grid / "out.txt").read_text()
    record = json.loads((grid / "sw" / "sweep.json").read_text())
    assert f"test set {grid / 'test.csv'}: {record['best']}, chosen on the validation split alone" in out
    assert out.index("test set") > out.index("sweep of 4 trial(s)")  # after the choice
    proc = run_main("evaluate.py", "--checkpoint", grid / "sw" / "best", "--data", grid / "test.csv",
                      "--output", tmp_path / "direct.json")
    assert proc.returncode == 0, proc.stderr
    tested, direct = (json.loads(p.read_text()) for p in (grid / "sw" / "test.json", tmp_path / "direct.json"))
    assert tested["examples"] == direct["examples"] == 60
    assert (tested["accuracy"], tested["loss"]) == (direct["accuracy"], direct["loss"])


def test_config_of_a_trial_reproduces_its_metric_exactly(grid, tmp_path, run_main):
    trial = grid / "sw" / "trial-004"
    proc = run_main("train_single.py", "--config", trial / "config.json", "--checkpoint_dir", tmp_path,
                    "--run_name", "again")
    assert proc.returncode == 0, proc.stderr
    a, b = _summary(trial), _summary(tmp_path / "again")
    assert (a["best_val_accuracy"], a["best_val_loss"], a["final_val_loss"]) == \
        (b["best_val_accuracy"], b["best_val_loss"], b["final_val_loss"])
    # a flag on the command line overrides the file's value
    proc = run_main("train_single.py", "--config", trial / "config.json", "--checkpoint_dir", tmp_path,
                    "--run_name", "lower", "--learning_rate", 1e-5, "--epochs", 1)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "lower" / "config.json").read_text())["config"]
    assert (config["learning_rate"], config["epochs"], config["seed"]) == (1e-5, 1, 1)


def test_bad_config_files_are_one_line_errors(tmp_path, run_main):
    cases = {"nope.json": None, "list.json": "[1, 2]", "unknown.json": '{"epoch": 3}',
             "type.json": '{"epochs": 1.5}'}
    expected = {"nope.json": "no such file", "list.json": "expected a JSON object",
                "unknown.json": "unknown setting(s) epoch", "type.json": "invalid int value: '1.5'"}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        proc = run_main("train_single.py", "--config", tmp_path / name)
        assert proc.returncode == 2 and proc.stderr == f"error: --config {tmp_path / name}: " \
            f"{proc.stderr.split(': ', 2)[2]}" and expected[name] in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_an_interrupted_sweep_continues_where_it_stopped(tiny_model_dir, tmp_path, hooks, run_main):
    args = ["--model", tiny_model_dir, *_data(tmp_path), "--epochs", 1, "--learning_rate", "1e-4,1e-3",
            "--sweep_dir", tmp_path / "sw"]
    # 240 training examples at 16: 15 steps a trial; SIGTERM after step 17, the second of trial 2
    stopped = run_script("sweep.py", *args, env=env_with(hooks, STOP_AT_STEP=17))
    assert stopped.returncode == 143, stopped.stderr
    assert "sweep stopped in trial-002: run the same command again to continue" in stopped.stdout
    first = (tmp_path / "sw" / "trial-001" / "summary.json").read_text()
    again = run_main("sweep.py", *args[2:], *args[:2])  # the same flags in another order: the same sweep
    assert again.returncode == 0, again.stderr
    assert "== trial-001" not in again.stdout and "resuming at epoch 1, step 2" in again.stdout, again.stdout
    assert (tmp_path / "sw" / "trial-001" / "summary.json").read_text() == first
    record = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [t["status"] for t in record["trials"]] == ["done", "done"]
    other = run_main("sweep.py", *args[:-4], "--learning_rate", "1e-4,1e-2", *args[-2:])
    assert other.returncode == 2 and "holds another sweep" in other.stderr and other.stderr.count("\n") == 1


def test_bad_sweep_flags_are_one_line_errors(tmp_path, run_main):
    cases = {("--learning_rate", "1e-5"): "nothing to sweep",
             ("--learning_rate", "1e-5,1e-5"): "give distinct values",
             ("--learning_rate", "1e-5,2e-5", "--run_name", "x"): "--run_name is the sweep's to set",
             ("--epochs", "1,x"): "invalid int value: 'x'",
             ("--epochs", "1,2", "--test_file", tmp_path / "none.csv"): "--test_file",
             ("--learning_rate", "1e-5:1e-3"): "is a range: say how many trials to sample",
             ("--learning_rate", "1e-3:1e-5", "--trials", "4"): "a range needs LOW < HIGH",
             ("--learning_rate", "0:1e-3:log", "--trials", "4"): "LOW > 0 on a log scale",
             ("--epochs", "1:x", "--trials", "4"): "invalid int bound",
             ("--learning_rate", "1e-5:1e-3:lin", "--trials", "4"): "LOW:HIGH or LOW:HIGH:log",
             ("--learning_rate", "1e-5,2e-5", "--trials", "0"): "--trials 0: give a whole number",
             ("--learning_rate", "1e-5,2e-5", "--pruner", "top"): "--pruner top: choose from median, none",
             ("--learning_rate", "1e-5,2e-5", "--parallel_trials", "x"): "--parallel_trials x",
             ("--learning_rate", "-1:1e-3", "--trials", "2"): "--learning_rate must be positive, got -1.0",
             ("--learning_rate", "1e-4,1e-3", "--trials", "3"): "--trials 3: the lists give 2 combination(s)",
             ("--seed", "1:3", "--trials", "6"): "--trials 6: the space holds 3 combination(s); ask for at most 3",
             ("--seed", "1:3", "--epochs", "1,2", "--trials", "7"): "--trials 7: the space holds 6 combination(s)",
             ("--learning_rate", "1e-4,1e-3", "--max_length", "32,64:2"): "invalid int bound",
             ("--learning_rate", "1e-4,1e-3", "--model", "default,./no-such-model"):
                 "--model ./no-such-model: no such directory",
             ("--learning_rate", "1e-4,1e-3", "--warmup_ratio", "0.1", "--threshold", "0.1,0.2"):
                 "--threshold cannot be searched",
             ("--learning_rate", "1e-4,1e-3", "--parallel_trials", "99", "--device", "cuda"):
                 "at most one trial per GPU" if _has_cuda() else "--device cuda: CUDA is not available"}
    for args, expected in cases.items():  # in this process: what a fresh one answers (run_in_process)
        proc = run_main("sweep.py", *args, "--sweep_dir", tmp_path / "sw")
        assert proc.returncode == 2 and expected in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "sw").exists()
    (tmp_path / "file").write_text("")
    proc = run_main("sweep.py", "--learning_rate", "1e-4,1e-3", "--sweep_dir", tmp_path / "file" / "sw")
    assert proc.returncode == 2 and proc.stderr == f"error: --sweep_dir {tmp_path / 'file' / 'sw'}: cannot create " \
        f"it (Not a directory)\n", proc.stderr


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def test_under_two_gloo_processes_both_ranks_run_the_same_trials(tiny_model_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "training" / "sweep.py"),
           *on_cpu("sweep.py", ["--model", tiny_model_dir, *_data(tmp_path), "--epochs", 1,
                                "--learning_rate", "1e-4:1e-2:log", "--trials", 2, "--sweep_dir", tmp_path / "sw"])]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [t["status"] for t in record["trials"]] == ["done", "done"]
    for trial in record["trials"]:
        config = json.loads((tmp_path / "sw" / trial["name"] / "config.json").read_text())
        assert config["world_size"] == 2
        epoch = [json.loads(x) for x in (tmp_path / "sw" / trial["name"] / "metrics.jsonl").read_text()
                 .splitlines() if '"epoch"' in x][-1]
        assert epoch["val_examples"] == 80  # both ranks evaluated, every example counted once
    assert proc.stdout.count("sweep of 2 trial(s)") == 1  # rank 0 alone reports
    # rank 0 sampled each learning rate and both ranks trained with it: one run, one config per trial
    rates = [float(t["flags"]["learning_rate"]) for t in record["trials"]]
    assert all(1e-4 <= r <= 1e-2 for r in rates) and rates[0] != rates[1]
    assert [json.loads((tmp_path / "sw" / t["name"] / "config.json").read_text())["config"]["learning_rate"]
            for t in record["trials"]] == rates


def test_a_sampled_search_prunes_the_poor_trials(tiny_model_dir, tmp_path, run_main):
    # by the validation loss (lower is better: the study's values are signed), which has no ties
    args = ["--model", tiny_model_dir, *_data(tmp_path), "--epochs", 3, "--learning_rate", "1e-5:1e-2:log",
            "--seed", 1, "--metric_for_best", "loss", "--sweep_dir", tmp_path / "sw"]
    proc = run_main("sweep.py", *args, "--trials", 7)
    assert proc.returncode == 0, proc.stderr
    sw = tmp_path / "sw"
    record = json.loads((sw / "sweep.json").read_text())
    assert record["search"].startswith("sampled") and record["pruner"] == "median"
    assert [t["name"] for t in record["trials"]] == [f"trial-{i:03d}" for i in range(1, 8)]
    rates = [float(t["flags"]["learning_rate"]) for t in record["trials"]]
    assert all(1e-5 <= r <= 1e-2 for r in rates) and len(set(rates)) == 7
    pruned = [t for t in record["trials"] if t["status"] == "pruned"]
    assert pruned, [(t["flags"], t["value"], t["status"]) for t in record["trials"]]
    for t in pruned:  # stopped before its last epoch, worse than the median of the trials finished before it
        run = sw / t["name"]
        summary = _summary(run)
        assert summary["stopped_early"] and summary["stop_reason"].startswith("pruned by the sweep")
        assert t["epochs_run"] == summary["epochs_run"] == len(_epochs(run)) < 3 and (run / "final").is_dir()
        epoch = t["epochs_run"]
        # the finished trials' best by the same share of their (equal) schedules, as reported to the pruner
        earlier = [min(e["val_loss"] for e in _epochs(sw / u["name"])[:epoch])
                   for u in record["trials"][:int(t["name"][-3:]) - 1] if u["status"] == "done"]
        assert epoch >= 2  # never in the first half of its schedule
        assert len(earlier) >= 3 and min(e["val_loss"] for e in _epochs(run)) > statistics.median(earlier), \
            (t, earlier)
    best = next(t for t in record["trials"] if t["name"] == record["best"])
    assert best["status"] == "done" and best["epochs_run"] == 3
    assert best["value"] == min(t["value"] for t in record["trials"] if t["status"] == "done")
    assert best["value"] < 0.68  # it learned: a guess is ln 2 = 0.693
    assert "pruned" in proc.stdout[proc.stdout.index("sweep of 7 trial(s)"):]
    # a larger --trials goes on with the same study: the finished trials are kept as they are
    before = {t["name"]: (sw / t["name"] / "summary.json").read_text() for t in record["trials"]}
    more = run_main("sweep.py", *args, "--trials", 8)
    assert more.returncode == 0, more.stderr
    assert more.stdout.count("\n== trial-") == 1 and "== trial-008 of 8" in more.stdout
    again = json.loads((sw / "sweep.json").read_text())
    assert len(again["trials"]) == 8 and all((sw / n / "summary.json").read_text() == v for n, v in before.items())


def test_parallel_trials_share_the_grid_and_match_trials_run_one_by_one(grid, tiny_model_dir, tmp_path):
    """The grid fixture's trials again, two at a time in two worker processes on the CPU."""
    proc = run_script("sweep.py", "--model", tiny_model_dir, *_data(tmp_path), "--epochs", 3, "--seed", 1,
                      "--learning_rate", "1e-5,1e-4,1e-3,3e-3", "--parallel_trials", 2, "--sweep_dir", tmp_path / "sw")
    assert proc.returncode == 0, proc.stderr
    sw = tmp_path / "sw"
    record, alone = (json.loads((d / "sweep.json").read_text()) for d in (sw, grid / "sw"))
    assert {t["worker"] for t in record["trials"]} == {"0", "1"}  # both workers took trials
    for t, u in zip(record["trials"], alone["trials"]):
        assert (t["name"], t["flags"], t["status"]) == (u["name"], u["flags"], "done")
        assert len(_epochs(sw / t["name"])) == 3  # each trial trained once, by one worker
        a, b = _summary(sw / t["name"]), _summary(grid / "sw" / u["name"])
        assert a["best_val_accuracy"] == b["best_val_accuracy"]
        assert abs(a["best_val_loss"] - b["best_val_loss"]) < 1e-5 * b["best_val_loss"]
    assert record["best"] == alone["best"] and (sw / "best" / "model.safetensors").is_file()
    assert proc.stdout.count("data: ") == 1  # tokenized once, by the parent, before the workers start
    assert len([p for p in (sw / "cache").iterdir() if p.is_dir()]) == 1
    for k in (0, 1):
        assert f"worker {k} on cpu: log {sw / f'worker-{k}.log'}" in proc.stdout
        assert "== trial-" in (sw / f"worker-{k}.log").read_text()


def test_an_interrupted_sampled_search_resumes_its_trial_and_the_pruner_sees_every_epoch(tiny_model_dir, tmp_path,
                                                                                      hooks, run_main):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    args = ["--model", tiny_model_dir, *_data(tmp_path), "--epochs", 3, "--learning_rate", "1e-4:1e-2:log",
            "--trials", 3, "--seed", 1, "--sweep_dir", tmp_path / "sw"]
    # 15 steps an epoch: SIGTERM after step 20, in trial-001's second epoch
    stopped = run_script("sweep.py", *args, env=env_with(hooks, STOP_AT_STEP=20))
    assert stopped.returncode == 143 and "sweep stopped in trial-001" in stopped.stdout, stopped.stdout
    assert "resume with the same command again" in stopped.stdout  # the sweep's command, not the trial's flags
    again = run_main("sweep.py", *args[2:], *args[:2])  # the same flags in another order: the same sweep
    assert again.returncode == 0, again.stderr
    assert "resuming at epoch 2, step 20" in again.stdout and again.stdout.count("\n== trial-") == 3
    sw = tmp_path / "sw"
    record = json.loads((sw / "sweep.json").read_text())
    assert [t["name"] for t in record["trials"]] == ["trial-001", "trial-002", "trial-003"]
    assert [len(_epochs(sw / t["name"])) for t in record["trials"]] == [3, 3, 3]  # none trained twice
    study = optuna.load_study(study_name="sweep", storage=JournalStorage(JournalFileBackend(str(sw / "study.log"))))
    first = [t for t in study.trials if t.user_attrs["run_name"] == "trial-001"]
    assert [t.state.name for t in first] == ["FAIL", "COMPLETE"]  # the interrupted trial, and its continuation
    # the continuation reported epoch 1 too (from the run's records), so the pruner judges its whole run: each
    # percent of the schedule, the best value by then
    assert sorted(first[1].intermediate_values) == list(range(1, 101))
    assert first[1].intermediate_values[33] == _epochs(sw / "trial-001")[0]["val_accuracy"]


def test_a_parallel_sweep_stopped_by_sigterm_continues_with_the_same_command(tiny_model_dir, tmp_path):
    import signal
    import time

    rows = write_rows(tmp_path / "big.csv", synthetic_rows(600, seed=4))
    args = on_cpu("sweep.py", ["--model", tiny_model_dir, *_data(tmp_path)[2:], "--train_file", rows, "--epochs", 2,
                               "--learning_rate", "1e-4,1e-3,3e-3", "--parallel_trials", 2,
                               "--sweep_dir", tmp_path / "sw"])
    cmd = [sys.executable, str(ROOT / "training" / "sweep.py"), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "sw").glob("trial-*/metrics.jsonl")):
        time.sleep(0.2)  # until a trial trains
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, (out, err)
    assert "sweep stopped: run the same command again to continue" in out and "error" not in err, err
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=cli_env())
    assert again.returncode == 0, again.stderr
    record = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [t["status"] for t in record["trials"]] == ["done"] * 3  # the stopped ones and the one not started
    assert [len(_epochs(tmp_path / "sw" / t["name"])) for t in record["trials"]] == [2, 2, 2]
    logs = "".join((tmp_path / "sw" / f"worker-{k}.log").read_text() for k in (0, 1))
    assert "resuming at epoch" in logs  # a stopped trial went on from its checkpoint, not from the start


def test_a_second_launch_on_a_live_sweep_says_to_wait_not_to_resume(tmp_path):
    """A trial whose run directory another live process holds: the sweep's own advice (not --resume auto, which
    the sweep does not take)."""
    from types import SimpleNamespace

    from encoderfit.search.study import Study
    from encoderfit.utils import UserError

    (tmp_path / "sw" / "trial-001").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from encoderfit.run.trainer import RunLock; held = RunLock(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(120)", str(tmp_path / "sw" / "trial-001")],
                              stdout=subprocess.PIPE, text=True, env=cli_env(PYTHONPATH=str(ROOT / "src")))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError) as err:
            Study._not_in_use(SimpleNamespace(dir=tmp_path / "sw"), "trial-001")
        message = str(err.value)
        assert message.startswith(f"{tmp_path / 'sw'} is in use: its trial-001 is being trained by pid {holder.pid}")
        assert "run the same sweep command again" in message and "--resume" not in message
    finally:
        holder.kill()
        holder.wait()
    Study._not_in_use(SimpleNamespace(dir=tmp_path / "sw"), "trial-001")  # free once that process is gone


def test_a_trial_that_fell_back_to_the_loss_is_ranked_by_the_sweeps_metric():
    """Pearson undefined in a trial (its best/ chosen by the loss): the sweep still ranks by Pearson, so that
    trial's value is undefined and ranks last, not its negated loss among other trials' correlations."""
    from types import SimpleNamespace

    from encoderfit.cli.sweep import _outcome, _signed

    summary = {"metric_for_best": "loss", "higher_is_better": False, "metric_requested": "pearson",
               "requested_higher_is_better": True, "best_val_pearson": None, "best_val_loss": 0.04, "best_epoch": 2,
               "epochs_run": 2, "total_time_s": 1.0, "stop_reason": None}
    config = {n: 1 for n in ("learning_rate", "epochs", "batch_size", "warmup_ratio", "weight_decay", "seed")}
    outcome = _outcome(SimpleNamespace(summary=summary, config=config, run_dir=Path("trial-001")))
    assert outcome["metric"] == "pearson" and outcome["higher_is_better"] is True
    assert outcome["value"] != outcome["value"] and _signed(outcome) != _signed(outcome)  # NaN: ranked last


def test_schedule_steps_put_each_epoch_at_its_share_of_the_schedule():
    from encoderfit.search.study import schedule_steps

    short = dict(schedule_steps([(1, 0.5), (2, 0.4)], 2))
    assert sorted(short) == list(range(1, 101)) and short[50] == 0.5 and short[51] == 0.5 and short[100] == 0.5
    long = dict(schedule_steps([(1, 0.1), (2, 0.3), (3, 0.2)], 10))
    assert sorted(long) == list(range(1, 31)) and long[10] == 0.1 and long[11] == 0.3 and long[30] == 0.3
    assert dict(schedule_steps([(1, 0.2)], 3))[33] == 0.2 and 34 not in dict(schedule_steps([(1, 0.2)], 3))


def test_a_long_schedule_is_not_pruned_for_warming_up_but_a_poor_one_is(tmp_path):
    """The case a user met: short schedules (2 epochs) finished first; a long one (10 epochs) of the same learning
    rate is worse than all of them after its first epoch, but is only judged from half its schedule on, against
    their values at the same share (their first epoch), where it has caught up; a long trial still poor there is
    pruned."""
    from encoderfit.search.study import Dimension, Space, Study

    dims = {"learning_rate": Dimension.parse("learning_rate", "1e-5,2e-5,3e-5,4e-5"),
            "epochs": Dimension.parse("epochs", "2,10")}
    study = Study(tmp_path, Space.from_flags(dims, None, "median"), [])
    study.begin()
    jobs = [study.next_trial() for _ in range(8)]
    short = [j for j in jobs if j["flags"]["epochs"] == "2"]
    long = [j for j in jobs if j["flags"]["epochs"] == "10"]
    for j, start in zip(short, (0.80, 0.82, 0.84)):  # 0.80-0.84 after epoch 1, then a little better
        assert not study.report(j["number"], [(1, start), (2, start + 0.02)], 2)
        study.tell(j["number"], "done", start + 0.02)
    warming = long[0]["number"]
    climb = [0.40, 0.60, 0.75, 0.80, 0.86, 0.90]  # worse than every short trial's first epoch, at first
    for epoch in range(1, 7):
        assert not study.report(warming, [(e, climb[e - 1]) for e in range(1, epoch + 1)], 10), epoch
    poor = long[1]["number"]
    history = [(e, 0.40 + 0.05 * e) for e in range(1, 6)]  # 0.65 by half its schedule: under the median 0.82
    assert not study.report(poor, history[:4], 10)  # 40%: not judged yet
    assert study.report(poor, history, 10)  # 50%: judged, and pruned


def test_models_and_max_lengths_are_searched_and_help_lists_the_options(tiny_model_dir, tmp_path, run_main):
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    data = [a for a in _data(tmp_path) if a not in ("--max_length", 32)]
    proc = run_script("sweep.py", "--model", f"{tiny_model_dir},{other}", "--max_length", "16,24", *data,
                      "--epochs", 1, "--learning_rate", "1e-3", "--sweep_dir", tmp_path / "sw")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    seen = {(json.loads((tmp_path / "sw" / t["name"] / "config.json").read_text())["config"]["model"],
             json.loads((tmp_path / "sw" / t["name"] / "config.json").read_text())["config"]["max_length"])
            for t in record["trials"]}
    assert seen == {(str(m), n) for m in (tiny_model_dir, other) for n in (16, 24)}
    assert {t["flags"]["max_length"] for t in record["trials"]} == {"16", "24"}
    assert "resume:" not in proc.stdout  # a fresh trial has nothing to resume: nothing said
    shown = run_main("sweep.py", "--help")
    assert shown.returncode == 0
    for flag in ("--sweep_dir", "--trials", "--pruner", "--parallel_trials", "--test_file"):
        assert f"\n  {flag} " in shown.stdout, flag
    assert "--learning_rate, --epochs, --batch_size, --warmup_ratio, --weight_decay, --seed, --max_length, --model" \
        in shown.stdout


def test_a_time_budget_stops_the_trial_in_flight_at_an_epochs_end_and_starts_no_other(tiny_model_dir, tmp_path):
    """sweep(time_budget=...): the Python API's sweep; the trial running when the budget is spent stops at its
    next epoch's end with its best/, ranked as a finished trial, and no trial starts after it."""
    from encoderfit import sweep
    from encoderfit.cli.sweep import BUDGET_SPENT, DEADLINE_ENV

    train, val = (str(a) for a in _data(tmp_path)[1:4:2])
    started = time.time()
    record = sweep(train, val, model=str(tiny_model_dir), max_length=32, batch_size=16, epochs=40, no_progress=True,
                   device="cpu", learning_rate="1e-4:1e-3:log", time_budget="6s", sweep_dir=tmp_path / "sw")
    wall = time.time() - started
    trials = record["trials"]
    assert record["search"].startswith("sampled") and record["space"] == {"learning_rate": "0.0001:0.001:log"}
    last = _summary(tmp_path / "sw" / trials[-1]["name"])
    assert last["stop_reason"] == BUDGET_SPENT and last["epochs_run"] < 40
    assert trials[-1]["status"] == "done" and trials[-1]["value"] == trials[-1]["value"]  # ranked, not pruned
    assert record["best_checkpoint"] == (tmp_path / "sw" / record["best"] / "best").resolve()
    assert (record["best_checkpoint"] / "model.safetensors").is_file() and record["test"] is None
    for t in trials:  # every trial but the last ran its 40 epochs (none would fit in 6 s)
        assert t["epochs_run"] == 40 or t is trials[-1]
    assert wall < 60 and DEADLINE_ENV not in os.environ
