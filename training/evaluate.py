"""``encoderfit evaluate``, run from a checkout: ``python training/evaluate.py --help`` lists its flags."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's package, run from anywhere

from encoderfit.cli.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
