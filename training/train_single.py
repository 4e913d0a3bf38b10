"""Fine-tune a pretrained transformer encoder as a text classifier on one device.

    python training/train_single.py --num_samples 100 --epochs 1     # quick test on CPU
    python training/train_single.py --epochs 3 --batch_size 32        # full training

Device: CUDA, then Apple MPS, then CPU (``--device`` overrides). For several GPUs
or nodes use train_ddp.py under torchrun: the same engine and flags. The same command
once installed: ``encoderfit train ...``; from Python: ``encoderfit.fit(...)``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's package, run from anywhere

from encoderfit.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(use_torchrun=False, description=__doc__.split("\n\n")[0]))
