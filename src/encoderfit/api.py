"""The Python API: the engine the command lines run, called as functions.

    from encoderfit import fit, Classifier, evaluate

    result = fit(dataframe, epochs=3, learning_rate=5e-5)   # settings named as the training flags
    result.best_metrics, result.best_checkpoint
    Classifier.load(result.best_checkpoint).predict(["a text"])
    evaluate(result.best_checkpoint, "test.csv")

Bad input raises ``UserError`` with the one-line message the command line prints. Under torchrun every rank
calls ``fit`` with the same arguments (DDP; rank 0 writes) and every rank gets the result.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Optional

from encoderfit.config import TrainConfig
from encoderfit.utils import UserError, launched_by_torchrun


def _is_path(obj) -> bool:
    return isinstance(obj, (str, os.PathLike))


def fit(train_data=None, validation_data=None, *, test_data=None, config: Optional[TrainConfig] = None,
        **settings):
    """Fine-tune a model; returns a ``RunResult`` (per-epoch metrics, best and final metrics and checkpoints,
    the time breakdown).

    ``train_data``: a file path (.csv, .tsv, .jsonl/.json, .parquet), a pandas DataFrame or a
    ``datasets.Dataset``, with a text column (and a second one for pairs) and a label column, found by name as
    for files; None: the data settings of ``config``/``settings`` (``dataset=...``, ``train_file=...``) or the
    bundled default. ``validation_data``: the same kinds (a path with a path); without it a seeded split of the
    training data is held out. ``test_data``: a labelled test set (a path, a DataFrame or a Dataset), scored once
    with best/ when the run ends, apart from model selection (``result.test_metrics``). ``config``: a
    ``TrainConfig``; ``settings``: training flags by name, over it.
    """
    started = time.perf_counter()
    if config is not None and not isinstance(config, TrainConfig):
        raise UserError(f"config must be a TrainConfig (TrainConfig.from_settings(...)), got {type(config).__name__}: "
                        f"or give the settings as keywords, fit(data, epochs=3, ...)")
    base = config or TrainConfig()
    files, given = {}, None
    if train_data is not None:
        if settings.get("train_file") or settings.get("dataset") or base.train_file or base.dataset:
            raise UserError("give the training data once: as train_data, or as train_file or dataset")
        if _is_path(train_data):
            if validation_data is not None and not _is_path(validation_data):
                raise UserError("train_data is a file path and validation_data is not: give both as paths, or both "
                                "in memory")
            files["train_file"] = os.fspath(train_data)
        else:
            from encoderfit.data.sources import GivenData

            if validation_data is not None and _is_path(validation_data):
                raise UserError("train_data is in memory and validation_data is a file path: give both in memory "
                                "(read the file with pandas), or both as paths")
            given = GivenData.from_objects(train_data, validation_data)
    elif validation_data is not None and not _is_path(validation_data):
        raise UserError("validation_data in memory needs train_data in memory too")
    if validation_data is not None and given is None:
        if settings.get("validation_file"):
            raise UserError("give the validation data once: as validation_data, or as validation_file")
        files["validation_file"] = os.fspath(validation_data)
    test = None
    if test_data is not None:
        if settings.get("test_file") or base.test_file or settings.get("test_split") or base.test_split:
            raise UserError("give the test data once: as test_data, or as test_file or test_split")
        if _is_path(test_data):
            files["test_file"] = os.fspath(test_data)
        else:
            from encoderfit.data.sources import _as_dataset

            test = _as_dataset(test_data, "the test data")
    cfg = base.replace(**settings, **files)  # checked once, with the data's files among the settings
    from encoderfit.run.trainer import train

    return train(cfg, launched_by_torchrun(), started, given=given, test=test)


def evaluate(checkpoint, data=None, *, verbose: bool = False, **flags) -> dict:
    """Score ``checkpoint`` on labelled data; the report ``encoderfit evaluate --output`` writes (metrics,
    per-label rows, the data's description).

    ``data``: a labelled file, a pandas DataFrame or a ``datasets.Dataset`` (every row of it); or None: the
    validation split of the data flags given (``train_file=...``, ``dataset=...``), made as training makes it,
    and with none given, the checkpoint's run's own validation split (the data flags it recorded). ``flags``: any
    other flag of ``encoderfit evaluate`` by name (``max_length``, ``batch_size``, ``device``, ``text_column``,
    ...). ``verbose``: print what the command prints."""
    from encoderfit.cli.evaluate import _check, build_parser, evaluate_checkpoint

    parser = build_parser()
    defaults = {a.dest: a.default for a in parser._actions if a.dest != "help"}
    unknown = sorted(set(flags) - set(defaults))
    if unknown:
        raise UserError(f"unknown setting(s) {', '.join(unknown)} (see encoderfit evaluate --help)")
    for name in ("output", "plot"):
        if flags.get(name):
            raise UserError(f"--{name} writes a file from the command line: use the returned report instead")
    if data is not None and not _is_path(data):
        from encoderfit.data.sources import _as_dataset

        if flags.get("train_file") or flags.get("dataset") or flags.get("validation_file"):
            raise UserError("data in memory is evaluated whole: leave train_file, dataset and validation_file out")
        data = _as_dataset(data, "the data given to evaluate()")
        if len(data) == 0:
            raise UserError("no examples in the data given to evaluate() (an empty Dataset)")
    elif data is not None:
        data = os.fspath(data)
    args = argparse.Namespace(**{**defaults, **flags, "checkpoint": os.fspath(checkpoint),
                                 **({"validation_file": data} if data is not None else {})})
    _check(args)
    record, _ = evaluate_checkpoint(args, say=print if verbose else (lambda line: None))
    return record


def push_to_hub(checkpoint, repo_id: str, *, private: bool = False, commit_message: Optional[str] = None) -> str:
    """Upload a finished run's checkpoint (a run directory means its ``final/``) with its model card to the
    Hugging Face Hub repository ``repo_id``, created if need be; returns its URL. As ``encoderfit push``."""
    from encoderfit.cli.push import resolve
    from encoderfit.serve import hub

    path = resolve(os.fspath(checkpoint))
    hub.check_hub_access(repo_id, "push_to_hub()")
    return hub.push_checkpoint(path, repo_id, private=private, commit_message=commit_message)


def export_onnx(checkpoint, *, int8: bool = False, data=None, check: bool = True, verbose: bool = False) -> dict:
    """Write the checkpoint (a run directory means its ``final/``) as ONNX into ``CKPT/onnx/`` (``model.onnx``;
    with ``int8`` also ``model_qint8.onnx``, weights quantized for CPUs) and check it against the PyTorch model on
    the run's own validation split (or the labelled file ``data``); returns the record written to
    ``onnx/export.json``. As ``encoderfit export``. Serve it with ``Classifier.load(ckpt, runtime="onnx")``."""
    from encoderfit.serve.onnx import export_onnx as export

    return export(os.fspath(checkpoint), int8=int8, data=None if data is None else os.fspath(data), check=check,
                  say=print if verbose else (lambda line: None))


def sweep(train_data=None, validation_data=None, *, test_data=None, sweep_dir="sweep", time_budget=None,
          trials=None, pruner=None, parallel_trials=None, **flags) -> dict:
    """Search recipes as ``encoderfit sweep`` does; returns sweep.json's record (every trial, ``best``) with
    ``best_checkpoint`` (the winning trial's best/) and ``test`` (its report on ``test_data``, or None).

    ``train_data``, ``validation_data``, ``test_data``: file paths (a sweep reads its data from files, so that
    it can be continued). A searched flag takes a list (``learning_rate=[2e-5, 5e-5]``) or a range string
    (``learning_rate="1e-5:2e-4:log"``); any other training flag one value. ``time_budget``: "10m", "90s" or
    seconds: sampled trials until it is spent (over the learning rate and the epochs where nothing is searched).
    """
    from pathlib import Path

    from encoderfit.cli.sweep import _sweep

    data = {"train_file": train_data, "validation_file": validation_data, "test_file": test_data}
    for name, value in data.items():
        if value is not None and not _is_path(value):
            raise UserError(f"sweep() reads its data from files (a sweep can be continued): save the "
                            f"{name.split('_')[0]} data first (df.to_csv(...)) and pass the path")
    own = {"sweep_dir": sweep_dir, "time_budget": time_budget, "trials": trials, "pruner": pruner,
           "parallel_trials": parallel_trials}
    argv = []
    for name, value in {**own, **{k: v for k, v in data.items() if v is not None}, **flags}.items():
        if value is None or value is False:
            continue
        if value is True:
            argv.append(f"--{name}")
        elif isinstance(value, (list, tuple)):
            argv += [f"--{name}", ",".join(str(v) for v in value)]
        else:
            argv += [f"--{name}", os.fspath(value) if _is_path(value) else str(value)]
    code = _sweep(argv)
    if code not in (0, 130, 143):
        raise UserError(f"the sweep failed (exit code {code}): see what it printed above")
    if code != 0:
        raise UserError(f"the sweep stopped (exit code {code}): call sweep() again with the same settings to "
                        f"continue it")
    if os.environ.get("RANK", "0") != "0":  # under torchrun the main process writes the sweep's record
        return None
    import json

    root = Path(sweep_dir)
    record = json.loads((root / "sweep.json").read_text(encoding="utf-8"))
    test = root / "test.json"
    return {**record, "best_checkpoint": (root / "best").resolve() if record.get("best") else None,
            "test": json.loads(test.read_text(encoding="utf-8")) if test_data is not None and test.is_file() else None}
