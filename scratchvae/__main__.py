"""``python -m scratchvae``: the training command line (the same as ``examples/train_mnist.py``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m scratchvae"))
