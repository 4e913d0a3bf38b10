"""Texts -> token ids -> padded batches -> logits: the one path that training and the tools share.

- ``encode``: tokenization (training's cache and the tools call it alike);
- ``Batch``: what collation builds: the model inputs, the labels, the example and token
  counts, and for windows of long texts each row's document; it moves to a device as one object and names the key a CUDA graph is recorded under;
- ``PadCollator``: rows of token ids -> a ``Batch`` padded to its longest row;
- ``forward_logits``: the batched forward pass of evaluation, ``evaluate.py`` and ``predict.py``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from encoderfit.utils import UserError


def encode(tokenizer, texts: list, max_length: int, pairs: Optional[list] = None) -> dict:
    """Token ids (and the tokenizer's other inputs) of ``texts``, or of the pairs (``texts[i]``,
    ``pairs[i]``) with the tokenizer's separator and segment ids, truncated to ``max_length``
    (a pair loses tokens from its longer text first), unpadded: batches are padded later,
    each to its own longest row. No attention mask: an unpadded row's is all ones, and the padder builds
    the batch's (a fifth less tokenizing time and cache, 67k short texts on 2 CPU cores)."""
    return tokenizer(texts, pairs, truncation=True, max_length=max_length, return_attention_mask=False)


@dataclass
class Batch:
    """One batch: the model's inputs (``model(**batch.model_inputs())``), the labels (None for unlabelled
    texts), and how many examples and real (non-pad) tokens it holds."""
    inputs: dict
    labels: Optional[torch.Tensor]
    num_examples: int
    num_tokens: int
    docs: Optional[torch.Tensor] = None  # --long_texts windows: each row's document (training/long_texts.py)
    max_length: Optional[int] = None     # packed batches (training/packing.py): the longest example there can be

    def model_inputs(self) -> dict:
        """What the model is called with: the inputs, and for a packed batch its attention's length bound and
        how many of its segments are examples (the rest are its tail's)."""
        if self.max_length is None:
            return self.inputs
        return {**self.inputs, "max_length_q": self.max_length, "max_length_k": self.max_length,
                "packed_examples": self.num_examples}

    def _map(self, fn) -> "Batch":
        maybe = lambda t: None if t is None else fn(t)  # noqa: E731
        return replace(self, inputs={k: fn(v) for k, v in self.inputs.items()}, labels=maybe(self.labels),
                       docs=maybe(self.docs))

    def to(self, device: torch.device) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pin-memory thread."""
        return self._map(lambda t: t.pin_memory())

    def tensors(self) -> dict:
        """Every tensor by name (inputs and labels), for copying into a recorded graph's buffers."""
        return {**self.inputs, **({"labels": self.labels} if self.labels is not None else {})}

    def __reduce_ex__(self, protocol):
        """Pickled by value, as numpy arrays, when a DataLoader worker sends the batch to the main process: for
        a batch's few small tensors that costs the receiving process several times less than torch's own
        sharing (a shared-memory file and a socket round trip per tensor): 0.43 against 1.45 ms a batch of 32
        short texts on a 2-core CPU (docs/speed.md). Tensors that numpy cannot hold (on a GPU, needing
        gradients, bf16) pickle as torch's."""
        tensors = [*self.tensors().values(), *([self.docs] if self.docs is not None else [])]
        if not all(t.device.type == "cpu" and not t.requires_grad and not t.is_conj() and t.dtype in _NUMPY_DTYPES
                   for t in tensors):
            return object.__reduce_ex__(self, protocol)
        arrays = lambda t: None if t is None else t.numpy()  # noqa: E731
        return (_batch_of_arrays, ({k: v.numpy() for k, v in self.inputs.items()}, arrays(self.labels),
                                   self.num_examples, self.num_tokens, arrays(self.docs), self.max_length))

    @property
    def key(self) -> tuple:
        """What a CUDA graph of a step on this batch depends on: each tensor's name, shape and dtype, and
        (packed batches) the attention's length bound, which the graph's kernels are recorded with."""
        return tuple((k, tuple(v.shape), v.dtype) for k, v in self.tensors().items()) + (self.max_length,)


_NUMPY_DTYPES = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                 torch.float32, torch.float64}


def _batch_of_arrays(inputs: dict, labels, num_examples: int, num_tokens: int, docs, max_length) -> Batch:
    """A pickled ``Batch`` back, its arrays wrapped as tensors without a copy."""
    tensor = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    return Batch({k: torch.from_numpy(v) for k, v in inputs.items()}, tensor(labels), num_examples, num_tokens,
                 tensor(docs), max_length)


class PadCollator:
    """Pads a batch of tokenized rows (plain lists) to its longest row, rounded up to ``multiple``.

    The same tensors as transformers' ``DataCollatorWithPadding`` (pad id, padding side, pad token
    type id, zero attention mask on the padding, a mask only for models that take one), built with
    numpy: ~9x faster (1.6 ms instead of 15 ms for 256 short texts on one CPU core, bench/loader.py),
    so the loader keeps up with the GPU.
    """

    def __init__(self, tokenizer, multiple: Optional[int] = None):
        if tokenizer.pad_token_id is None:
            raise UserError("the tokenizer has no padding token; batches of different lengths need one")
        self.pad_id, self.left = tokenizer.pad_token_id, tokenizer.padding_side == "left"
        self.type_pad_id = tokenizer.pad_token_type_id
        self.with_mask = "attention_mask" in tokenizer.model_input_names
        self.multiple = multiple or 1

    def __call__(self, rows: list) -> Batch:
        lengths = [len(r["input_ids"]) for r in rows]
        width = -(-max(lengths) // self.multiple) * self.multiple
        out = {"input_ids": np.full((len(rows), width), self.pad_id, dtype=np.int64)}
        if self.with_mask:
            out["attention_mask"] = np.zeros((len(rows), width), dtype=np.int64)
        if "token_type_ids" in rows[0]:
            out["token_type_ids"] = np.full((len(rows), width), self.type_pad_id, dtype=np.int64)
        for i, (row, n) in enumerate(zip(rows, lengths)):
            cols = slice(width - n, width) if self.left else slice(0, n)
            out["input_ids"][i, cols] = row["input_ids"]
            if self.with_mask:
                out["attention_mask"][i, cols] = row["attention_mask"] if "attention_mask" in row else 1
            if "token_type_ids" in out:
                out["token_type_ids"][i, cols] = row["token_type_ids"]
        labels, docs = row_targets(rows)
        return Batch({k: torch.from_numpy(v) for k, v in out.items()}, labels, len(rows), sum(lengths), docs)


def row_targets(rows: list) -> tuple:
    """A batch's labels (class ids as int64, regression targets as float32: what the losses take) and its
    rows' documents (--long_texts windows), each None where the rows have none."""
    labels = torch.tensor([r["labels"] for r in rows]) if "labels" in rows[0] else None
    if labels is not None and labels.is_floating_point():
        labels = labels.float()
    docs = torch.tensor([r["doc"] for r in rows]) if "doc" in rows[0] else None
    return labels, docs


def autocast(device: torch.device, dtype: Optional[torch.dtype], *, cache: bool = True):
    """bf16 or fp16 autocast on ``device``, or nothing for fp32 (``dtype`` None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


@torch.no_grad()
def forward_logits(model: torch.nn.Module, batches: Iterable[Batch], *, device: torch.device,
                   amp_dtype: Optional[torch.dtype]) -> Iterator[tuple]:
    """(batch on the device, its logits) for each batch, the model in eval mode without gradients."""
    model.eval()
    for batch in batches:
        batch = batch.to(device)
        with autocast(device, amp_dtype):
            logits = model(**batch.inputs).logits
        yield batch, logits
