"""``python -m encoderfit COMMAND ...`` (and ``torchrun ... -m encoderfit train ...``): the ``encoderfit`` command."""
import sys

from encoderfit.cli import main

if __name__ == "__main__":
    sys.exit(main())
