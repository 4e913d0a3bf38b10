"""Training throughput of this project's step path against Hugging Face Trainer, side by side.

    python bench/bench.py                                  # full matrix on one GPU
    python bench/bench.py --models bert-base --lengths long --batch_sizes 32
    python bench/bench.py --tiny                           # seconds on a CPU: a smoke test, not a measurement

For each workload (model config x length profile x batch size) it builds one random-init
model from a config and one synthetic dataset of token lengths, then trains, in one process,
back to back: this project's engine (``ours``, and any lever variants asked for), Trainer with
its defaults (bf16, fused AdamW, dynamic padding) and Trainer with its own speed flags
(``group_by_length`` sampling, ``torch_compile``). Every system first runs a warm-up window long
enough to see every batch shape (and compile); then ``--repeats`` timed windows of the same
number of examples. It prints JSON lines and a table: samples/s, real (non-pad) tokens/s,
achieved TFLOP/s, MFU against a bf16 matmul rate measured in the same run, and the ratio to the
faster Trainer configuration.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's package

import numpy as np
import torch


from encoderfit.engine import loop as engine  # noqa: E402
from encoderfit.modeling import packing  # noqa: E402
from encoderfit.run.trainer import CUDAGRAPH_PAD_MULTIPLE  # noqa: E402
from encoderfit.data.cache import TokenizedData  # noqa: E402
from encoderfit.data.loaders import Batching, make_loaders  # noqa: E402
from encoderfit.engine.distributed import ProcessContext  # noqa: E402
from encoderfit.engine.build import Optimization, Speed, build_steps  # noqa: E402
from encoderfit.run.runlog import RunLogger  # noqa: E402
from encoderfit.tasks.single_label import SingleLabelClassification  # noqa: E402

MODELS = {
    # name: (config class name, kwargs) -- random init from config; weights never leave the process
    "distilbert": ("DistilBertConfig", {}),
    "bert-base": ("BertConfig", {}),
    "minilm": ("BertConfig", {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
                              "intermediate_size": 1536}),
    "tiny": ("BertConfig", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                            "intermediate_size": 64, "vocab_size": 1000, "max_position_embeddings": 128}),
}
# token-length profiles: lognormal around a median, clipped to [min, max] (IMDB-like reviews pile up at 512)
LENGTHS = {"short": (20, 0.55, 4, 128), "long": (260, 0.6, 32, 512), "tiny": (12, 0.5, 3, 32)}
TRAINERS = ("trainer", "trainer-fast")
# levers a system name can turn on (+) or off (-): ours+graphs, ours-group, ...
# compile: the regional compile (each encoder layer, as --compile on); wholecompile: the whole model as one graph;
# fp16: fp16 autocast with loss scaling instead of bf16
LEVERS = ("graphs", "compile", "wholecompile", "group", "bf16", "fp16", "ddp", "unpadded")


def make_config(name: str):
    import transformers
    cls_name, kwargs = MODELS[name]
    return getattr(transformers, cls_name)(num_labels=2, **kwargs)


def make_lengths(profile: str, n: int, seed: int) -> np.ndarray:
    median, sigma, lo, hi = LENGTHS[profile]
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(int)


def make_dataset(lengths: np.ndarray, vocab: int, seed: int):
    import datasets
    rng = np.random.default_rng(seed + 1)
    ids = [[101] + rng.integers(1000 if vocab > 2000 else 5, vocab, n - 2).tolist() + [102] for n in lengths]
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids],
                                       "labels": rng.integers(0, 2, len(ids)).tolist()})


def as_ours(dataset):
    """The rows as this project's data pipeline tokenizes them: without the attention mask (an unpadded row's is
    all ones; the padder builds the batch's). ``make_dataset`` gives them as a tokenizer does, for Trainer."""
    return dataset.remove_columns(["attention_mask"])


def make_tokenizer(vocab: int, tmp: Path):
    """A WordPiece tokenizer with the right special tokens, only used for padding."""
    from transformers import BertTokenizerFast
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = specials + [f"w{i}" for i in range(vocab - len(specials))]
    (tmp / "vocab.txt").write_text("\n".join(words) + "\n")
    return BertTokenizerFast(vocab_file=str(tmp / "vocab.txt"))


def model_flops(config, lengths: np.ndarray, n_params_nonembed: int) -> float:
    """Training FLOPs for these examples: 6 N per real token plus attention (12 L d T per token)."""
    layers = getattr(config, "num_hidden_layers", None) or config.n_layers
    d = getattr(config, "hidden_size", None) or config.dim
    tokens = lengths.astype(np.float64)
    return float(6 * n_params_nonembed * tokens.sum() + 12 * layers * d * (tokens ** 2).sum())


def non_embedding_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)


def measure_matmul_tflops(device: torch.device) -> float:
    """Dense bf16 matmul rate on this card (median of timed repeats), the MFU denominator."""
    if device.type != "cuda":
        return float("nan")
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_process_group(device) -> ProcessContext:
    """World size 1 through the DDP path (``+ddp``): a process group of this process alone, started once
    (NCCL on CUDA, gloo on the CPU), as torchrun --nproc_per_node=1 would give it."""
    import torch.distributed as dist
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    if not dist.is_initialized():
        fd, path = tempfile.mkstemp(prefix="bench-store-")
        os.close(fd)
        store = dist.FileStore(path, 1)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1,
                                **({"device_id": device} if device.type == "cuda" else {}))
        import atexit
        atexit.register(dist.destroy_process_group)
    return ProcessContext(0, 0, 1, device, torchrun=True)


def run_ours(config, dataset, tokenizer, device, batch_size, repeats, variant: dict, ctx=None,
             report=None) -> list:
    """This project's engine: the same functions ``fit`` calls, one epoch per window. ``ctx``: the process
    context under torchrun (bench/scaling.py); else one process, or (``+ddp``) a one-process group.
    ``report``, a dict: filled with what the graphs did (recorded, released, given up)."""
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(0)
    # a copy: +unpadded switches its model's config to the packed attention, which later systems must not inherit
    model = AutoModelForSequenceClassification.from_config(copy.deepcopy(config))
    ctx = ctx or (one_process_group(device) if variant.get("ddp") else ProcessContext(0, 0, 1, device))
    device = ctx.device
    dataset = as_ours(dataset)
    data = TokenizedData(dataset.with_format("torch"), dataset.select(range(8)).with_format("torch"), ["0", "1"], {})
    packed = None
    if variant.get("unpadded"):  # packed batches, variable-length flash attention (training/packing.py)
        packing.prepare(model)
        longest = max(len(ids) for ids in dataset.with_format(None)["input_ids"])
        packed = packing.PackCollator(tokenizer, max_length=longest, position_offset=packing.position_offset(model))
    batching = Batching(batch_size, batch_size, num_workers=variant.get("num_workers"),
                        group_by_length=variant.get("group", True),
                        pad_multiple=CUDAGRAPH_PAD_MULTIPLE if variant.get("graphs") else None)
    loader, _ = make_loaders(data, tokenizer, ctx, batching, train_collate=packed)
    amp = (torch.float16 if variant.get("fp16") else torch.bfloat16) if device.type == "cuda" and variant.get(
        "bf16", True) else None
    compile_mode = "regional" if variant.get("compile") else "whole" if variant.get("wholecompile") else "off"
    task = SingleLabelClassification(["0", "1"])
    # the trainer's own builder: under DDP, recorded steps average the gradients themselves (no wrapper)
    steps = build_steps(model, task, ctx, Optimization(2e-5, 0.01, 0.06, 1.0, len(loader) * (repeats + 2)),
                        Speed(compile_mode, bool(variant.get("graphs")), amp))
    runner = steps.runner
    graphs = runner if variant.get("graphs") else None
    loop, quiet = engine.LoopConfig(epochs=repeats + 1, log_every=10 ** 9), RunLogger(None, ctx, show_progress=False)
    times = []
    for epoch in range(repeats + 1):  # epoch 0 is the warm-up: every shape seen, compiled, recorded
        loader.batch_sampler.set_epoch(epoch)
        state = engine.LoopState(epoch=epoch)
        state.start_sums(task, device)
        _sync(device)
        t0 = time.perf_counter()
        # with graphs the warm-up is two passes: a shape's first batch runs eagerly, its second records it
        for _ in range(2 if graphs is not None and epoch == 0 else 1):
            state.next_batch = 0
            engine.train_epoch(runner, loader, loop, state, engine.Hooks(), quiet)
        task.running(state.epoch_sums)  # reads the sums: waits for the device
        times.append(time.perf_counter() - t0)
    if graphs is not None:
        done = {"recorded": graphs.recorded, "released": graphs.releases, "given_up": graphs.given_up}
        print(json.dumps({"event": "graphs", **done}), flush=True)
        if report is not None:
            report.update(done)
    del model, steps, graphs, runner
    return times  # the first is the warm-up window


def run_trainer(config, dataset, tokenizer, device, batch_size, repeats, fast: bool) -> list:
    """Hugging Face Trainer on the same model config and data; windows of one epoch's steps."""
    from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)
    steps = math.ceil(len(dataset) / batch_size)
    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step % steps == 0:
                _sync(device)
                marks.append(time.perf_counter())

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch_size, max_steps=steps * (repeats + 1),
            learning_rate=2e-5, weight_decay=0.01, warmup_steps=0.06, bf16=device.type == "cuda",
            optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch", save_strategy="no",
            report_to=[], disable_tqdm=True, use_cpu=device.type == "cpu", seed=0,
            **({"train_sampling_strategy": "group_by_length", "torch_compile": True} if fast else {}))
        trainer = Trainer(model=model, args=args, train_dataset=dataset,
                          data_collator=DataCollatorWithPadding(tokenizer), callbacks=[Clock()])
        _sync(device)
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
    del trainer, model
    return [b - a for a, b in zip([start] + marks, marks)]  # the first is the warm-up window


def parse_variants(specs: list) -> dict:
    """'ours' plus lever variants, e.g. 'ours+compile', 'ours+graphs', 'ours-group', 'ours-bf16', 'ours+workers4'."""
    out = {}
    for spec in specs:
        variant = {}
        for token in spec.replace("-", " -").replace("+", " +").split()[1:]:
            key, value = token[1:], token[0] == "+"
            if key.startswith("workers") and key[len("workers"):].isdigit() and value:
                variant["num_workers"] = int(key[len("workers"):])
            elif key in LEVERS:
                variant[key] = value
            else:
                raise ValueError(f"unknown lever {token!r} in {spec!r}: use +/- with one of "
                                 f"{', '.join(LEVERS)}, or +workersN")
        out[spec] = variant
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="distilbert,bert-base,minilm")
    p.add_argument("--lengths", default="short,long")
    p.add_argument("--batch_sizes", default="32,256")
    p.add_argument("--systems", default=None,
                   help="comma list of: ours (and variants such as ours+compile, ours-group, ours-bf16, "
                        "ours+workers0, ours+ddp+graphs: world size 1 through the DDP path, ours+graphs+unpadded: packed "
                        "batches), trainer, "
                        "trainer-fast (default: ours,ours+graphs,trainer,trainer-fast on CUDA; ours,trainer "
                        "with --tiny)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per timed window (= one epoch of data)")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per system, after one warm-up window")
    p.add_argument("--tiny", action="store_true", help="tiny model and data on the CPU: a smoke test")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default=None, help="append JSON lines here")
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.lengths, args.batch_sizes, args.device = "tiny", "tiny", "8", "cpu"
        args.steps, args.repeats = min(args.steps, 3), min(args.repeats, 2)
    device = torch.device(args.device)
    systems = (args.systems or ("ours,trainer" if args.tiny else "ours,ours+graphs,trainer,trainer-fast")).split(",")
    try:
        ours_variants = parse_variants([s for s in systems if s.startswith("ours")])
    except ValueError as exc:
        p.error(str(exc))
    unknown = [s for s in systems if not s.startswith("ours") and s not in TRAINERS]
    if unknown:
        p.error(f"unknown system {unknown[0]!r}: choose ours[+LEVER|-LEVER...], trainer or trainer-fast")
    if device.type != "cuda" and any(v.get("unpadded") for v in ours_variants.values()):
        p.error("the +unpadded variants need a CUDA device (flash attention)")
    if device.type != "cuda" and any(v.get("graphs") for v in ours_variants.values()):
        p.error("the +graphs variants need a CUDA device (CUDA graphs)")
    peak = measure_matmul_tflops(device)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "transformers": __import__("transformers").__version__,
           "date": time.strftime("%Y-%m-%d"), "bf16_matmul_tflops": round(peak, 1)}
    print(json.dumps({"event": "env", **env}), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models.split(","):
            config = make_config(model_name)
            tokenizer = make_tokenizer(config.vocab_size, Path(tmp))
            for profile in args.lengths.split(","):
                for batch_size in map(int, args.batch_sizes.split(",")):
                    n = batch_size * args.steps
                    lengths = make_lengths(profile, n, seed=0)
                    dataset = make_dataset(lengths, config.vocab_size, seed=0)
                    from transformers import AutoModelForSequenceClassification
                    n_params = non_embedding_params(AutoModelForSequenceClassification.from_config(config))
                    flops = model_flops(config, lengths, n_params)
                    results = {}
                    for system in systems:
                        gc.collect()
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        torch._dynamo.reset()
                        try:
                            if system.startswith("ours"):
                                times = run_ours(config, dataset, tokenizer, device, batch_size, args.repeats,
                                                 ours_variants[system])
                            else:
                                times = run_trainer(config, dataset, tokenizer, device, batch_size, args.repeats,
                                                    fast=system == "trainer-fast")
                        except torch.OutOfMemoryError:
                            print(json.dumps({"event": "oom", "system": system, "model": model_name}), flush=True)
                            continue
                        warmup, times = times[0], times[1:]
                        med = statistics.median(times)
                        row = {"event": "result", "model": model_name, "lengths": profile, "batch_size": batch_size,
                               "system": system, "examples": n, "real_tokens": int(lengths.sum()),
                               "window_s": [round(t, 4) for t in times], "warmup_s": round(warmup, 4),
                               "samples_per_s": n / med, "tokens_per_s": lengths.sum() / med,
                               "spread_pct": 100 * (max(times) - min(times)) / med,
                               "tflops": flops / med / 1e12, "mfu": flops / med / 1e12 / peak if peak == peak else None,
                               **env}
                        results[system] = row
                        print(json.dumps(row), flush=True)
                    baseline = max((results[s]["samples_per_s"] for s in TRAINERS if s in results),
                                   default=None)
                    for row in results.values():
                        row["vs_trainer"] = row["samples_per_s"] / baseline if baseline else None
                        rows.append(row)
    if args.output:
        with open(args.output, "a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    print_table(rows, env)
    return 0


def print_table(rows: list, env: dict) -> None:
    print(f"\n{env['device']} | torch {env['torch']} | transformers {env['transformers']} | {env['date']} | "
          f"bf16 matmul {env['bf16_matmul_tflops']} TFLOP/s")
    head = f"{'model':<11}{'lengths':<8}{'batch':>6}  {'system':<18}{'samples/s':>10}{'tokens/s':>11}" \
           f"{'spread':>8}{'TFLOP/s':>9}{'MFU':>7}{'vs Trainer':>11}{'warm-up':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        ratio = f"{r['vs_trainer']:.2f}x" if r.get("vs_trainer") else "-"
        print(f"{r['model']:<11}{r['lengths']:<8}{r['batch_size']:>6}  {r['system']:<18}{r['samples_per_s']:>10.0f}"
              f"{r['tokens_per_s']:>11.0f}{r['spread_pct']:>7.1f}%{r['tflops']:>9.1f}{mfu:>7}{ratio:>11}"
              f"{r['warmup_s']:>8.1f}s")


if __name__ == "__main__":
    sys.exit(main())
