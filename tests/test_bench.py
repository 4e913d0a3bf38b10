"""The benchmark's tiny CPU mode: a smoke test of both systems and of the numbers it reports (no timing asserted)."""
import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT, cli_env, tail


def test_bench_tiny_runs_ours_and_trainer_and_reports_consistent_numbers(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--tiny", "--device", "cpu",
                           "--systems", "ours,trainer",
                           "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=cli_env())
    assert proc.returncode == 0, tail(proc.stderr)
    rows = {r["system"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"ours", "trainer"}
    for r in rows.values():
        assert len(r["window_s"]) == 2 and all(t > 0 for t in r["window_s"])
        assert r["warmup_s"] > 0  # the untimed first window is reported apart, not in the median
        # the median of two windows is their mean (window_s is rounded to 0.1 ms, hence the tolerance)
        assert math.isclose(r["samples_per_s"], r["examples"] / (sum(r["window_s"]) / 2), rel_tol=1e-2)
        assert math.isclose(r["tokens_per_s"] / r["samples_per_s"], r["real_tokens"] / r["examples"], rel_tol=1e-9)
    assert math.isclose(rows["ours"]["vs_trainer"], rows["ours"]["samples_per_s"] / rows["trainer"]["samples_per_s"])
    assert rows["trainer"]["vs_trainer"] == 1.0
    assert "samples/s" in proc.stdout and "vs Trainer" in proc.stdout


def test_bench_variant_names_parse_into_levers():
    sys.path.insert(0, str(ROOT / "bench"))
    import bench
    assert bench.parse_variants(["ours", "ours+graphs-group+workers4", "ours-bf16+workers0"]) == {
        "ours": {}, "ours+graphs-group+workers4": {"graphs": True, "group": False, "num_workers": 4},
        "ours-bf16+workers0": {"bf16": False, "num_workers": 0}}


@pytest.mark.parametrize("systems, message", [
    ("ours,trainr", "unknown system 'trainr'"),
    ("ours+grphs", "unknown lever '+grphs'"),
    ("ours+graphs", "need a CUDA device"),
])
def test_bench_refuses_unknown_systems_and_levers(systems, message, run_main):
    args = ["--tiny", "--device", "cpu", "--systems", systems]
    if systems == "ours,trainr":  # one through a new process; the others run the script in this one
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, env=cli_env())
    else:
        proc = run_main("bench/bench.py", *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_loader_bench_reports_collate_times_and_padding():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "loader.py"), "--model", "tiny", "--batches", "2",
                           "--steps", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=cli_env())
    assert proc.returncode == 0, tail(proc.stderr)
    collate, workers = proc.stdout.split("\n\n")
    rows = [line.split() for line in collate.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [("short", "32"), ("short", "256"), ("long", "32"), ("long", "256")]
    for r in rows:
        pad8, pad32 = float(r[5].rstrip("%")), float(r[6].rstrip("%"))
        assert 0 <= pad8 <= pad32 < 100  # a coarser multiple can only add padding
        assert float(r[2]) > 0 and float(r[3]) > 0
    # what a batch costs the training process from two workers and in-process
    rows = [line.split() for line in workers.strip().splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [("short", "32"), ("long", "256")]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)


def test_job_bench_runs_both_whole_jobs_on_the_same_settings(tmp_path, tiny_model_dir):
    """bench/job.py: ours and the plain Trainer script on one pair task, each a whole process, same settings."""
    from test_tasks import pair_rows, write_csv

    train = write_csv(tmp_path / "train.csv", pair_rows(64, seed=1))
    val = write_csv(tmp_path / "val.csv", pair_rows(24, seed=2))
    out, work = tmp_path / "job.jsonl", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "job.py"), "--train_file", str(train),
                           "--validation_file", str(val), "--task", "single_label", "--text_column", "sentence1",
                           "--text_pair_column", "sentence2", "--model", str(tiny_model_dir), "--epochs", "2",
                           "--learning_rate", "1e-3", "--max_length", "32", "--device", "cpu", "--work_dir", str(work),
                           "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=cli_env())
    assert proc.returncode == 0, tail(proc.stderr)
    rows = {r["system"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"ours", "trainer"}
    for r in rows.values():
        assert 0 < r["train_s"] < r["wall_s"] and 0 <= r["accuracy"] <= 1
    # the same job: two epochs of the pair task at the given settings, on both sides
    ours = json.loads((work / "ours" / "config.json").read_text())["config"]
    assert (ours["epochs"], ours["learning_rate"], ours["text_pair_column"]) == (2, 1e-3, "sentence2")
    # the Trainer's own arguments, as it ran: 64 examples at 32 for 2 epochs, 6% warm-up rounded up, CPU
    assert rows["trainer"]["settings"] == {"epochs": 2, "batch_size": 32, "learning_rate": 1e-3, "weight_decay": 0.01,
                                           "warmup_steps": 1, "max_steps": 4, "device": "cpu"}
    trainer = json.loads((work / "trainer" / "final" / "config.json").read_text())
    assert trainer["problem_type"] == "single_label_classification" and sorted(trainer["label2id"]) == ["both", "not"]
    ratio = rows["trainer"]["wall_s"] / rows["ours"]["wall_s"]
    assert f"Trainer's wall time / ours: {ratio:.2f}x" in proc.stdout


def test_long_texts_bench_runs_each_mode_and_reports_its_runs(tmp_path, tiny_model_dir):
    """bench/long_texts.py: one run per mode (and seed), each through the training CLI; its JSON lines carry
    what the runs recorded (documents, windows, the last epoch's accuracy)."""
    from test_long_texts import long_rows, window_ids, write_jsonl
    from transformers import AutoTokenizer

    train = write_jsonl(tmp_path / "train.jsonl", long_rows(60, seed=11))
    val = write_jsonl(tmp_path / "val.jsonl", long_rows(20, seed=12))
    cmd = [sys.executable, str(ROOT / "bench" / "long_texts.py"), "--train_file", str(train), "--validation_file",
           str(val), "--modes", "truncate,windows", "--seeds", "1", "--output", str(tmp_path / "out.jsonl"), "--",
           "--model", str(tiny_model_dir), "--max_length", "32", "--epochs", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["seed"]) for r in rows] == [("truncate", 1), ("windows", 1)]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [json.loads(x)["text"] for x in train.read_text().splitlines()]
    windows = sum(len(window_ids(tok, t, 32, 8)) for t in texts)
    assert [r["train_windows"] for r in rows] == [60, windows] and windows > 120
    assert all(r["val_documents"] == 20 and 0 <= r["value"] <= 1 and r["wall_s"] > r["train_s"] > 0 for r in rows)
    table = proc.stdout.splitlines()
    assert table[1].split()[0] == "mode" and [line.split()[0] for line in table[2:]] == ["truncate", "windows"]


def test_scaling_bench_runs_one_and_two_gloo_processes_and_reports_efficiency(tmp_path):
    out = tmp_path / "scaling.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scaling.py"), "--tiny", "--device", "cpu",
                           "--world_sizes", "1,2", "--output", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=cli_env())
    assert proc.returncode == 0, tail(proc.stderr)
    one, two = map(json.loads, out.read_text().splitlines())
    assert (one["world_size"], two["world_size"]) == (1, 2) and one["backend"] == two["backend"] == "gloo"
    assert two["examples"] == 2 * one["examples"] == 2 * 8 * 4  # weak scaling: the same share per rank
    for r in (one, two):
        assert len(r["window_s"]) == 2 and math.isclose(r["samples_per_s"], r["examples"] / (sum(r["window_s"]) / 2),
                                                        rel_tol=1e-2)
    assert one["efficiency"] == 1.0
    assert math.isclose(two["efficiency"], two["samples_per_s"] / (2 * one["samples_per_s"]))
    assert f"{100 * two['efficiency']:.1f}%" in proc.stdout


def test_bench_ddp_lever_runs_ours_at_world_size_one_through_the_ddp_path(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--tiny", "--device", "cpu",
                           "--systems", "ours,ours+ddp", "--output", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=cli_env())
    assert proc.returncode == 0, tail(proc.stderr)
    rows = {r["system"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"ours", "ours+ddp"} and rows["ours+ddp"]["examples"] == rows["ours"]["examples"]
    assert all(t > 0 for t in rows["ours+ddp"]["window_s"])


def test_sst2_sized_set_resamples_training_rows_only_and_keeps_validation_apart(tmp_path):
    import csv

    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "public_data.py"), "--sets", "reviews_67k",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=cli_env())
    assert proc.returncode == 0, tail(proc.stderr)

    def read(split):
        with open(tmp_path / "reviews_67k" / f"{split}.csv", newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    train, validation = read("train"), read("validation")
    assert len(train) == 67_349  # SST-2's training size, drawn with replacement
    texts = {r["text"] for r in validation}
    assert len(texts) == len(validation) > 1000  # the validation rows are distinct reviews, each once
    unique_train = {r["text"] for r in train}
    assert not texts & unique_train  # no review is in both
    assert len(unique_train) < len(train)  # drawn with replacement: repeats
    assert 8 * len(texts) <= len(unique_train) <= 9 * len(texts) + 9  # about all of the other 90% drawn at least once
    assert {r["label"] for r in train} == {r["label"] for r in validation} == {"fresh", "rotten"}


def test_profile_kernel_kinds_sort_kernels_and_rate_the_gemms():
    sys.path.insert(0, str(ROOT / "bench"))
    import types

    import profile_step as P
    import torch

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [("flash_fwd_kernel<cutlass::bfloat16_t>", cuda, 3000), ("nvjet_tst_128x256_h_bz", cuda, 8000),
              ("sm90_xmma_gemm_bf16bf16", cuda, 2000), ("multi_tensor_apply_kernel<FusedAdamMathFunctor>", cuda, 1000),
              ("Memcpy DtoD (Device -> Device)", cuda, 500), ("at::native::copy_kernel", cuda, 1500),
              ("vectorized_elementwise_kernel", cuda, 4000), ("aten::mm", cpu, 99000), ("idle", cuda, 0)]
    prof = types.SimpleNamespace(key_averages=lambda: [
        types.SimpleNamespace(key=k, device_type=d, self_device_time_total=us) for k, d, us in events])
    kinds = P.kernel_kinds(prof, steps=2)  # microseconds over 2 steps -> ms a step
    assert kinds == {"attention": 1.5, "GEMM": 5.0, "optimizer": 0.5, "copies": 1.0, "the rest": 2.0}
    line = P.kinds_line(kinds, gemm_flops=2.5e12, attention_flops=0.15e12, peak=800.0)
    # 2.5 TFLOP in 5 ms: 500 TFLOP/s; 0.15 TFLOP in 1.5 ms: 100 TFLOP/s; together 2.65 TFLOP in 6.5 ms of 800
    assert "GPU 10.00 ms a step" in line and "GEMMs 500 TFLOP/s" in line and "attention 100 TFLOP/s" in line
    assert f"MFU if nothing else took time: {100 * 2.65 / 6.5e-3 / 800:.1f}%" in line
    # which operations launched them: an op's own kernels, keyed by its chain of parents
    K = lambda name, us: types.SimpleNamespace(name=name, duration=us)  # noqa: E731
    step = types.SimpleNamespace(name="train_step", cpu_parent=None, kernels=[])
    bwd = types.SimpleNamespace(name="autograd::engine::evaluate_function: IndexSelectBackward0", cpu_parent=None,
                                kernels=[])
    ops = [types.SimpleNamespace(name="aten::copy_", cpu_parent=types.SimpleNamespace(
               name="aten::contiguous", cpu_parent=step, kernels=[]), kernels=[K("direct_copy_kernel", 300)] * 2),
           types.SimpleNamespace(name="aten::index_add_", cpu_parent=bwd, kernels=[K("indexFuncLargeIndex", 100)]),
           types.SimpleNamespace(name="aten::mm", cpu_parent=step, kernels=[K("nvjet_tst_64x8", 900)])]
    table = P.callers(types.SimpleNamespace(events=lambda: [step, bwd] + ops), steps=2)
    assert [(kind, chain, round(ms, 3)) for (kind, chain), (ms, _) in table] == [
        ("GEMM", "train_step > aten::mm", 0.45), ("copies", "train_step > aten::contiguous > aten::copy_", 0.3),
        ("the rest", "bwd:IndexSelectBackward0 > aten::index_add_", 0.05)]
