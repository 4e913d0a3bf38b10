"""Data, one home per concern: sources -> reader -> columns -> labels -> splits -> cache -> loaders.

Every source ends as two ``datasets.Dataset`` splits with a ``text`` column (and ``text_pair`` for pairs of
texts) and a ``labels`` column (what the task trains on), plus the label names. Tokenization happens once:
the main process of each node builds the tokenized splits and caches them, keyed by everything they depend on.
"""
from encoderfit.data.cache import TokenizedData, prepare_data, tokenizer_identity
from encoderfit.data.columns import NO_PAIR, column, is_blank_text
from encoderfit.data.loaders import (
                                    Batching,
                                    ShardSampler,
                                    TrainBatchSampler,
                                    make_loaders,
)
from encoderfit.data.reader import QUOTING_MODES, read_delimited
from encoderfit.data.sources import DataSource
from encoderfit.data.splits import (
                                    LabelledFile,
                                    LabelledSplits,
                                    _stratified_split,
                                    example_keys,
                                    load_labelled_file,
                                    load_labelled_splits,
                                    validation_sha256,
)

__all__ = ["Batching", "DataSource", "LabelledFile", "LabelledSplits", "NO_PAIR", "QUOTING_MODES", "ShardSampler",
           "TokenizedData", "TrainBatchSampler", "column", "example_keys", "is_blank_text", "load_labelled_file",
           "load_labelled_splits", "make_loaders", "prepare_data", "read_delimited", "tokenizer_identity", "validation_sha256",
           "_stratified_split"]
