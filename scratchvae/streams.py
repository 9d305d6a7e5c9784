"""How a run's randomness is drawn: every epoch's shuffle, noise, binarization and corruption come from
generators seeded by ``(config.seed, epoch, stream)``, so a resumed run regenerates what an uninterrupted
one drew, on either backend, without saving a generator's state."""
from __future__ import annotations

import numpy

__all__ = ["NOISE_SCHEME", "DENOISING_STREAM", "EVAL_DEQUANTIZATION_STREAM", "seeds"]

# recorded in checkpoints: a run resumes only under the scheme it was drawn with
NOISE_SCHEME = "seed-epoch-v1"
# The generator stream of batch b's denoising corruption (streams 0, 1 and 2 + b are shuffle, eps, binarization).
DENOISING_STREAM = 1 << 40
# The stream (of epoch 0) of the fixed dequantization noise of 8-bit test and validation images.
EVAL_DEQUANTIZATION_STREAM = 1 << 41


def seeds(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed for one stream (0: shuffle, 1: eps, 2 + b: batch b's binarization) of one epoch."""
    return int(numpy.random.SeedSequence([seed, epoch, stream]).generate_state(1, numpy.uint64)[0] >> numpy.uint64(1))
