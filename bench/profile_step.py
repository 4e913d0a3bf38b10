"""Where a training step's time goes on one GPU: the data pipeline, the model step, and their sum.

    python bench/profile_step.py --model distilbert --lengths short --batch_size 32

Times (median ms per step over windows after warm-up): the loader alone (batches moved to
the GPU), the step alone on batches already on the GPU, and the engine's full epoch loop;
then a PyTorch profiler table of the step's busiest CPU-side operations.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as B  # noqa: E402
from training import engine, packing  # noqa: E402
from training.data import TokenizedData, make_loaders  # noqa: E402
from training.distributed import ProcessContext  # noqa: E402
from training.graphs import StepGraphs  # noqa: E402
from training.runlog import RunLogger  # noqa: E402
from training.step import EagerSteps, StepContext  # noqa: E402
from training.tasks import SingleLabelClassification  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="distilbert")
    p.add_argument("--lengths", default="short")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--compile", default="off", choices=("on", "off"), help="torch.compile the model (dynamic shapes)")
    p.add_argument("--graphs", default="off", choices=("on", "off"), help="CUDA graphs of whole steps")
    p.add_argument("--pad_multiple", type=int, default=None, help="training pads to 32 with graphs on")
    p.add_argument("--sdpa", default="default", choices=("default", "cudnn", "efficient", "math"),
                   help="pin PyTorch's attention kernel (padding masks rule out flash attention)")
    p.add_argument("--unpadded", default="off", choices=("on", "off"),
                   help="packed batches and variable-length flash attention (training/packing.py)")
    p.add_argument("--kernels", type=int, default=10, help="rows of the CUDA kernel table")
    p.add_argument("--num_workers", type=int, default=None)
    args = p.parse_args()
    if args.sdpa != "default":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "math": SDPBackend.MATH}[args.sdpa]
        pinned = sdpa_kernel([backend])  # for the whole run: keep it referenced, or it exits when collected
        pinned.__enter__()
    from transformers import AutoModelForSequenceClassification

    device = torch.device("cuda")
    cfg = B.make_config(args.model)
    tok = B.make_tokenizer(cfg.vocab_size, Path(tempfile.mkdtemp()))
    lengths = B.make_lengths(args.lengths, args.batch_size * args.steps, 0)
    ds = B.make_dataset(lengths, cfg.vocab_size, 0)
    ctx = ProcessContext(0, 0, 1, device)
    data = TokenizedData(ds.with_format("torch"), ds.select(range(8)).with_format("torch"), ["0", "1"], {})
    model = AutoModelForSequenceClassification.from_config(cfg)
    packed = None
    if args.unpadded == "on":
        packing.prepare(model)
        packed = packing.PackCollator(tok, max_length=int(lengths.max()), position_offset=packing.position_offset(model))
    loader, _ = make_loaders(data, tok, ctx, batch_size=args.batch_size, eval_batch_size=args.batch_size, seed=0,
                             num_workers=args.num_workers, pad_multiple=args.pad_multiple, train_collate=packed)
    train_model = engine.prepare_for_training(model, ctx, compile_model=args.compile == "on")
    peak = B.measure_matmul_tflops(device)
    flops = B.model_flops(cfg, lengths, B.non_embedding_params(model))
    opt = engine.build_optimizer(model, lr=2e-5, weight_decay=0.01, device=device)
    sch = engine.build_scheduler(opt, total_steps=10 ** 6, warmup_ratio=0.0)
    task = SingleLabelClassification(["0", "1"])
    sc = StepContext(train_model, opt, sch, task, torch.bfloat16, 1.0, ctx)
    runner = StepGraphs(sc) if args.graphs == "on" else EagerSteps(sc)
    loop, quiet = engine.LoopConfig(epochs=1, log_every=10 ** 9), RunLogger(None, ctx, show_progress=False)

    def timed(fn, reps=3):
        out = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            out.append((time.perf_counter() - t0) / args.steps * 1e3)
        return statistics.median(out)

    def loader_only():
        for b in loader:
            b.to(device)

    batches = [b.to(device) for b in loader]

    class Fixed:  # the engine's loop over batches already on the GPU
        batch_sampler = loader.batch_sampler

        def __iter__(self):
            return iter(batches)

        def __len__(self):
            return len(batches)

    def epoch_over(batches_source):
        state = engine.LoopState()
        state.start_sums(task, device)
        engine.train_epoch(runner, batches_source, loop, state, engine.Hooks(), quiet)
        task.running(state.epoch_sums)  # waits for the device

    def steps_only():
        epoch_over(Fixed())

    def full():
        epoch_over(loader)

    t0 = time.perf_counter()
    steps_only()  # warm-up: compile, and the first (eager) batch of each shape
    steps_only()  # the second batch of each shape records its graph
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    step_ms = timed(steps_only)
    tflops = flops / args.steps / (step_ms / 1e3) / 1e12
    print(f"{args.model} {args.lengths} b{args.batch_size} compile={args.compile} graphs={args.graphs} sdpa={args.sdpa} pad={args.pad_multiple} "
          f"unpadded={args.unpadded} "
          f"workers={args.num_workers}: warm-up {warm:.1f} s | loader {timed(loader_only):.2f} ms/step | "
          f"steps on GPU batches {step_ms:.2f} ms/step = {args.batch_size / step_ms * 1e3:.0f} samples/s, "
          f"{tflops:.0f} TFLOP/s, MFU {100 * tflops / peak:.1f}% (bf16 matmul {peak:.0f}) | "
          f"engine epoch {timed(full):.2f} ms/step", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        steps_only()
        torch.cuda.synchronize()
    if args.kernels:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.kernels,
                                        max_name_column_width=70))


if __name__ == "__main__":
    main()
