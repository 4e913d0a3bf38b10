"""The specification's helpers (metrics, checkpointing, device detection), as the package provides them.

    import sys; sys.path.insert(0, "src")   # in a checkout without `pip install`
    from training.utils import detect_device, set_seed, classification_metrics, save_checkpoint

Each name is the package's own function, re-exported here so that the specification's path keeps working;
new code imports from ``encoderfit`` directly.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from encoderfit.metrics import classification_metrics, confusion_matrix, macro_f1  # noqa: E402,F401
from encoderfit.run.checkpoint import save_checkpoint, verify_checkpoint  # noqa: E402,F401
from encoderfit.utils import (UserError, autocast_dtype, detect_device, launched_by_torchrun,  # noqa: E402,F401
                              set_seed)

__all__ = ["UserError", "autocast_dtype", "classification_metrics", "confusion_matrix", "detect_device",
           "launched_by_torchrun", "macro_f1", "save_checkpoint", "set_seed", "verify_checkpoint"]
