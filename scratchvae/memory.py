"""How much memory a run will need, estimated from its config before anything large is allocated.

A run that does not fit is refused in one line that names the flag to lower,
instead of being killed by the kernel minutes later with no message. The
estimate counts what a training step keeps alive at once::

    parameters   P values x 7 copies          the weights, their gradients, Adam's m and v, and the
                                              trainer's snapshot of all three (for replaying a bad step)
    data         the train, test and validation images on the backend
    noise        one epoch's eps, steps x B x S x L values
    activations  each row through each layer keeps about ACTIVATION_COPIES arrays of its width
                 (input, output, the gradient, a layer's cache); the encoder sees B rows (and the
                 VampPrior's K pseudo-inputs), the decoder B x S rows, and the VampPrior's density
                 is a (B S, K) array a few times over

It is an estimate, not an account: it errs large by a small factor and is
meant to catch the run that needs ten times the machine, not the one that
needs 90% of it.
"""
from __future__ import annotations

import math
import os

import numpy

__all__ = ["MemoryTooSmall", "estimate", "available_bytes", "check_fits"]

ACTIVATION_COPIES = 4
PARAMETER_COPIES = 7
DENSITY_COPIES = 4


class MemoryTooSmall(ValueError):
    """The run's estimated memory exceeds what the machine has; the message names the flag to lower."""


def _parameters(cfg, D: int) -> int:
    """An estimate of the model's parameter count from the config (the model is not built yet)."""
    if cfg.arch == "conv":
        c = (1,) + tuple(cfg.channels)
        conv = sum(16 * a * b for a, b in zip(c[:-1], c[1:]))          # 4x4 kernels (3x3 with pooling: fewer)
        side = max(1, int(math.sqrt(D)) >> len(cfg.channels))
        flat = c[-1] * side * side
        h = cfg.hidden[0] if cfg.hidden else 0
        dense = (flat * h + 2 * h * cfg.latent_dim + cfg.latent_dim * h + h * flat) if h else 3 * flat * cfg.latent_dim
        return 2 * conv + dense
    widths = (D,) + tuple(cfg.hidden)
    per = 2 if cfg.arch == "gated" else 1
    enc = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    levels = getattr(cfg, "levels", 1)
    total = levels * (2 * per * enc + 2 * widths[-1] * cfg.latent_dim)
    if cfg.prior == "vampprior":
        total += cfg.pseudo_inputs * D
    return total


def estimate(cfg, n_train: int, n_eval: int, D: int, data_itemsize: int) -> dict:
    """Bytes by what needs them: ``{"parameters", "data", "noise", "activations", "total"}``, and for each
    flag that scales a term, its share (``"by_flag"``: flag -> bytes that grow with it)."""
    item = numpy.dtype(cfg.dtype).itemsize
    B, S, L = cfg.batch_size, cfg.samples, cfg.latent_dim
    K = cfg.pseudo_inputs if cfg.prior == "vampprior" else 0
    levels = getattr(cfg, "levels", 1)
    params = PARAMETER_COPIES * _parameters(cfg, D) * item
    data = n_train * D * data_itemsize + n_eval * D * item
    steps = math.ceil(n_train / B)
    noise = steps * B * S * L * levels * item
    if cfg.arch == "conv":
        width = sum(c * D // 4 ** (i + 1) for i, c in enumerate(cfg.channels)) * 4   # unfolded images
    else:
        width = sum(cfg.hidden) * (2 if cfg.arch == "gated" else 1) * levels
    encoder = ACTIVATION_COPIES * (B + K) * (width + D) * item
    decoder = ACTIVATION_COPIES * B * S * (width + D) * item
    density = DENSITY_COPIES * B * S * K * 8 * levels
    total = params + data + noise + encoder + decoder + density
    by_flag = {"--pseudo-inputs": PARAMETER_COPIES * K * D * item + ACTIVATION_COPIES * K * (width + D) * item
               + density,
               "--samples": noise + decoder + density if S > 1 else 0,
               "--batch-size": encoder + decoder + density - ACTIVATION_COPIES * K * (width + D) * item,
               "--hidden": params if cfg.arch != "conv" else 0,
               "--limit": data}
    return {"parameters": params, "data": data, "noise": noise, "activations": encoder + decoder + density,
            "total": total, "by_flag": by_flag}


def available_bytes() -> int | None:
    """The memory a new allocation can get on this machine (Linux: MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def check_fits(cfg, n_train: int, n_eval: int, D: int, data_itemsize: int, available: int | None = None) -> dict:
    """Raise :class:`MemoryTooSmall` when the run's estimate exceeds ``available`` bytes (default: the
    machine's); returns the estimate."""
    est = estimate(cfg, n_train, n_eval, D, data_itemsize)
    available = available_bytes() if available is None else available
    if available is not None and est["total"] > available:
        flag, share = max(est["by_flag"].items(), key=lambda kv: kv[1])
        value = {"--pseudo-inputs": cfg.pseudo_inputs, "--samples": cfg.samples, "--batch-size": cfg.batch_size,
                 "--hidden": ",".join(map(str, cfg.hidden)), "--limit": n_train}[flag]
        raise MemoryTooSmall(f"this run needs about {_gb(est['total'])} of memory and the machine has "
                             f"{_gb(available)} available; {flag} {value} accounts for {_gb(share)} of it: "
                             f"lower {flag}")
    return est
