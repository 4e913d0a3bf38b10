"""The loader's side of a step, on the CPU: time to build a batch, and the padding left in the batches.

    python bench/loader.py                 # both length profiles, batch 32 and 256
    python bench/loader.py --steps 30      # the data size of a benchmark run with --steps 30

Builds each batch from the same synthetic rows ``bench.py`` trains on, with transformers'
``DataCollatorWithPadding`` (over rows in torch format, as the loader used to read them) and with
this project's ``PadCollator`` (over plain rows without the attention mask, as it reads them now), on one
core; then the share of pad tokens in three epochs of the length-grouped sampler's batches at the pad multiples the
engine uses (8 eager on a GPU, 32 with CUDA graphs). Last, what each batch costs the main process
that receives it from the loader's worker processes (``--num_workers``), against collating in-process:
the training loop's own loaders, two epochs, the second timed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's package

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as B  # noqa: E402
from encoderfit.data.batches import PadCollator  # noqa: E402
from encoderfit.data.loaders import TrainBatchSampler  # noqa: E402


def ms_per_batch(dataset, collate, batch_size: int, batches: int) -> float:
    times = []
    for start in range(0, batch_size * batches, batch_size):
        t0 = time.perf_counter()
        collate(dataset.__getitems__(list(range(start, start + batch_size))))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def pad_fraction(lengths, batch_size: int, multiple: int, epochs: int = 3) -> float:
    sampler = TrainBatchSampler(list(lengths), batch_size, 0, 1, 0, True, 1)
    padded = real = 0
    for epoch in range(1, epochs + 1):
        sampler.set_epoch(epoch)
        for batch in sampler:
            width = -(-max(lengths[i] for i in batch) // multiple) * multiple
            padded += width * len(batch)
            real += sum(lengths[i] for i in batch)
    return 1 - real / padded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="distilbert", choices=sorted(B.MODELS))
    p.add_argument("--batches", type=int, default=8, help="timed batches per case (median reported)")
    p.add_argument("--steps", type=int, default=60, help="batches of data per epoch, as bench.py's --steps")
    args = p.parse_args()
    import torch
    from transformers import DataCollatorWithPadding
    torch.set_num_threads(1)
    config = B.make_config(args.model)
    tokenizer = B.make_tokenizer(config.vocab_size, Path(tempfile.mkdtemp()))
    print(f"{'lengths':<8}{'batch':>6}{'transformers ms':>17}{'ours ms':>9}{'speed-up':>10}"
          f"{'pad % (x8)':>12}{'pad % (x32)':>13}")
    for profile in ("short", "long"):
        for batch_size in (32, 256):
            lengths = B.make_lengths(profile, batch_size * max(args.batches, args.steps), seed=0)
            rows = B.make_dataset(lengths, config.vocab_size, seed=0)
            theirs = ms_per_batch(rows.with_format("torch"), DataCollatorWithPadding(tokenizer, pad_to_multiple_of=32),
                                  batch_size, args.batches)
            ours = ms_per_batch(B.as_ours(rows).with_format(None), PadCollator(tokenizer, 32), batch_size,
                                args.batches)
            print(f"{profile:<8}{batch_size:>6}{theirs:>17.2f}{ours:>9.2f}{theirs / ours:>9.1f}x"
                  f"{100 * pad_fraction(lengths, batch_size, 8):>11.1f}%{100 * pad_fraction(lengths, batch_size, 32):>12.1f}%")
    print(f"\n{'lengths':<8}{'batch':>6}{'main process ms, 2 workers':>28}{'in-process':>12}")
    for profile, batch_size in (("short", 32), ("long", 256)):
        lengths = B.make_lengths(profile, batch_size * args.steps, seed=0)
        rows = B.as_ours(B.make_dataset(lengths, config.vocab_size, seed=0))
        print(f"{profile:<8}{batch_size:>6}{main_process_ms(rows, tokenizer, batch_size, 2):>28.2f}"
              f"{main_process_ms(rows, tokenizer, batch_size, 0):>12.2f}")


def main_process_ms(rows, tokenizer, batch_size: int, workers: int) -> float:
    """Milliseconds a batch in the process that iterates the training loader (collation in ``workers``
    processes, or in-process for 0), over the second of two epochs."""
    import torch
    from encoderfit.data.cache import TokenizedData
    from encoderfit.data.loaders import Batching, make_loaders
    from encoderfit.engine.distributed import ProcessContext
    data = TokenizedData(rows.with_format("torch"), rows.select(range(8)).with_format("torch"), ["0", "1"], {})
    loader, _ = make_loaders(data, tokenizer, ProcessContext(0, 0, 1, torch.device("cpu")),
                             Batching(batch_size, batch_size, num_workers=workers, pad_multiple=32))
    for epoch in range(2):
        loader.batch_sampler.set_epoch(epoch)
        start, count = time.perf_counter(), sum(1 for _ in loader)
    return 1e3 * (time.perf_counter() - start) / count


if __name__ == "__main__":
    main()
