"""A run's test set (``--test_file``, or ``fit(..., test_data=...)``): read and checked before training, scored
once with best/ when the run ends, apart from model selection (the main process alone)."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

GIVEN = "the test data given to fit()"


@dataclass(frozen=True)
class HubSplit:
    """A split of a --dataset, read when the test set is first checked."""
    name: str
    config: Optional[str]
    split: str


@dataclass
class TestSet:
    source: object            # a file path, or a datasets.Dataset
    text_columns: list        # the training data's text column(s): a pair run reads the same two
    label_flags: dict         # --label_column, --label_separator, --label_columns, --quoting, as training read them
    described: Optional[str] = None  # how to name it, where its source does not say

    @classmethod
    def of(cls, cfg, given, text_columns: list) -> Optional["TestSet"]:
        source = given if given is not None else cfg.test_file
        if source is None and cfg.test_split is not None:
            source = HubSplit(cfg.dataset, cfg.dataset_config, cfg.test_split)
        if source is None:
            return None
        flags = {"label_column": cfg.label_column, "label_separator": cfg.label_separator,
                 "label_columns": cfg.label_columns, "quoting": cfg.quoting}
        described = (f"the {source.split!r} split of dataset {source.name}" if isinstance(source, HubSplit)
                     else None)
        return cls(source, list(text_columns), flags, described)

    @property
    def name(self) -> str:
        if self.described:
            return self.described
        return os.fspath(self.source) if isinstance(self.source, (str, os.PathLike)) else GIVEN

    def check(self, shape, task) -> None:
        """Read it as evaluation will, and refuse labels the run's task does not know (UserError)."""
        from encoderfit.data.columns import NO_PAIR
        from encoderfit.data.splits import ColumnChoice, load_labelled_file

        if isinstance(self.source, HubSplit):  # read once, on the process that checks and scores it
            from encoderfit.data.sources import hub_split, load_hub_splits

            loaded = load_hub_splits(self.source.name, self.source.config)
            self.source = hub_split(loaded, self.source.name, self.source.split, "--test_split")
        if isinstance(self.source, (str, os.PathLike)) and not Path(self.source).is_file():
            from encoderfit.utils import UserError

            raise UserError(f"--test_file {self.name}: no such file")
        pair = self.text_columns[1] if len(self.text_columns) == 2 else NO_PAIR
        columns = ColumnChoice(self.text_columns[0], pair, self.label_flags["label_column"],
                               self.label_flags["label_separator"], self.label_flags["label_columns"])
        got = load_labelled_file(self.source, shape, columns=columns, quoting=self.label_flags["quoting"] or "auto")
        task.check_labels(got.labels, self.name)

    def score(self, checkpoint: Path, *, device, precision: str, batch_size: int) -> dict:
        """``checkpoint``'s report on the test set, as ``encoderfit evaluate`` makes it."""
        from encoderfit.cli.evaluate import build_parser, evaluate_checkpoint

        parser = build_parser()
        args = argparse.Namespace(**{a.dest: a.default for a in parser._actions if a.dest != "help"})
        args.checkpoint, args.validation_file = str(checkpoint), self.source
        args.device, args.precision, args.batch_size = str(device), precision, batch_size
        args.text_column = self.text_columns[0]
        if len(self.text_columns) == 2:
            args.text_pair_column = self.text_columns[1]
        for flag, value in self.label_flags.items():
            if value is not None:
                setattr(args, flag, value)
        record, _ = evaluate_checkpoint(args, say=lambda line: None)
        return record
