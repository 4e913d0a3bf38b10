"""Samplers and loaders: shuffled, length-grouped training batches sharded per rank; exact evaluation shards."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from encoderfit.data.batches import PadCollator
from encoderfit.data.cache import TokenizedData
from encoderfit.data.columns import column
from encoderfit.engine.distributed import ProcessContext
from encoderfit.modeling.long_texts import DOC

# ---------------------------------------------------------------- samplers and loaders

def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's data order, mixed from both numbers: seed + epoch would give seed 42's
    epoch 2 the order of seed 43's epoch 1, so runs with neighbouring seeds would not be independent."""

    return int(np.random.SeedSequence([seed % 2 ** 64, epoch]).generate_state(1, dtype=np.uint64)[0])


class TrainBatchSampler(Sampler):
    """Shuffled training micro-batches for one rank out of ``world_size``, optionally grouped by length.

    Each epoch (``set_epoch``) draws one seeded permutation, the same on every rank,
    padded by wrapping around to a multiple of the world size (as DistributedSampler
    does), and cuts it into step batches of ``batch_size x world_size x grad_accum_steps``
    (one optimizer step's worth); rank r takes elements r, r+W, ... of each and yields
    them as ``grad_accum_steps`` micro-batches of ``batch_size``. So W processes at batch B
    with k accumulation steps see exactly the examples of one process at batch W x k x B,
    step for step. With ``group_by_length``, examples are sorted by length inside windows
    of 50 step batches before cutting, so a batch holds texts of similar length and
    dynamic padding wastes little; the order of step batches is shuffled again so lengths
    stay mixed over the epoch. Every rank gets the same number of micro-batches, and only
    the last step of an epoch can be partial.
    """

    WINDOW = 50  # step batches per length-sorting window

    def __init__(self, lengths, batch_size: int, rank: int, world_size: int, seed: int, group_by_length: bool,
                 grad_accum_steps: int = 1):
        self.lengths = list(lengths)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.grad_accum_steps = grad_accum_steps
        self.seed, self.group_by_length, self.epoch, self.start = seed, group_by_length, 0, 0
        self.total = math.ceil(len(self.lengths) / world_size) * world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order; ``start`` skips that many micro-batches (a mid-epoch resume).

        Skipping happens on indices, before any example is read: nothing is loaded twice.
        """
        self.epoch, self.start = epoch, start

    def _step_batches(self) -> list:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.lengths), generator=gen).tolist()
        step = self.batch_size * self.world_size * self.grad_accum_steps
        if self.group_by_length:
            window = step * self.WINDOW
            order = [i for w in range(0, len(order), window)
                     for i in sorted(order[w:w + window], key=lambda i: -self.lengths[i])]
        batches = [order[b:b + step] for b in range(0, len(order), step)]
        full, last = (batches[:-1], batches[-1:]) if len(batches[-1]) < step else (batches, [])
        if self.group_by_length:
            shuffled = torch.randperm(len(full), generator=gen).tolist()
            full = [full[k] for k in shuffled]
        if last:
            # Wrap around into the last, partial step only, so every rank gets the same count and all
            # earlier steps are exactly those of one process at the global batch size.
            last[0] = last[0] + order[: self.total - len(order)]
        return full + last

    def __iter__(self):
        batches = (mine[m:m + self.batch_size]
                   for step_batch in self._step_batches()
                   for mine in [step_batch[self.rank::self.world_size]]
                   for m in range(0, len(mine), self.batch_size))
        for index, batch in enumerate(batches):
            if index >= self.start:
                yield batch

    def batch_sizes(self) -> list:
        """This rank's micro-batch sizes, in order (the same every epoch)."""
        per_rank, per_step = self.total // self.world_size, self.batch_size * self.grad_accum_steps
        sizes = []
        for start in range(0, per_rank, per_step):
            chunk = min(per_step, per_rank - start)
            sizes += [min(self.batch_size, chunk - m) for m in range(0, chunk, self.batch_size)]
        return sizes

    def __len__(self) -> int:
        return len(self.batch_sizes())


class ShardSampler(Sampler):
    """Every index exactly once over all ranks, with no padding, ordered by length.

    DistributedSampler pads the last round by repeating examples, which would count
    some validation examples twice; evaluation uses this instead and sums counts.
    Sorting by length (order does not change sums) keeps padding low. With ``docs`` (windows of
    long texts: each row's document), whole documents are dealt to the ranks, so each rank pools
    its documents' windows itself and every document is counted once.
    """

    def __init__(self, lengths, rank: int, world_size: int, docs: Optional[list] = None):
        self.by_document = docs is not None
        groups: dict = {}
        for i, d in enumerate(docs if docs is not None else range(len(lengths))):
            groups.setdefault(d, []).append(i)
        units = sorted(groups.values(), key=lambda g: (-max(lengths[i] for i in g), g[0]))
        mine = [i for g in units[rank::world_size] for i in g]
        self.indices = sorted(mine, key=lambda i: -lengths[i])

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _lengths(ds: datasets.Dataset) -> list:
    return [len(x) for x in column(ds, "input_ids")]


def _docs(ds: datasets.Dataset) -> Optional[list]:
    return column(ds, DOC) if DOC in ds.column_names else None


@dataclass(frozen=True)
class Batching:
    """How examples become batches: what ``make_loaders`` takes, grouped (the config's batch flags)."""
    batch_size: int
    eval_batch_size: int
    seed: int = 0
    num_workers: Optional[int] = None   # default: 0 on CPU, 2 on GPU
    group_by_length: bool = True
    grad_accum_steps: int = 1
    pad_multiple: Optional[int] = None  # lengths padded to a multiple of this (CUDA graphs: few shapes)


def make_loaders(data: TokenizedData, tokenizer, ctx: ProcessContext, batching: Batching, train_collate=None):
    """Train loader (shuffled, sharded per rank; ``set_epoch`` each epoch) and exact eval loader.
    ``train_collate``: the training batches' collator where it is not the padding one (packed batches)."""
    b = batching
    on_gpu = ctx.device.type == "cuda"
    workers = b.num_workers if b.num_workers is not None else (2 if on_gpu else 0)
    # Lengths padded to a multiple of 8 suit tensor cores; a coarser multiple bounds the number of
    # distinct shapes (what CUDA graphs need: one graph per shape).
    collate = PadCollator(tokenizer, b.pad_multiple or (8 if on_gpu else None))
    common = {"collate_fn": collate, "num_workers": workers, "pin_memory": on_gpu,
              "persistent_workers": workers > 0}
    sampler = TrainBatchSampler(_lengths(data.train), b.batch_size, ctx.rank, ctx.world_size, b.seed,
                                b.group_by_length, b.grad_accum_steps)
    # Its own generator: creating an epoch's iterator must not draw from the global RNG (dropout's),
    # or a mid-epoch resume would see different random numbers than the uninterrupted run.
    # Rows as plain lists (not per-row tensors): the collator builds each batch's tensors at once.
    train_rows = data.train.remove_columns(DOC) if DOC in data.train.column_names else data.train  # a window's own label
    train_loader = DataLoader(train_rows.with_format(None), batch_sampler=sampler,
                              generator=torch.Generator().manual_seed(b.seed),
                              **{**common, "collate_fn": train_collate or collate})
    eval_loader = DataLoader(data.validation.with_format(None), batch_size=b.eval_batch_size,
                             sampler=ShardSampler(_lengths(data.validation), ctx.rank, ctx.world_size,
                                                  _docs(data.validation)), **common)
    return train_loader, eval_loader
