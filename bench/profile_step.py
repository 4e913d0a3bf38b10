"""Where a training step's time goes on one GPU: the data pipeline, the model step, and their sum.

    python bench/profile_step.py --model distilbert --lengths short --batch_size 32

Times (median ms per step over windows after warm-up): the loader alone (batches moved to
the GPU), the step alone on batches already on the GPU, and the engine's full epoch loop;
then a PyTorch profiler table of the step's busiest CPU-side operations and CUDA kernels, and the GPU time
a step by kind of kernel (GEMMs, attention, the optimizer, copies, the rest) with the rate the GEMMs and the
attention reach on their own FLOPs: what bounds the MFU if every other kernel took no time. With ``--callers N``
(eager steps), the N busiest (kind, launching operation and its parents) pairs: what launches the copies.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's package

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as B  # noqa: E402
from encoderfit.engine import loop as engine  # noqa: E402
from encoderfit.modeling import packing  # noqa: E402
from encoderfit.data.cache import TokenizedData  # noqa: E402
from encoderfit.data.loaders import Batching, make_loaders  # noqa: E402
from encoderfit.engine.distributed import ProcessContext  # noqa: E402
from encoderfit.engine.build import Optimization, Speed, build_steps  # noqa: E402
from encoderfit.run.runlog import RunLogger  # noqa: E402
from encoderfit.tasks.single_label import SingleLabelClassification  # noqa: E402


# kernel names -> kinds, first match wins: attention first (flash, cuDNN and memory-efficient kernels, whose
# names may hold CUTLASS types), then cuBLAS/CUTLASS GEMMs; "optimizer" holds the gradient clipping's foreach kernels
# too. By kernel name: for eager and graphed steps, not compiled ones (Triton kernels are named after what they fuse)
KERNEL_KINDS = (("attention", r"flash|fmha|attention|cudnn|sdpa"), ("GEMM", r"gemm|cutlass|xmma|nvjet|cublas"),
                ("optimizer", r"adam|multi_tensor"), ("copies", r"copy|memcpy"), ("the rest", r""))


def kernel_kinds(prof, steps: int) -> dict:
    """GPU milliseconds a step by kind of kernel (KERNEL_KINDS), from a profile of ``steps`` steps."""
    out = {kind: 0.0 for kind, _ in KERNEL_KINDS}
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA or event.self_device_time_total <= 0:
            continue
        kind = next(k for k, pattern in KERNEL_KINDS if re.search(pattern, event.key, re.IGNORECASE))
        out[kind] += event.self_device_time_total / 1e3 / steps  # microseconds in all -> ms a step
    return out


def callers(prof, steps: int, depth: int = 4) -> list:
    """((kind, the launching operation and up to ``depth - 1`` of its parents), (GPU ms a step, kernel names)),
    busiest first: which operations (forward, or an autograd node's backward) launch a kind's kernels."""
    out = {}
    for event in prof.events():
        for kernel in event.kernels:
            kind = next(k for k, pattern in KERNEL_KINDS if re.search(pattern, kernel.name, re.IGNORECASE))
            chain, parent = [], event
            while parent is not None and len(chain) < depth:
                chain.append(parent.name.replace("autograd::engine::evaluate_function: ", "bwd:")[:48])
                parent = parent.cpu_parent
            ms, names = out.setdefault((kind, " > ".join(reversed(chain))), [0.0, set()])
            out[(kind, " > ".join(reversed(chain)))] = [ms + kernel.duration / 1e3 / steps, names | {kernel.name[:60]}]
    return sorted(out.items(), key=lambda item: -item[1][0])


def kinds_line(kinds: dict, gemm_flops: float, attention_flops: float, peak: float) -> str:
    """The kinds' ms a step, and the rates of the GEMMs and the attention on their own FLOPs (a step's)."""
    rate = lambda flops, ms: flops / (ms / 1e3) / 1e12 if ms > 0 else float("nan")  # noqa: E731
    bound = 100 * rate(gemm_flops + attention_flops, kinds["GEMM"] + kinds["attention"]) / peak
    return (" | ".join(f"{k} {ms:.2f}" for k, ms in kinds.items()) + f" | GPU {sum(kinds.values()):.2f} ms a step; "
            f"GEMMs {rate(gemm_flops, kinds['GEMM']):.0f} TFLOP/s, attention {rate(attention_flops, kinds['attention']):.0f}"
            f" TFLOP/s; MFU if nothing else took time: {bound:.1f}%")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="distilbert")
    p.add_argument("--lengths", default="short")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--compile", default="off", choices=("on", "whole", "off"),
                   help="torch.compile each encoder layer (on: as --compile on trains), the whole model, or nothing")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--graphs", default="off", choices=("on", "off"), help="CUDA graphs of whole steps")
    p.add_argument("--pad_multiple", type=int, default=None, help="training pads to 32 with graphs on")
    p.add_argument("--sdpa", default="default", choices=("default", "cudnn", "efficient", "math"),
                   help="pin PyTorch's attention kernel (padding masks rule out flash attention)")
    p.add_argument("--unpadded", default="off", choices=("on", "off"),
                   help="packed batches and variable-length flash attention (training/packing.py)")
    p.add_argument("--kernels", type=int, default=10, help="rows of the CUDA kernel table")
    p.add_argument("--num_workers", type=int, default=None)
    p.add_argument("--callers", type=int, default=0, help="rows of a table of the GPU time by kind of kernel and "
                                                           "the operations that launched it (use with --graphs off)")
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
    ds = B.as_ours(B.make_dataset(lengths, cfg.vocab_size, 0))
    ctx = ProcessContext(0, 0, 1, device)
    data = TokenizedData(ds.with_format("torch"), ds.select(range(8)).with_format("torch"), ["0", "1"], {})
    model = AutoModelForSequenceClassification.from_config(cfg)
    packed = None
    if args.unpadded == "on":
        packing.prepare(model)
        packed = packing.PackCollator(tok, max_length=int(lengths.max()), position_offset=packing.position_offset(model))
    batching = Batching(args.batch_size, args.batch_size, num_workers=args.num_workers, pad_multiple=args.pad_multiple)
    loader, _ = make_loaders(data, tok, ctx, batching, train_collate=packed)
    peak = B.measure_matmul_tflops(device)
    flops = B.model_flops(cfg, lengths, B.non_embedding_params(model))
    gemm_flops = 6 * B.non_embedding_params(model) * float(lengths.sum())  # the rest of `flops` is attention's
    task = SingleLabelClassification(["0", "1"])
    # the trainer's own builder
    runner = build_steps(model, task, ctx, Optimization(2e-5, 0.01, 0.0, 1.0, 10 ** 6),
                         Speed({"on": "regional", "whole": "whole", "off": "off"}[args.compile], args.graphs == "on",
                               torch.float16 if args.precision == "fp16" else torch.bfloat16)).runner
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
    per_step = args.steps  # one profiled window: every batch once
    print("GPU time by kind, ms a step: " + kinds_line(kernel_kinds(prof, per_step), gemm_flops / per_step,
                                                         (flops - gemm_flops) / per_step, peak), flush=True)
    if args.callers:  # which operations launch the copies (eager steps only: a graph's kernels have no operation)
        print("GPU ms a step, kind of kernel, the operations that launched it (outermost first), its kernels:")
        for (kind, chain), (ms, names) in callers(prof, per_step)[:args.callers]:
            print(f"{ms:8.3f}  {kind:9s}  {chain}  [{'; '.join(sorted(names))[:160]}]")


if __name__ == "__main__":
    main()
