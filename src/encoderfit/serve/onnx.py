"""ONNX for serving: a checkpoint exported with PyTorch's exporter, an optional dynamic int8 copy, both checked
against the PyTorch checkpoint, and the model that runs them in ONNX Runtime behind the predictor.

    encoderfit export checkpoints/RUN/final --int8      # writes final/onnx/model.onnx and model_qint8.onnx
    Classifier.load("checkpoints/RUN/final", runtime="onnx-int8").predict(["a text"])

The export takes the inputs the predictor's batches have (input_ids, attention_mask and, where the tokenizer
makes them, token_type_ids: pairs included), with the batch and sequence axes dynamic, and returns the logits;
tokenization, long-text windows and decoding stay in Python, as for the PyTorch model, so every task shape and
long-text mode serves the same way. The files sit in the checkpoint's onnx/ folder beside the config and the
tokenizer they need (the layout Hub model repositories use), so a pushed checkpoint carries them.
"""
from __future__ import annotations

import contextlib
import logging
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from encoderfit.utils import UserError, atomic_write_json

ONNX_DIR = "onnx"
FILES = {"fp32": "model.onnx", "int8": "model_qint8.onnx"}
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
PROBABILITY_LIMIT = 1e-4  # fp32: the largest difference in a probability (or a score, per unit of its range)
METRIC_LIMIT = 0.01       # int8: the task's headline metric within one point of the PyTorch model's
CHECK_METRIC = {"single_label": "accuracy", "multi_label": "micro_f1", "regression": "pearson"}  # higher is better
INSTALL = "pip install 'encoderfit[onnx]' (onnx, onnxruntime, onnxscript)"


def _runtime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"ONNX Runtime is not installed: {INSTALL}") from None
    return onnxruntime


class OnnxModel:
    """An exported checkpoint in ONNX Runtime on the CPU, called as the PyTorch model is: ``model(**inputs)``
    gives an object with ``.logits`` (a float32 torch tensor)."""

    def __init__(self, path: Path, config):
        ort = _runtime()
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own errors: a damaged or foreign file
            raise UserError(f"cannot load {path} in ONNX Runtime: {' '.join(str(exc).split())[:200]}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.config, self.path = config, path

    @classmethod
    def load(cls, ckpt: Path, config, int8: bool = False) -> "OnnxModel":
        path = ckpt / ONNX_DIR / FILES["int8" if int8 else "fp32"]
        if not path.is_file():
            flag = " --int8" if int8 else ""
            raise UserError(f"{ckpt} has no ONNX export ({ONNX_DIR}/{path.name}): run encoderfit export {ckpt}{flag}")
        return cls(path, config)

    def to(self, device) -> "OnnxModel":
        return self

    def eval(self) -> "OnnxModel":
        return self

    def __call__(self, **inputs):
        import numpy as np
        import torch

        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise UserError(f"{self.path} takes {', '.join(missing)}, which this checkpoint's tokenizer does not "
                            f"make: export it again (encoderfit export)")
        feeds = {n: np.ascontiguousarray(inputs[n].cpu().numpy(), dtype=np.int64) for n in self.input_names}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(["logits"], feeds)[0]))


# ---------------------------------------------------------------- the export

def export_onnx(checkpoint, *, int8: bool = False, data=None, check: bool = True, say=print) -> dict:
    """Write ``CKPT/onnx/model.onnx`` (and with ``int8`` a dynamically quantized ``model_qint8.onnx``), then check
    them on labelled data: ``data`` (a file) or, without it, the checkpoint's run's own validation split. The
    record (files, sizes, the check's numbers) is returned and written to ``onnx/export.json``; a check that
    fails raises ``UserError`` with its numbers."""
    import torch

    from encoderfit.serve import inference

    _runtime()
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (torch.onnx.export's translator)
    except ImportError as exc:
        raise UserError(f"the ONNX exporter needs {exc.name}: {INSTALL}") from None
    ckpt = inference.resolve_checkpoint(checkpoint)
    checked = _check_data(ckpt, data) if check else None  # the data is found (or refused) before the export
    cpu = torch.device("cpu")
    clf = inference.load_classifier(ckpt, cpu)
    out = ckpt / ONNX_DIR
    try:
        out.mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    started = time.perf_counter()
    fp32 = _export(clf, out / FILES["fp32"])
    record = {"checkpoint": str(ckpt), "files": {"fp32": _file_info(fp32)}, "export_seconds": 0.0,
              "versions": _versions()}
    say(f"wrote {fp32} ({_mb(fp32)}, fp32) in {time.perf_counter() - started:.1f}s")
    if int8:
        q = _quantize(fp32, out / FILES["int8"])
        record["files"]["int8"] = _file_info(q)
        say(f"wrote {q} ({_mb(q)}, int8 weights: dynamic quantization)")
    else:
        (out / FILES["int8"]).unlink(missing_ok=True)  # an older int8 copy would not match this export
    record["export_seconds"] = round(time.perf_counter() - started, 2)
    if checked is not None:
        record["check"] = _check(ckpt, clf, checked, int8, say)
    atomic_write_json(out / "export.json", record)
    failed = (record.get("check") or {}).get("failed")
    if failed:  # a file that failed its check is not left where the predictor would serve it
        for name in FILES.values():
            (out / name).unlink(missing_ok=True)
        raise UserError(f"the ONNX export does not match the PyTorch checkpoint: {failed} (numbers in "
                        f"{out / 'export.json'}; the files were removed)")
    return record


def _export(clf, path: Path) -> Path:
    import torch

    class Logits(torch.nn.Module):
        """The classifier as a function of its input tensors, returning the logits alone."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            given = {"attention_mask": attention_mask, "token_type_ids": token_type_ids}
            return self.model(input_ids=input_ids, **{k: v for k, v in given.items() if v is not None}).logits

    sample = _sample_batch(clf)
    dim = torch.export.Dim.DYNAMIC
    tmp = path.with_name(path.name + ".tmp")
    with _quiet():
        try:
            program = torch.onnx.export(Logits(clf.model).eval(), (), kwargs=sample, dynamo=True,
                                        input_names=list(sample), output_names=["logits"], verbose=False,
                                        dynamic_shapes={name: {0: dim, 1: dim} for name in sample},
                                        external_data=False)
            program.save(str(tmp))
        except Exception as exc:  # the exporter's own errors: an architecture it cannot trace
            tmp.unlink(missing_ok=True)
            raise UserError(f"torch.onnx.export cannot export {clf.path}: {' '.join(str(exc).split())[:300]}") from None
    tmp.replace(path)
    return path


def _sample_batch(clf) -> dict:
    """Two tokenized examples of different lengths (pairs for a pair checkpoint), padded as the predictor pads."""
    from encoderfit.data.batches import PadCollator

    texts = ["a short example", "a second and somewhat longer example text, for the export"]
    second = ["another text", "and the second text of the pair, a little longer"] if clf.takes_pairs else None
    enc = clf.tokenizer(texts, second, truncation=True, max_length=64)
    rows = [dict(zip(enc.keys(), values)) for values in zip(*enc.values())]
    batch = PadCollator(clf.tokenizer)(rows)
    return {name: batch.inputs[name] for name in INPUTS if name in batch.inputs}


def _quantize(fp32: Path, path: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import onnx

    tmp = path.with_name(path.name + ".tmp")
    plain = path.with_name(path.name + ".plain.tmp")
    # the exporter's recorded intermediate shapes (value_info) go: some quantizer versions infer shapes again
    # and refuse where the two disagree (onnxruntime 1.30 did), and the shapes are optional
    with _quiet():
        try:
            model = onnx.load(str(fp32))
            del model.graph.value_info[:]
            onnx.save(model, str(plain))
            # per channel: one scale per output row of a weight, which kept the default checkpoint's accuracy
            # (a scale per tensor lost 0.7 points of it, BENCHMARKS.md)
            quantize_dynamic(str(plain), str(tmp), weight_type=QuantType.QInt8, per_channel=True)
        except Exception as exc:  # onnxruntime's quantizer: an operator it cannot handle (or a full disk)
            tmp.unlink(missing_ok=True)
            raise UserError(f"ONNX Runtime cannot quantize {fp32}: {' '.join(str(exc).split())[:300]} (the fp32 "
                            f"export is kept)") from None
        finally:
            plain.unlink(missing_ok=True)
    tmp.replace(path)
    return path


@contextlib.contextmanager
def _quiet():
    """The exporter's and the quantizer's progress lines and advice, kept off the user's screen."""
    loggers = [logging.getLogger(name) for name in ("", "torch.onnx", "torch.export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(None):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# ---------------------------------------------------------------- the check

def _check_data(ckpt: Path, data: Optional[str]):
    """The labelled examples the export is checked on (as ``encoderfit evaluate`` finds them)."""
    from encoderfit.cli import evaluate
    from encoderfit.serve import inference

    if not data and inference.run_directory(ckpt) is None:
        raise UserError("no run beside the checkpoint to check the export on: give labelled data with --data FILE, "
                        "or --no_check")
    argv = ["--checkpoint", str(ckpt)] + (["--validation_file", str(data)] if data else [])
    args = evaluate.build_parser().parse_args(argv)
    evaluate._check(args)
    try:
        _, got, _ = evaluate.evaluation_data(args, say=lambda line: None)
    except UserError as exc:
        raise UserError(f"cannot check the export on {'--data ' + str(data) if data else 'the run' + chr(39) + 's validation split'}"
                        f" ({exc}): give labelled data with --data FILE, or --no_check") from None
    return got


def _check(ckpt: Path, torch_clf, got, int8: bool, say) -> dict:
    import torch

    from encoderfit.serve import inference

    cpu = torch.device("cpu")
    task = torch_clf.task
    where = got.info.get("validation", got.info.get("source", "the data"))
    max_length = inference.resolve_max_length(None, torch_clf, fallback=inference.trained_max_length(ckpt))
    runs = {"torch": torch_clf, "onnx": inference.load_classifier(ckpt, cpu, "onnx")}
    if int8:
        runs["onnx-int8"] = inference.load_classifier(ckpt, cpu, "onnx-int8")
    logits = {name: inference.predict_logits(clf, got.texts, pairs=got.pairs, max_length=max_length)
              for name, clf in runs.items()}
    metric = CHECK_METRIC[task.name]
    scores = {name: task.evaluation_report(value, got.labels, where=where, elapsed=1.0, say=lambda line: None)[0]
              for name, value in logits.items()}
    outputs = {name: _outputs(task, value) for name, value in logits.items()}
    scale = max(1.0, float(outputs["torch"].abs().max())) if task.name == "regression" else 1.0
    diff = float((outputs["onnx"] - outputs["torch"]).abs().max()) / scale
    record = {"data": where, "examples": len(got.texts), "max_length": max_length,
              "fp32_max_abs_difference": diff, "fp32_limit": PROBABILITY_LIMIT, "metric": metric,
              "scores": {name: scores[name][metric] for name in scores}}
    what = "score (per unit of range)" if task.name == "regression" else "probability"
    line = f"check on {where} ({len(got.texts)} examples): fp32 max |difference| of a {what} {diff:.1e} (limit 1e-4)"
    failed = []
    if not diff < PROBABILITY_LIMIT:
        failed.append(f"fp32 differs by {diff:.1e} (limit {PROBABILITY_LIMIT:.0e})")
    line += " | " + ", ".join(f"{metric} {name} {scores[name][metric]:.4f}" for name in scores)
    if int8:
        drop = scores["torch"][metric] - scores["onnx-int8"][metric]
        record["int8_metric_drop"] = drop
        line += f" (int8: {100 * drop:+.2f} points, limit 1)"
        if drop != drop:  # undefined (a correlation of constant targets or scores): nothing to compare
            line += f"; {metric} is undefined on this data: int8 not compared"
        elif not drop <= METRIC_LIMIT:
            failed.append(f"int8 {metric} is {100 * drop:.2f} points under the PyTorch model's (limit 1)")
    say(line)
    record["failed"] = "; ".join(failed) or None
    return record


def _outputs(task, logits):
    """What a prediction reports: probabilities (softmax, or a sigmoid per label), or the regression score."""
    if task.name == "single_label":
        return logits.softmax(-1)
    if task.name == "multi_label":
        return logits.sigmoid()
    return logits


def _file_info(path: Path) -> dict:
    return {"path": path.name, "bytes": path.stat().st_size}


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 2 ** 20:.1f} MiB"


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
