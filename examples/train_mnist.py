#!/usr/bin/env python
"""Train a VAE on MNIST with scratchvae.

    python examples/train_mnist.py                    # NumPy, binarized MNIST shipped with the package
    python examples/train_mnist.py --backend cupy     # on an NVIDIA GPU
    python examples/train_mnist.py --help             # every flag

The flags are :mod:`scratchvae.cli`'s, the training loop is
:func:`scratchvae.train.train`; this file only runs them.
"""
import sys

from scratchvae.cli import main

if __name__ == "__main__":
    sys.exit(main())
