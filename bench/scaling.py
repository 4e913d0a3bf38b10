"""Weak scaling under torchrun: the same work per GPU at 1, 2, 4, 8 processes, samples/s and efficiency.

    python bench/scaling.py                                          # 1, 2, 4, 8 GPUs, as many as there are
    python bench/scaling.py --models bert-base --lengths long --world_sizes 1,8
    python bench/scaling.py --tiny --device cpu --world_sizes 1,2    # 2 gloo processes: a smoke test

Each world size is one torchrun launch (--standalone) of this script as a worker. Every rank trains the
same number of batches of --batch_size per window on its own share of a synthetic data set (bench.py's
model configs and length profiles), through the engine's own DDP path: on CUDA, recorded steps with the
gradient all-reduce in the graph (eager steps in DDP's wrapper with --eager); on the CPU, gloo. After a
warm-up window, --repeats timed windows; rank 0 reports the median. Efficiency is the samples/s at N
processes over N times the samples/s at one.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's package

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402


def worker(args) -> int:
    from encoderfit.engine.distributed import process_context

    with process_context(args.device, True) as ctx, tempfile.TemporaryDirectory() as tmp:
        config = bench.make_config(args.models)
        tokenizer = bench.make_tokenizer(config.vocab_size, Path(tmp))
        n = args.batch_size * args.steps * ctx.world_size  # the same share per rank at every world size
        lengths = bench.make_lengths(args.lengths, n, seed=0)
        dataset = bench.make_dataset(lengths, config.vocab_size, seed=0)
        graphs = ctx.device.type == "cuda" and not args.eager
        report = {}
        times = bench.run_ours(config, dataset, tokenizer, ctx.device, args.batch_size, args.repeats,
                               {"graphs": graphs}, ctx=ctx, report=report)
        # what ran: graphs given up on any rank are reported as such, not as graphed throughput
        given_up = [x for x in ctx.all_gather_object(report.get("given_up")) if x]
        steps = "eager" if not graphs else f"graphs given up ({given_up[0]})" if given_up else "graphed"
        if ctx.is_main:
            median = statistics.median(times[1:])
            print(json.dumps({"event": "scaling", "world_size": ctx.world_size, "examples": n,
                              "window_s": [round(t, 4) for t in times[1:]], "samples_per_s": n / median,
                              "steps": steps, "graphs": report or None, "backend": ctx.backend}), flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="distilbert", help="one of bench.py's model configs")
    p.add_argument("--lengths", default="short", help="one of bench.py's length profiles")
    p.add_argument("--batch_size", type=int, default=32, help="per process")
    p.add_argument("--world_sizes", default=None, help="comma list (default: 1, 2, 4, 8 up to the GPU count)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per timed window, on every rank")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eager", action="store_true", help="eager steps in DDP's wrapper instead of recorded ones")
    p.add_argument("--tiny", action="store_true", help="tiny model and data: a smoke test on the CPU")
    p.add_argument("--output", default=None, help="append JSON lines here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one torchrun launch's process
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.lengths, args.batch_size = "tiny", "tiny", 8
        args.steps, args.repeats = min(args.steps, 4), min(args.repeats, 2)
    if args.worker:
        return worker(args)
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else None
    sizes = [int(x) for x in args.world_sizes.split(",")] if args.world_sizes else \
        [n for n in (1, 2, 4, 8) if n <= (gpus or 2)]
    if gpus is not None and max(sizes) > gpus:
        p.error(f"--world_sizes {args.world_sizes}: this machine has {gpus} CUDA GPU(s), one process per GPU")
    env = {"device": torch.cuda.get_device_name(0) if gpus else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "model": args.models, "lengths": args.lengths,
           "batch_size": args.batch_size}
    forwarded = [x for k in ("models", "lengths", "batch_size", "steps", "repeats", "device")
                 for x in (f"--{k}", str(getattr(args, k)))] + (["--eager"] if args.eager else [])
    rows = []
    for n in sizes:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               str(Path(__file__).resolve()), "--worker", *forwarded]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        found = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"event": "scaling"')]
        if proc.returncode != 0 or not found:
            print(f"error: world size {n} failed (exit code {proc.returncode}):\n{proc.stderr[-3000:]}",
                  file=sys.stderr)
            return 1
        rows.append({**found[0], **env})
    one = rows[0]["samples_per_s"] / rows[0]["world_size"]  # per process at the smallest world size
    print(f"\n{env['device']} | torch {env['torch']} | {env['date']} | {args.models}, {args.lengths} texts, "
          f"batch {args.batch_size} per process, {rows[0]['steps']} steps")
    print(f"{'processes':>9}{'samples/s':>12}{'per process':>13}{'efficiency':>12}")
    for r in rows:
        r["efficiency"] = r["samples_per_s"] / (r["world_size"] * one)
        print(f"{r['world_size']:>9}{r['samples_per_s']:>12.0f}{r['samples_per_s'] / r['world_size']:>13.0f}"
              f"{100 * r['efficiency']:>11.1f}%")
    if args.output:
        with open(args.output, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
