"""The test NLL as papers quote it: the IWAE bound with k samples per image, over a whole split."""
from __future__ import annotations

import sys
import time

import numpy

__all__ = ["iwae_test_nll"]


def iwae_test_nll(model, x, k, rng, *, chunk=None, progress=None, log=None) -> float:
    """The test NLL as papers quote it: ``-mean`` of the IWAE bound with ``k`` samples per image.

    ``x`` (N, D) on the model's backend, ``rng`` a generator of that backend;
    the images go through :meth:`VAE.iwae_bound` ``chunk`` at a time (default
    100 on the CPU, 1000 on a GPU, which needs large launches to be busy; the
    progress bar counts images; ``progress=None`` shows it on a terminal).
    ``log``, when given and no bar shows, gets a line at every tenth of the
    images with the time spent and the time left (for a log file).
    """
    from tqdm.auto import tqdm

    if chunk is None:
        chunk = 1000 if model.backend.name == "cupy" else 100

    if progress is None:
        progress = sys.stderr.isatty()
    if progress:
        log = None   # the bar says it
    bounds, n, t0, told = [], x.shape[0], time.perf_counter(), 0
    with tqdm(total=n, desc=f"IWAE k={k}", unit="img", leave=False, file=sys.stderr, disable=not progress) as bar:
        for start in range(0, n, chunk):
            bounds.append(model.iwae_bound(x[start:start + chunk], k, rng))
            bar.update(bounds[-1].shape[0])
            done = start + bounds[-1].shape[0]
            if log is not None and (10 * done) // n > told:
                told, spent = (10 * done) // n, time.perf_counter() - t0
                log(f"IWAE k={k}: {done}/{n} images, {spent:.0f} s spent, about {spent * (n - done) / done:.0f} s left")
    return -float(numpy.concatenate(bounds).mean())
