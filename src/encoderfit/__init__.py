"""encoderfit: fine-tune pretrained transformer encoders as text classifiers, on one device or many (DDP).

    from encoderfit import fit, Classifier, evaluate

    result = fit(dataframe, epochs=3)                      # or fit("train.csv"), or fit() on the bundled default
    clf = Classifier.load(result.best_checkpoint)
    clf.predict(["a warm, funny film"])                    # [Prediction(label='pos', score=0.97, scores={...})]
    evaluate(result.best_checkpoint, "test.csv")           # {"accuracy": ..., "macro_f1": ..., ...}

The command line is the same engine: ``encoderfit train|predict|evaluate|sweep|plot|export|push|launch``. Names load on first use,
so ``import encoderfit`` is quick and a command's ``--help`` does not wait for torch.
"""
from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {
    "fit": ("encoderfit.api", "fit"),
    "evaluate": ("encoderfit.api", "evaluate"),
    "sweep": ("encoderfit.api", "sweep"),
    "Classifier": ("encoderfit.serve.predictor", "Classifier"),
    "Prediction": ("encoderfit.serve.predictor", "Prediction"),
    "RunResult": ("encoderfit.run.result", "RunResult"),
    "TrainConfig": ("encoderfit.config", "TrainConfig"),
    "UserError": ("encoderfit.utils", "UserError"),
    "push_to_hub": ("encoderfit.api", "push_to_hub"),
    "export_onnx": ("encoderfit.api", "export_onnx"),
    "write_model_card": ("encoderfit.serve.card", "write_model_card"),
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'encoderfit' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(list(globals()) + __all__)
