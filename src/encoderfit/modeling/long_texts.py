"""Texts longer than --max_length: cut them, keep their head and tail, or read all of them in windows.

- ``truncate``: the first ``max_length`` tokens (a pair loses tokens from its longer text first);
- ``head_tail``: the first ``head_tokens`` and the last tokens that fit (Sun et al., 2019, "How to
  Fine-Tune BERT for Text Classification?": on long reviews the head and the tail beat the head alone);
- ``windows``: overlapping windows of ``max_length`` tokens, ``stride`` tokens shared by neighbours
  (what the tokenizer's ``return_overflowing_tokens`` gives, cut here: see ``_windows``); each window trains with its document's label,
  and evaluation and prediction pool the windows' logits per document (``pool``: mean or max).

Under ``head_tail`` and ``windows`` a text pair's first text (a question) is kept whole in every row,
and the second (the passage) is windowed or cut to its head and tail: a window of a pair is the whole
first text with one stretch of the second. ``auto`` (the training default) is ``head_tail`` for single
texts and ``truncate`` for pairs (which one of a pair may be cut, only the user knows).

``LongTexts`` is one value that travels together: the data path encodes with it, the engine pools
with it, and the checkpoint records it (``config.json``: ``long_texts``) for predict.py and evaluate.py.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

from encoderfit.utils import UserError

MODES = ("auto", "truncate", "head_tail", "windows")  # auto: head_tail for single texts, truncate for pairs
POOLINGS = ("mean", "max")
DOC = "doc"  # the column of a window's document: its index in the split (or in the tool's input)


@dataclass(frozen=True)
class LongTexts:
    mode: str = "truncate"             # LongTexts(): what a checkpoint from before --long_texts did
    head_tokens: Optional[int] = None  # head_tail: tokens kept from the start (default: a quarter of those kept)
    stride: Optional[int] = None       # windows: tokens two neighbouring windows share (default: a quarter)
    pooling: str = "mean"              # windows: how a document's window logits become its logits

    @classmethod
    def from_config(cls, cfg) -> "LongTexts":
        return cls(cfg.long_texts, cfg.head_tokens, cfg.stride, cfg.window_pooling or "mean")

    @classmethod
    def from_record(cls, record: Optional[dict]) -> "LongTexts":
        """The setting a checkpoint recorded; a checkpoint from before long texts had one truncated."""
        if not isinstance(record, dict):
            return cls()
        return cls(**{k: record[k] for k in ("mode", "head_tokens", "stride", "pooling") if k in record})

    def record(self) -> dict:
        return asdict(self)

    @property
    def windowed(self) -> bool:
        return self.mode == "windows"

    def for_pairs(self, pairs: bool) -> "LongTexts":
        """``auto`` resolved: ``head_tail`` for single texts; for pairs ``truncate``, whose longest-first cut
        keeps some of both texts, where head_tail and windows keep the first text whole (which one of a
        pair must stay whole, a question or a premise, only the user knows)."""
        if self.mode != "auto":
            return self
        return replace(self, mode="truncate" if pairs else "head_tail")

    def describe(self, max_length: int) -> str:
        if self.mode == "head_tail":
            head = f"{self.head_tokens} tokens" if self.head_tokens is not None else "a quarter of the tokens that fit"
            return f"head_tail ({head} from the start, the rest from the end)"
        if self.windowed:
            return f"windows of {max_length} tokens, {self.stride_for(max_length)} shared, {self.pooling} pooling"
        return self.mode

    def stride_for(self, max_length: int) -> int:
        return self.stride if self.stride is not None else max_length // 4

    def check(self, max_length: int) -> None:
        """Flag values that cannot work with ``max_length`` (before any data is read)."""
        if self.mode not in MODES:
            raise UserError(f"--long_texts must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.pooling not in POOLINGS:
            raise UserError(f"--window_pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.head_tokens is not None and not 0 <= self.head_tokens < max_length:
            raise UserError(f"--head_tokens must be from 0 to less than --max_length {max_length}, "
                            f"got {self.head_tokens}")
        if self.stride is not None and not 0 <= self.stride < max_length // 2:
            raise UserError(f"--stride (the tokens neighbouring windows share) must be from 0 to less than half "
                            f"of --max_length {max_length}, got {self.stride}")

    def encode(self, tokenizer, texts: list, max_length: int, pairs: Optional[list] = None) -> dict:
        """Token ids of ``texts`` (or of the pairs), as ``batches.encode`` gives them, each at most ``max_length``
        tokens. Under ``windows`` a text may give several rows, and the ``DOC`` list names each row's text."""
        from encoderfit.data import batches

        setting = self.for_pairs(pairs is not None)
        specials = tokenizer.num_special_tokens_to_add(pair=pairs is not None)
        if max_length <= specials:  # (the tokenizer itself would only warn and return the whole text)
            raise UserError(f"--max_length {max_length} leaves no room for text beside {specials} special tokens")
        if setting.mode == "truncate":
            return batches.encode(tokenizer, texts, max_length, pairs)
        stride = setting.stride_for(max_length) if setting.windowed else 0
        room = max_length - specials  # the text tokens one input holds
        if room <= stride:
            raise UserError(f"--max_length {max_length} leaves no room for text beside {specials} special tokens"
                            + (f" and --stride {stride}" if stride else ""))
        if setting.head_tokens is not None and setting.head_tokens >= room:
            raise UserError(f"--head_tokens {setting.head_tokens} leaves no tail: --max_length {max_length} holds "
                            f"{room} text tokens beside {specials} special tokens")
        enc = tokenizer(texts, pairs, truncation=False, verbose=False, return_attention_mask=False)
        long = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) > max_length]
        if long and not getattr(tokenizer, "is_fast", False):
            raise UserError(f"--long_texts {setting.mode} needs a fast tokenizer (tokenizer.json) to cut texts longer "
                            f"than --max_length; {type(tokenizer).__name__} is not one (--long_texts truncate works)")
        if pairs is not None:  # a cut row holds the whole first text, and a window the stride's shared tokens too
            firsts = [sum(1 for s in enc.sequence_ids(i) if s == 0) for i in long]
            if firsts and max(firsts) + specials + stride >= max_length:
                shared = f" and --stride {stride}" if stride else ""
                raise UserError(f"--long_texts {setting.mode} keeps the first text of a pair whole: a first text of "
                                f"{max(firsts)} tokens, with {specials} special tokens{shared}, leaves no room for "
                                f"the second text in --max_length {max_length} (--long_texts truncate cuts both "
                                f"texts)")
        target = 1 if pairs is not None else 0  # the text that is windowed or cut: a pair's second
        out = {k: [] for k in enc.keys()}
        if setting.windowed:
            out[DOC] = []
        cut = set(long)
        for i in range(len(texts)):
            if i not in cut:
                cuts = [None]
            elif setting.windowed:
                cuts = _windows(enc.sequence_ids(i), target, max_length, stride)
            else:
                cuts = [_head_and_tail(enc.sequence_ids(i), target, max_length, setting.head_tokens)]
            for keep in cuts:
                for k in enc.keys():
                    row = enc[k][i]
                    out[k].append(row if keep is None else [row[j] for j in keep])
                if setting.windowed:
                    out[DOC].append(i)
        return out


def _head_and_tail(sequence_ids: list, target: int, max_length: int, head: Optional[int]) -> Optional[list]:
    """The positions to keep of one encoded row: every token outside sequence ``target``, its first ``head``
    tokens (None: a quarter of those it keeps) and its last ones, ``max_length`` in all; None where the row fits."""
    excess = len(sequence_ids) - max_length
    if excess <= 0:
        return None
    positions = [j for j, s in enumerate(sequence_ids) if s == target]
    kept = len(positions) - excess  # encode made sure a pair's second text keeps at least one token
    if head is not None and head >= kept:  # a pair's first text took the room (single texts: checked in encode)
        raise UserError(f"--head_tokens {head} leaves no tail: beside its first text, a pair's second text keeps "
                        f"{kept} tokens in --max_length {max_length}")
    first = kept // 4 if head is None else head
    dropped = set(positions[first:first + excess])
    return [j for j in range(len(sequence_ids)) if j not in dropped]


def _windows(sequence_ids: list, target: int, max_length: int, stride: int) -> list:
    """The positions of each window of one encoded row: every token outside sequence ``target`` (the special
    tokens, a pair's first text) and one stretch of ``target``'s tokens, ``max_length`` in all; neighbouring
    stretches share ``stride`` tokens, and the last may be shorter. [None] where the row fits.

    The tokenizer's own ``return_overflowing_tokens`` does the same, but tokenizers 0.23.2 returns only the
    first two windows of a text (0.23.3 all of them): cut here from the whole encoding, the windows do not
    depend on the library's version."""
    if len(sequence_ids) <= max_length:
        return [None]
    positions = [j for j, s in enumerate(sequence_ids) if s == target]
    prefix, suffix = list(range(positions[0])), list(range(positions[-1] + 1, len(sequence_ids)))
    room = max_length - len(prefix) - len(suffix)  # target tokens per window (> stride: checked in encode)
    windows, start = [], 0
    while True:
        windows.append(prefix + positions[start:start + room] + suffix)
        if start + room >= len(positions):
            return windows
        start += room - stride


def pool(logits, docs, mode: str) -> tuple:
    """(documents, their logits, the index of each document's first window): the rows of ``logits`` (one a
    window) pooled per document id in ``docs`` by ``mode`` (mean or max, per output), documents ascending."""
    import torch

    ids, inverse = torch.unique(docs, return_inverse=True)
    n, width = len(ids), logits.shape[1]
    logits = logits.float()
    if mode == "max":
        pooled = torch.full((n, width), float("-inf"), device=logits.device)
        pooled.scatter_reduce_(0, inverse[:, None].expand_as(logits), logits, reduce="amax")
    else:
        pooled = torch.zeros(n, width, device=logits.device).index_add_(0, inverse, logits)
        pooled /= torch.bincount(inverse, minlength=n)[:, None]
    rows = torch.arange(len(docs), device=docs.device)
    first = torch.full((n,), len(docs), device=docs.device).scatter_reduce_(0, inverse, rows, reduce="amin")
    return ids, pooled, first
