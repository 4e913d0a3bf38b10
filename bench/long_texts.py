"""What each --long_texts mode buys on one data set, and what it costs: the same run through the training
CLI once per mode (and per seed), each a whole job in its own process.

    python bench/public_data.py --sets convention_speeches,consumer_contracts --out data/public
    python bench/long_texts.py --train_file data/public/convention_speeches/train.csv \\
        --validation_file data/public/convention_speeches/validation.csv --seeds 1,2,3 -- --epochs 5

Flags after ``--`` go to every run (``--max_length``, ``--epochs``, ``--text_pair_column``, ...). Per mode
it prints the validation accuracy of the last epoch (mean and range over the seeds), the training
windows (examples) per epoch, the training time of all epochs, and the job's wall time from launch to
exit; ``--output`` adds one JSON line per run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("truncate", "head_tail", "windows")


def one_run(mode: str, seed: int, args, extra: list, base: Path) -> dict:
    name = f"{mode}-seed{seed}"
    cmd = [sys.executable, str(ROOT / "training" / "train_single.py"), "--train_file", args.train_file,
           "--validation_file", args.validation_file, "--long_texts", mode, "--seed", str(seed),
           "--checkpoint_dir", str(base), "--run_name", name, "--no_progress", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: the {mode} run failed:\n{proc.stderr[-2000:]}")
    run = base / name
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["event"] == "epoch"]
    last = epochs[-1]
    metric = next(k for k in ("val_accuracy", "val_micro_f1", "val_pearson") if k in last)
    return {"mode": mode, "seed": seed, "metric": metric[4:], "value": last[metric],
            "best": max(r[metric] for r in epochs), "train_windows": last["train_examples"],
            "val_documents": last["val_examples"], "val_windows": last.get("val_windows", last["val_examples"]),
            "train_s": round(sum(r["epoch_time_s"] for r in epochs), 2), "eval_s": round(sum(r["eval_time_s"] for r in epochs), 2),
            "wall_s": round(wall, 2), "extra": extra}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_file", required=True)
    parser.add_argument("--validation_file", required=True)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--seeds", default="42", help="comma-separated seeds, one run per mode and seed")
    parser.add_argument("--output", help="append one JSON line per run to this file")
    args = parser.parse_args(own)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            for seed in seeds:
                r = one_run(mode, seed, args, extra, Path(tmp))
                rows.append(r)
                if args.output:
                    with open(args.output, "a") as fh:
                        fh.write(json.dumps({"data": args.train_file, **r}) + "\n")
    print(f"{Path(args.train_file).parent.name}: {rows[0]['val_documents']} validation texts, seeds {args.seeds}, "
          f"flags {' '.join(extra) or '(none)'}")
    print(f"{'mode':<10} {rows[0]['metric'] + ' (last epoch)':>26} {'train windows':>14} {'val windows':>12} "
          f"{'training s':>11} {'job s':>7}")
    for mode in args.modes.split(","):
        mine = [r for r in rows if r["mode"] == mode]
        values = [r["value"] for r in mine]
        spread = f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"
        print(f"{mode:<10} {spread:>26} {mine[0]['train_windows']:>14} {mine[0]['val_windows']:>12} "
              f"{statistics.mean(r['train_s'] for r in mine):>11.1f} {statistics.mean(r['wall_s'] for r in mine):>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
