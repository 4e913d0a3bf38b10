"""Unpadded training: each batch's real tokens packed into one row, attention by variable-length flash attention.

A padded batch of short texts is mostly padding once its lengths are rounded for CUDA graphs (texts of
about 20 tokens padded to 32), and every kernel works on the pads. Packed, a batch is one row of its
examples' tokens end to end, with

- ``position_ids`` restarting at each example (from ``padding_idx + 1`` for RoBERTa-style embeddings,
  as those models count their positions),
- ``cu_seq_lens_q``: where each example starts (int32, the examples' cumulative lengths), which the
  attention below hands to PyTorch's flash-attention kernel in its variable-length form, so an example
  attends to itself alone and no attention mask is needed,
- a short tail of pad tokens that rounds the row to one of few lengths (by at most 64 tokens or an eighth
  more, whichever is larger, so CUDA graphs record few shapes: about eight an octave of token counts). The
  tail is split into as few segments as keep each within ``max_length`` (one, unless the rounding is
  larger than ``max_length``), so its positions stay in range and the kernel's length bound holds. Its
  segments attend to themselves only, stay finite and reach no example's output.

The encoder's output is then cut down to each example's first token (the [CLS] / <s> position that the
classifier heads of these families read), shaped as a padded batch's first column: the model's own
pooler and head run unchanged, and so do the loss and the metrics.

The attention is registered with transformers' ``AttentionInterface`` as ``ATTENTION``; without the packing
arguments (evaluation, prediction) it is transformers' SDPA attention with its mask, unchanged.
``torch.nn.attention.varlen.varlen_attn`` runs the same kernel but fixes its dropout at 0; the aten op
beneath it takes the model's attention dropout, so training regularizes as the padded path does.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from encoderfit.data.batches import Batch, row_targets
from encoderfit.utils import UserError

ATTENTION = "packed_varlen"
# Model types whose every attention layer goes through transformers' attention interface, whose embeddings
# take position ids, and whose classifier reads the first token's output.
FAMILIES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra")
MIN_ROUNDING = 64


def packed_layout(tokens: int, max_length: int) -> tuple:
    """(row length, tail segments' lengths) for ``tokens`` real tokens.

    The row is rounded up to a multiple of an eighth of the octave of ``tokens`` (of ``MIN_ROUNDING`` for
    small batches), leaving room for at least one token per tail segment. The tail is split evenly into
    the fewest segments of at most the largest power of 2 within ``max_length`` each. The number of
    segments depends on the rounding step alone; a graph's key holds it with the row length (the shape of
    ``cu_seq_lens_q``), so a row length reached with two counts (tiny ``max_length`` only) is two shapes."""
    step = max(MIN_ROUNDING, 1 << max(0, tokens.bit_length() - 4))
    cap = 1 << (max_length.bit_length() - 1)  # the largest power of 2 within max_length (>= 2)
    # a tail of up to step + pieces - 1 tokens in `pieces` segments of at most `cap`
    pieces = -(-(step - 1) // (cap - 1))
    total = -(-(tokens + pieces) // step) * step
    short, extra = divmod(total - tokens, pieces)
    return total, [short + 1] * extra + [short] * (pieces - extra)


class PackCollator:
    """Tokenized rows (plain lists) -> a packed ``Batch`` (one row; see the module's docstring)."""

    def __init__(self, tokenizer, *, max_length: int, position_offset: int = 0):
        if tokenizer.pad_token_id is None:
            raise UserError("the tokenizer has no padding token; packed batches need one for their tail")
        if max_length < 2:
            raise UserError(f"--unpadded needs a --max_length of at least 2 (got {max_length})")
        self.pad_id, self.type_pad_id = tokenizer.pad_token_id, tokenizer.pad_token_type_id
        self.max_length, self.offset = max_length, position_offset

    def __call__(self, rows: list) -> Batch:
        lengths = np.array([len(r["input_ids"]) for r in rows], dtype=np.int64)
        real = int(lengths.sum())
        total, tail = packed_layout(real, self.max_length)
        segments = np.concatenate([lengths, tail])
        starts = np.concatenate([[0], np.cumsum(segments)])  # each example's start, the tail's, then the end
        ids = np.full(total, self.pad_id, dtype=np.int64)
        ids[:real] = np.concatenate([r["input_ids"] for r in rows])
        positions = np.arange(total) - np.repeat(starts[:-1], segments)  # from 0 in every segment
        inputs = {"input_ids": ids, "position_ids": positions + self.offset}
        if "token_type_ids" in rows[0]:
            types = np.full(total, self.type_pad_id, dtype=np.int64)
            types[:real] = np.concatenate([r["token_type_ids"] for r in rows])
            inputs["token_type_ids"] = types
        inputs = {k: torch.from_numpy(v)[None] for k, v in inputs.items()}
        inputs["cu_seq_lens_q"] = torch.from_numpy(starts.astype(np.int32))
        labels, docs = row_targets(rows)
        return Batch(inputs, labels, len(rows), real, docs, max_length=self.max_length)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
               max_length_q=None, **kwargs):
    """Variable-length flash attention for a packed batch; transformers' SDPA attention otherwise."""
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    # (1, heads, tokens, head_dim) -> (tokens, heads, head_dim), the kernel's layout: a view of the projections'
    # own memory, and so are the gradients back through it (indexing [0] instead made the backward allocate
    # the whole input and copy into it, and the projection's reshape then clone it: 6% of a BERT-base step)
    q, k, v = (t.transpose(1, 2).squeeze(0) for t in (query, key, value))
    out = varlen(q, k, v, cu_seq_lens_q, max_length_q, dropout=dropout, scale=scaling)
    return out.unsqueeze(0), None  # (1, tokens, heads, head_dim): what the SDPA attention returns


def varlen(q, k, v, cu_seq_lens: torch.Tensor, max_length: int, *, dropout: float, scale: Optional[float]):
    """Each segment of ``cu_seq_lens`` attends to itself: (tokens, heads, head_dim) in and out."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length,
                                                   dropout, False, False, scale=scale)[0]


def register() -> None:
    """Make ``ATTENTION`` known to transformers (its masks: SDPA's, for the padded batches)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def _sequence_module(model) -> Optional[torch.nn.Module]:
    """The module whose output is the encoder's last hidden states, before any pooler."""
    base = model.base_model
    return getattr(base, "encoder", None) or getattr(base, "transformer", None)


def unfit(model, device: torch.device, amp_dtype) -> Optional[str]:
    """Why this model cannot train unpadded here, or None."""
    kind = getattr(model.config, "model_type", "unknown")
    if device.type != "cuda":
        return "a CUDA device"
    if amp_dtype is None:
        return "bf16 or fp16 (flash attention has no fp32 kernel)"
    if kind not in FAMILIES or _sequence_module(model) is None or getattr(model.config, "is_decoder", False):
        return f"an encoder of the families {', '.join(FAMILIES)} (this one is {kind}" + (
            ", configured as a decoder)" if getattr(model.config, "is_decoder", False) else ")")
    if not torch.backends.cuda.is_flash_attention_available() or torch.cuda.get_device_capability(device) < (8, 0):
        return "a GPU of compute capability 8.0 or newer (flash attention)"
    heads = getattr(model.config, "num_attention_heads", None) or getattr(model.config, "n_heads", 1)
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "dim", 0)
    if hidden // heads > 256 or (hidden // heads) % 8:
        return "a head size of at most 256, a multiple of 8 (flash attention)"
    return None


def position_offset(model) -> int:
    """Where a text's positions start: 0, or ``padding_idx + 1`` for RoBERTa-style embeddings."""
    embeddings = model.base_model.embeddings
    if hasattr(embeddings, "create_position_ids_from_input_ids"):
        return int(embeddings.padding_idx) + 1
    return 0


def _first_tokens(module, args, kwargs, output):
    """Forward hook on the encoder: for a packed batch, keep each example's first token, as a (examples, 1,
    hidden) batch, so the pooler and the classifier see what a padded batch's first column gives them."""
    cu, examples = kwargs.get("cu_seq_lens_q"), kwargs.get("packed_examples")
    if cu is None:
        return output
    hidden = output[0]
    first = hidden.squeeze(0).index_select(0, cu[:examples].long()).unsqueeze(1)  # the tail's segments come after
    output["last_hidden_state"] = first
    return output


def prepare(model) -> None:
    """Switch ``model`` to the packed attention (padded batches still run as before) and cut the encoder's
    packed output to the examples' first tokens."""
    register()
    model.set_attn_implementation(ATTENTION)
    if getattr(model, "_packing_hook", None) is None:  # once: a second call must not cut the output twice
        model._packing_hook = _sequence_module(model).register_forward_hook(_first_tokens, with_kwargs=True)
