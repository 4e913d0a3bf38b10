"""The whole job, as a user waits for it: one data set through this project's CLI and through a plain
Hugging Face Trainer script (``bench/trainer_job.py``), back to back in one command, with the same
model, data, epochs, batch size, learning rate, warm-up, weight decay and maximum length.

    python bench/job.py --train_file data/public/vader_movies/train.csv \\
        --validation_file data/public/vader_movies/validation.csv --task regression --label_column score

Each system runs as its own process, timed from launch to exit (imports, data, tokenization, model
load, training, evaluation each epoch, checkpoints). It prints a JSON line per system and a table:
wall seconds, the task's validation metric (accuracy, Pearson, micro-F1) after the last epoch, and
the Trainer's wall time over ours.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from encoderfit.tasks.registry import TASKS  # noqa: E402

# each task's default --metric_for_best: the metric both systems are compared on
METRIC = {name: shape.default_metric for name, shape in TASKS.items()}


def _run(cmd: list, log: Path) -> tuple:
    # one GPU for both: a Trainer outside torchrun would otherwise spread over every visible GPU
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"error: {cmd[1]} exited with {proc.returncode}; its output: {log}\n{proc.stderr[-2000:]}")
    return wall, proc.stdout


def run_ours(args, model: str, work: Path) -> dict:
    cmd = [sys.executable, "training/train_single.py", "--model", model, "--train_file", args.train_file,
           "--validation_file", args.validation_file, "--task", args.task, "--text_column", args.text_column,
           "--label_column", args.label_column, "--text_pair_column", args.text_pair_column or "none",
           "--epochs", args.epochs, "--batch_size", args.batch_size, "--learning_rate", args.learning_rate,
           "--max_length", args.max_length, "--checkpoint_dir", work, "--run_name", "ours", "--no_progress",
           "--device", args.device]
    wall, out = _run(cmd, work / "ours.log")
    summary = json.loads((work / "ours" / "summary.json").read_text())
    epochs = [r for r in map(json.loads, (work / "ours" / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "epoch"]
    metric = METRIC[args.task]
    return {"system": "ours", "wall_s": round(wall, 2), metric: summary[f"final_val_{metric}"],
            "train_s": round(sum(r["epoch_time_s"] for r in epochs), 2),
            "eval_s": round(sum(r["eval_time_s"] for r in epochs), 2), "reported_total_s": summary["total_time_s"],
            "breakdown_s": summary["time_breakdown_s"]}


def run_trainer(args, model: str, work: Path) -> dict:
    cmd = [sys.executable, "bench/trainer_job.py", "--model", model, "--train_file", args.train_file,
           "--validation_file", args.validation_file, "--task", args.task, "--text_column", args.text_column,
           "--label_column", args.label_column, "--epochs", args.epochs, "--batch_size", args.batch_size,
           "--learning_rate", args.learning_rate, "--max_length", args.max_length, "--output_dir", work / "trainer"]
    if args.device == "cpu":
        cmd += ["--use_cpu"]
    if args.text_pair_column:
        cmd += ["--text_pair_column", args.text_pair_column]
    wall, out = _run(cmd, work / "trainer.log")
    result = json.loads(out.strip().splitlines()[-1])
    metric = METRIC[args.task]
    eval_s = sum(e["runtime"] for e in result["epochs"])
    # train(): its steps, evaluations and checkpoint saves; train_s leaves out the evaluations, as ours does
    return {"system": "trainer", "wall_s": round(wall, 2), metric: result["final"][metric],
            "train_s": round(result["train_loop_s"] - eval_s, 2), "eval_s": round(eval_s, 2),
            "reported_total_s": result["total_s"], "settings": result["settings"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train_file", required=True)
    ap.add_argument("--validation_file", required=True)
    ap.add_argument("--task", choices=tuple(METRIC), required=True)
    ap.add_argument("--text_column", default="text")
    ap.add_argument("--text_pair_column", help="the second text of a pair task")
    ap.add_argument("--label_column", default="label")
    ap.add_argument("--model", default="default", help="'default' (the bundled model) or a local directory")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--learning_rate", type=float, default=2e-5)
    ap.add_argument("--max_length", type=int, default=128)
    ap.add_argument("--device", default="auto", help="ours: --device; the Trainer takes the GPU where there is one")
    ap.add_argument("--systems", default="ours,trainer")
    ap.add_argument("--name", default=None, help="the data set's name in the table (default: the train file's folder)")
    ap.add_argument("--work_dir", default=None, help="where the runs go (default: a temporary directory)")
    ap.add_argument("--output", default=None, help="append the JSON lines to this file")
    args = ap.parse_args(argv)
    systems = args.systems.split(",")
    unknown = [s for s in systems if s not in ("ours", "trainer")]
    if unknown:
        raise SystemExit(f"error: unknown system {unknown[0]!r} (choose from ours, trainer)")

    from encoderfit.modeling.model import resolve_model_path
    model = str(resolve_model_path(args.model))  # both systems load the same local files
    name = args.name or Path(args.train_file).resolve().parent.name
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for system in systems:
            row = (run_ours if system == "ours" else run_trainer)(args, model, work)
            row.update({"data": name, "task": args.task, "epochs": args.epochs, "batch_size": args.batch_size,
                        "max_length": args.max_length})
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.output:
        with open(args.output, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    metric = METRIC[args.task]
    by = {r["system"]: r for r in rows}
    print(f"\n{'data':<14} {'system':<8} {'wall s':>8} {'train s':>8} {metric:>9}")
    for r in rows:
        print(f"{r['data']:<14} {r['system']:<8} {r['wall_s']:>8.1f} {r['train_s']:>8.1f} {r[metric]:>9.4f}")
    if "ours" in by:
        b = by["ours"]["breakdown_s"]
        print("ours: " + " | ".join(f"{k} {b[k]:.1f}s" for k in ("start-up", "data", "model", "training",
                                                               "evaluation", "checkpoints", "other")))
    if len(by) == 2:
        print(f"Trainer's wall time / ours: {by['trainer']['wall_s'] / by['ours']['wall_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
