"""Figures for a trained VAE (or plain autoencoder): one PNG per function.

Every ``plot_*`` function draws one figure with matplotlib's object API
(:class:`matplotlib.figure.Figure` plus the Agg canvas), so no global pyplot
state is touched and no display is needed.  Each writes its PNG to a
temporary name in the destination folder and then moves it into place with
:func:`os.replace`, so an interrupted run never leaves a half-written image,
and each returns a small JSON-serialisable ``dict`` of what it computed
(the numbers behind the picture; handy for tests and for ``summary.json``).

The model interface used here is deliberately small:

``model.latent_dim``
    int.
``model.input_shape``
    ``(C, H, W)``; a flat image has ``D = C * H * W`` values in [0, 1].
``model.backend``
    with ``asarray(a, dtype=None)`` and ``asnumpy(a)``.
``model.dtype``
    the NumPy dtype of the parameters.
``model.encode(x) -> (mu, log_sigma)``
    ``x`` a backend array ``(B, D)``; ``log_sigma`` is ``None`` for a plain
    autoencoder.
``model.decode(z) -> (B, D)``
    mean images in [0, 1].
``model.sample(n, rng) -> (n, D)`` and ``model.reconstruct(x) -> (B, D)``.

The model may live on a GPU: inputs go through ``model.backend.asarray`` in
batches of ``BATCH`` rows and every result comes back with
``model.backend.asnumpy`` before plotting.  Randomness only ever comes from an
explicit ``rng`` argument (a :class:`numpy.random.Generator`).

Examples
--------
>>> import numpy as np
>>> from scratchvae.figures import image_grid
>>> image_grid(np.zeros((10, 1, 28, 28)), ncols=4).shape   # 3 rows, 1 px gaps
(86, 115)
"""
from __future__ import annotations

import math
import os

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle
from matplotlib.ticker import MaxNLocator

from .analysis import (
    BATCH,
    as_images,
    attribute_blocks,
    attribute_vector,
    decode_all,
    encode_all,
    flatten_input,
    host,
    image_shape,
    interpolation_paths,
    latent_projection,
    manifold_lattice,
    posterior_means,
    reconstruct_all,
    take,
)
from .atomic import atomic_write, to_jsonable

__all__ = [
    "image_grid",
    "attribute_vector",
    "attribute_blocks",
    "posterior_means",
    "plot_attribute_vectors",
    "plot_samples",
    "plot_reconstructions",
    "plot_curves",
    "plot_latent",
    "plot_manifold",
    "plot_interpolation",
    "plot_pseudo_inputs",
    "save_all",
]

#: Resolution of every saved PNG.
DPI = 100



# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def image_grid(images, ncols, pad=1, pad_value=0.5):
    """Tile images into one 2-D array (or ``(h, w, 3)`` for RGB).

    Parameters
    ----------
    images : array_like, shape (N, C, H, W) or (N, H, W)
        Values in [0, 1] (clipped).  ``C`` must be 1 (grayscale) or 3 (RGB).
    ncols : int
        Images per row; the grid has ``ceil(N / ncols)`` rows, and unused
        cells of the last row are filled with ``pad_value``.
    pad : int, optional
        Pixels of ``pad_value`` between neighbouring tiles (none at the
        outer border).
    pad_value : float, optional
        Gray level of the gaps and empty cells.

    Returns
    -------
    numpy.ndarray
        Shape ``(rows * H + (rows - 1) * pad, ncols * W + (ncols - 1) * pad)``
        for grayscale, with a trailing axis of 3 for RGB.

    Raises
    ------
    ValueError
        For an empty batch, a bad ``ncols`` or ``pad``, or an unsupported
        channel count.
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W) or (N, H, W), got shape {images.shape}")
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    if c not in (1, 3):
        raise ValueError(f"image_grid supports 1 (gray) or 3 (RGB) channels, got {c}")
    ncols = int(ncols)
    pad = int(pad)
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    nrows = -(-n // ncols)
    out = np.full((c, nrows * h + (nrows - 1) * pad, ncols * w + (ncols - 1) * pad),
                  float(pad_value))
    images = np.clip(images, 0.0, 1.0)
    for k in range(n):
        r, q = divmod(k, ncols)
        y, x = r * (h + pad), q * (w + pad)
        out[:, y:y + h, x:x + w] = images[k]
    return out[0] if c == 1 else np.moveaxis(out, 0, -1)


def _save(fig, path, run_id=None):
    """Render ``fig`` to ``path`` atomically (temp file + :func:`os.replace`); ``run_id``, when
    given, goes into the PNG's text metadata as ``scratchvae-run-id``."""
    path = os.fspath(path)
    FigureCanvasAgg(fig)
    metadata = {"Software": "scratchvae"}
    if run_id is not None:
        metadata["scratchvae-run-id"] = str(run_id)
    with atomic_write(path) as fh:
        fig.savefig(fh, format="png", dpi=DPI, facecolor="white", metadata=metadata)
    return path


def _grid_figure(grid, title, max_inches=10.0, min_inches=3.0):
    """A figure sized to an image grid (about 3 screen pixels per image pixel)."""
    h, w = grid.shape[:2]
    scale = min(max_inches / max(h, w) * 100.0, 3.0)  # screen px per image px
    fw = max(w * scale / 100.0, min_inches)
    fh = max(h * scale / 100.0 + 0.5, 1.6)
    fig = Figure(figsize=(fw, fh), layout="constrained")
    ax = fig.add_subplot()
    _show(ax, grid)
    ax.set_title(title, fontsize=10)
    return fig, ax


def _show(ax, grid):
    if grid.ndim == 2:
        ax.imshow(grid, cmap="gray", vmin=0.0, vmax=1.0, interpolation="antialiased")
    else:
        ax.imshow(grid, interpolation="antialiased")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


# ---------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------

def plot_samples(model, path, rng, n=64, run_id=None):
    """Grid of images decoded from prior samples ``z ~ p(z)`` (N(0, I), or the VampPrior's mixture).

    Parameters
    ----------
    model : VAE or autoencoder
        Must provide ``sample(n, rng)``.  For a plain autoencoder the
        samples are whatever ``model.sample`` returns (decoding prior noise
        is not meaningful there, which the figure simply shows).
    path : str or os.PathLike
        Where to write the PNG.
    rng : numpy.random.Generator
        Passed to ``model.sample``; the only source of randomness.
    n : int, optional
        Number of samples (laid out in a near-square grid).

    Returns
    -------
    dict
        ``path``, ``n``, ``ncols``, ``mean_intensity`` (mean pixel value),
        ``pixel_std_across_samples`` (mean over pixels of the per-pixel
        standard deviation across samples: ~0 means every sample looks the
        same, i.e. posterior collapse or a broken decoder).
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    chunks, left = [], n
    while left > 0:
        m = min(left, BATCH)
        chunks.append(host(model, model.sample(m, rng)).reshape(m, -1))
        left -= m
    flat = np.concatenate(chunks).astype(np.float64)
    ncols = int(math.ceil(math.sqrt(n)))
    grid = image_grid(as_images(model, flat), ncols)
    if getattr(model, "code_head", None) is None:
        prior = "the VampPrior" if hasattr(getattr(model, "prior", None), "pseudo_inputs") else "N(0, I)"
        T = getattr(model, "levels", 1)
        title = (f"{n} samples decoded from z ~ {prior}  ({model.latent_dim}-D latent)" if T == 1 else
                 f"{n} samples drawn top-down: z{T} ~ {prior}, then z_l ~ p(z_l | z_(l+1))  ({T} levels of "
                 f"{model.latent_dim}-D)")
    else:   # an autoencoder has no prior: these are decoded random codes, not samples of a model
        title = (f"{n} random {model.latent_dim}-D codes from N(0, I), decoded by the autoencoder\n"
                 "(an autoencoder defines no prior over codes)")
    fig, _ = _grid_figure(grid, title, max_inches=7.0)
    _save(fig, path, run_id)
    return to_jsonable({
        "path": os.fspath(path),
        "n": n,
        "ncols": ncols,
        "mean_intensity": float(flat.mean()),
        "pixel_std_across_samples": float(flat.std(axis=0).mean()) if n > 1 else 0.0,
    })


def plot_reconstructions(model, x_test, path, n=16, run_id=None):
    """Test inputs (one row) above their reconstructions (next row).

    Parameters
    ----------
    model : VAE or autoencoder
        Must provide ``reconstruct(x)``.
    x_test : array_like, shape (N, D) or (N, C, H, W)
        Host or backend array in [0, 1]; ``n`` evenly spaced images are used
        (so a split ordered by class shows every class).
    path : str or os.PathLike
        Where to write the PNG.
    n : int, optional
        Number of images; rows of up to 16, alternating input and
        reconstruction (``n = 32`` gives 4 rows).

    Returns
    -------
    dict
        ``path``, ``n``, ``indices`` (the test images shown) and ``mse``
        (mean squared error per pixel of the shown reconstructions; the
        reconstruction loss in nats is the trainer's ``test_recon``).
    """
    x = flatten_input(model, x_test)
    n = min(int(n), int(x.shape[0]))
    if n < 1:
        raise ValueError("plot_reconstructions needs at least one test image")
    # evenly spaced over the split, not its first n: MNIST's test split is ordered by class
    idx = np.linspace(0, x.shape[0] - 1, n).round().astype(np.int64)
    shown = take(model, x, idx)
    inputs = host(model, shown).reshape(n, -1).astype(np.float64)
    recons = reconstruct_all(model, shown)
    per_row = min(16, n)
    nrows = -(-n // per_row)
    tiles, row_kind = [], []
    blank = np.full_like(inputs[:1], 0.5)
    for r in range(nrows):
        a, b = r * per_row, min((r + 1) * per_row, n)
        fill = [blank] * (per_row - (b - a))
        tiles += [inputs[a:b]] + fill + [recons[a:b]] + fill
        row_kind += ["input", "recon"]
    grid = image_grid(as_images(model, np.concatenate(tiles)), per_row)
    fig, ax = _grid_figure(grid, f"Test inputs (rows 'input') and reconstructions "
                                 f"(rows 'recon'), n = {n}", max_inches=9.0)
    h = image_shape(model)[1]
    ax.set_yticks([r * (h + 1) + (h - 1) / 2 for r in range(len(row_kind))], row_kind, fontsize=8)
    ax.tick_params(axis="y", length=0)
    _save(fig, path, run_id)
    return to_jsonable({
        "path": os.fspath(path),
        "n": n,
        "indices": idx,
        "mse": float(np.mean((recons - inputs) ** 2)),
    })


def _series(history, key):
    vals = []
    for h in history:
        v = h.get(key)
        vals.append(np.nan if v is None else float(v))
    vals = np.asarray(vals)
    return None if np.all(np.isnan(vals)) else vals


def plot_curves(history, path, run_id=None):
    """Training curves: negative ELBO, reconstruction and KL per epoch.

    Parameters
    ----------
    history : list of dict
        One dict per epoch with ``epoch``, ``train_loss``, ``test_loss``,
        ``test_recon``, ``test_kl`` and optionally ``train_recon`` and
        ``train_kl`` (all in nats per image).  Missing keys or ``None``
        values are skipped; a run without any KL (plain autoencoder) gets an
        annotated empty KL panel.
    path : str or os.PathLike
        Where to write the PNG.

    Returns
    -------
    dict
        ``path``, ``epochs`` (count), ``last`` (the last epoch's values),
        ``best_epoch`` and ``best_test_loss`` (the epoch with the lowest
        test loss, or ``None`` when there is no test loss).
    """
    history = list(history)
    if not history:
        raise ValueError("plot_curves needs at least one epoch in history")
    epochs = np.asarray([h.get("epoch", i + 1) for i, h in enumerate(history)], dtype=np.float64)
    kls = [h.get(k) for h in history for k in ("train_kl", "test_kl") if h.get(k) is not None]
    autoencoder = bool(kls) and all(v == 0 for v in kls)    # a plain autoencoder records KL = 0
    labels = history[-1].get("labels") or {}      # what each loss column is (recorded by the trainer)
    names = {"train_loss": labels.get("train_loss", "train"), "test_loss": labels.get("test_loss", "test")}
    same = names["train_loss"] == names["test_loss"]
    panels = [
        ("Reconstruction loss (no KL term)", "train_loss", "test_loss", "reconstruction NLL (nats)") if autoencoder
        else ("Negative ELBO" if same or not labels else "Training objective and test negative ELBO",
              "train_loss", "test_loss", "nats"),
        ("Reconstruction", "train_recon", "test_recon", "reconstruction NLL (nats)"),
        ("KL(q(z|x) || p(z))", None if autoencoder else "train_kl", None if autoencoder else "test_kl", "KL (nats)"),
    ]
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    ms = 5 if len(history) <= 30 else 3
    for ax, (title, tr_key, te_key, ylabel) in zip(axes, panels):
        drawn = False
        for key, label, style in ((tr_key, "train", "-o"), (te_key, "test", "--s")):
            vals = None if key is None else _series(history, key)
            if vals is None:
                continue
            ok = ~np.isnan(vals)
            if key in names and not same:      # the loss panel: each line says which bound it is
                label = f"{label}: {names[key]}"
            ax.plot(epochs[ok], vals[ok], style, ms=ms, label=label)
            drawn = True
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "none: a plain autoencoder has no KL term" if autoencoder else "not recorded",
                    ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if len(epochs) <= 12:
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(epochs) == 1:
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Training curves ({len(history)} epoch{'s' if len(history) != 1 else ''}, "
                 f"nats per image)", fontsize=11)
    _save(fig, path, run_id)
    last = {k: v for k, v in history[-1].items()
            if isinstance(v, (int, float, np.integer, np.floating)) or v is None}
    test = _series(history, "test_loss")
    if test is not None and not np.all(np.isnan(test)):
        i = int(np.nanargmin(test))
        best_epoch, best = epochs[i], float(test[i])
        best_epoch = int(best_epoch) if float(best_epoch).is_integer() else float(best_epoch)
    else:
        best_epoch, best = None, None
    return to_jsonable({
        "path": os.fspath(path),
        "epochs": len(history),
        "last": last,
        "best_epoch": best_epoch,
        "best_test_loss": best,
        "labels": names,
    })


def plot_latent(model, x_test, path, labels=None, run_id=None):
    """Scatter of the test-set posterior means, coloured by class.

    A circle centred at the origin (the prior's centre) marks the radius
    that holds 99% of the plotted points, next to the prior's own 99%
    circle (dashed, radius ``sqrt(-2 ln 0.01) = 3.03``).  For
    ``latent_dim > 2`` the means are projected onto their top two principal
    directions (PCA by SVD of the centred means).  The projection is linear
    through the origin, so the prior projects to a standard 2-D normal and
    the origin stays the prior's centre.  For ``latent_dim == 1`` the means
    are plotted against the label (or the index) with the 99% band
    ``|mu| <= radius99``.

    Parameters
    ----------
    model : VAE or autoencoder
    x_test : array_like, shape (N, D) or (N, C, H, W)
        Host or backend array; all ``N`` images are encoded (in batches).
    path : str or os.PathLike
    labels : array_like of int, shape (N,), optional
        Class of each image; colours the points with a per-class legend.

    Returns
    -------
    dict
        ``path``, ``projection`` (``"identity"`` or ``"pca"``),
        ``radius99`` (smallest radius around the origin holding at least 99%
        of the plotted points), ``prior_radius99``, ``n_points``,
        ``explained_variance`` (share of the means' variance in the plotted
        plane; 1.0 for identity), ``mean_norm``.
    """
    view = latent_projection(model, x_test, labels)
    xs, ys, labels, kind = view["xs"], view["ys"], view["labels"], view["kind"]
    n, k = view["mu"].shape
    radius99, prior_r, share = view["radius99"], view["prior_radius99"], view["explained_variance"]

    fig = Figure(figsize=(7.2, 6.2), layout="constrained")
    ax = fig.add_subplot()
    size = 6 if n <= 2000 else 3
    if labels is not None:
        classes = np.unique(labels)
        cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
        if len(classes) <= 20:
            for i, c in enumerate(classes):
                m = labels == c
                ax.scatter(xs[m], ys[m], s=size, alpha=0.6, color=cmap(i % cmap.N),
                           label=str(c), linewidths=0)
            ax.legend(title="class", fontsize=8, markerscale=2.5, loc="center left",
                      bbox_to_anchor=(1.01, 0.5), frameon=False)
        else:
            sc = ax.scatter(xs, ys, s=size, alpha=0.6, c=labels, cmap="viridis", linewidths=0)
            fig.colorbar(sc, ax=ax, label="class")
    else:
        ax.scatter(xs, ys, s=size, alpha=0.5, color="tab:blue", linewidths=0)

    if kind == "1d":
        for sign in (1, -1):
            ax.axhline(sign * radius99, color="black", lw=1.2)
            ax.axhline(sign * prior_r, color="gray", lw=1, ls="--")
        ax.set_xlabel("label" if labels is not None else "test index")
        ax.set_ylabel("mu")
        title = (f"Test-set means (1-D latent); solid: |mu| <= {radius99:.2f} holds 99%,"
                 f"\ndashed: prior 99% ({prior_r:.2f})")
    else:
        ax.add_patch(Circle((0, 0), radius99, fill=False, color="black", lw=1.4))
        ax.add_patch(Circle((0, 0), prior_r, fill=False, color="gray", lw=1, ls="--"))
        ax.plot([0], [0], "+", color="black", ms=10)
        lim = 1.05 * max(radius99, prior_r, float(np.abs(np.concatenate([xs, ys])).max()) if n else 0.0)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        if kind == "pca":
            ax.set_xlabel("PC 1")
            ax.set_ylabel("PC 2")
            what = f"PCA projection of {k}-D means ({100 * share:.0f}% of their variance), n = {n}"
        else:
            ax.set_xlabel("z[0]")
            ax.set_ylabel("z[1]")
            what = f"Test-set means of the 2-D latent, n = {n}"
        title = (f"{what}\nsolid circle at the origin (prior centre) holds 99%: r = {radius99:.2f};"
                 f" dashed: prior 99% (r = {prior_r:.2f})")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.2)
    _save(fig, path, run_id)
    return to_jsonable({
        "path": os.fspath(path),
        "projection": "pca" if kind == "pca" else "identity",
        "radius99": radius99,
        "prior_radius99": prior_r,
        "n_points": n,
        "explained_variance": share,
        "mean_norm": float(view["norms"].mean()),
    })


def plot_manifold(model, path, x_test=None, n=20, run_id=None):
    """Decode a lattice over a latent plane: the learned "manifold".

    The lattice points sit at the standard normal's quantiles
    ``Phi^-1(linspace(0.05, 0.95, n))`` on each axis (so they are spread
    like the prior's mass).  For ``latent_dim == 2`` the plane is the whole
    latent space.  For more dimensions it is the plane of the two most
    *active* dimensions (activity = variance over ``x_test`` of ``mu_j``,
    Burda et al. 2016), with every other dimension fixed at 0, the prior
    mean.  For ``latent_dim == 1`` a single row is decoded.

    Parameters
    ----------
    model : VAE or autoencoder
    path : str or os.PathLike
    x_test : array_like, shape (N, D) or (N, C, H, W), optional
        Needed when ``latent_dim > 2`` (to measure activity).
    n : int, optional
        Lattice points per axis.

    Returns
    -------
    dict
        ``path``, ``dims`` (latent indices on the horizontal and vertical
        axis, most active first), ``activity`` (per-dimension variance of
        ``mu`` or ``None`` when ``x_test`` was not given), ``quantiles`` (the
        lattice coordinates) and ``n``.
    """
    k = int(model.latent_dim)
    lattice = manifold_lattice(model, x_test, n)
    n, dims, q, activity, prior, radius = (int(n), lattice["dims"], lattice["quantiles"], lattice["activity"],
                                           lattice["prior"], lattice["radius"])
    grid = image_grid(as_images(model, lattice["images"]), n)

    if not prior:
        title = (f"Decoded lattice inside the circle holding 99% of the test codes (r = {radius:.2f})"
                 + ("" if k <= 2 else f"\nover dims {dims[0]} (x) and {dims[1]} (y), the two most active of {k}; "
                    "others at 0"))
    elif k <= 2:
        title = f"Decoded lattice over the {k}-D latent space (standard-normal quantiles 5%..95%)"
    else:
        title = (f"Decoded lattice over latent dims {dims[0]} (x) and {dims[1]} (y), the two most "
                 f"active of {k}\n(activity = Var[mu_j] over the test set: "
                 f"{activity[dims[0]]:.3g}, {activity[dims[1]]:.3g}); other dims fixed at 0")
    fig, ax = _grid_figure(grid, title, max_inches=8.5, min_inches=5.0)
    h, w = image_shape(model)[1:]
    ticks = sorted({0, n - 1} | ({(n - 1) // 2} if n % 2 else set()))
    ax.set_xticks([t * (w + 1) + (w - 1) / 2 for t in ticks], [f"{q[t]:.2f}" for t in ticks],
                  fontsize=8)
    ax.set_xlabel(f"z[{dims[0]}]")
    if k >= 2:
        ax.set_yticks([t * (h + 1) + (h - 1) / 2 for t in ticks],
                      [f"{q[n - 1 - t]:.2f}" for t in ticks], fontsize=8)
        ax.set_ylabel(f"z[{dims[1]}]")
    _save(fig, path, run_id)
    return to_jsonable({
        "path": os.fspath(path),
        "dims": list(dims),
        "activity": None if activity is None else activity,
        "quantiles": q,
        "n": n,
    })


def plot_interpolation(model, x_test, path, rng, labels=None, n_pairs=6, steps=10,
                       classes=None, n_attribute=3, run_id=None):
    """Decoded images along straight lines in latent space.

    Top block: one row per random pair of test images ``(x_a, x_b)``, the
    real ``x_a`` at the left, ``decode(mu_a + t (mu_b - mu_a))`` for ``steps``
    values of ``t`` in [0, 1], and the real ``x_b`` at the right.

    Bottom block (only with ``labels``): attribute arithmetic.  With the
    class-mean encodings ``m_a`` and ``m_b``, ``decode(mu + t (m_a - m_b))``
    for ``n_attribute`` test images of class ``b`` (real input at the left),
    ``t`` in [0, 1], and ``decode(m_a)`` (where the rows head) at the right;
    the classes are named in the title.

    Parameters
    ----------
    model : VAE or autoencoder
    x_test : array_like, shape (N, D) or (N, C, H, W)
    path : str or os.PathLike
    rng : numpy.random.Generator
        Picks the pairs, the classes (when ``classes`` is None) and the
        class-``b`` images.
    labels : array_like of int, shape (N,), optional
    n_pairs : int, optional
    steps : int, optional
        Decoded images per row (including both endpoints ``t = 0, 1``).
    classes : tuple (a, b), optional
        Classes for the attribute vector ``m_a - m_b``; drawn from the
        labels present when None.
    n_attribute : int, optional
        Rows in the attribute-arithmetic block.

    Returns
    -------
    dict
        ``path``, ``n_pairs``, ``steps``, ``pairs`` (test indices),
        ``endpoint_mse`` (mean squared difference between each pair's
        decoded endpoints, a measure of how far apart the rows travel), and
        ``attribute``: ``None`` or ``{"from_class", "to_class", "indices",
        "vector_norm"}``.
    """
    paths = interpolation_paths(model, x_test, rng, labels, n_pairs, steps, classes, n_attribute)
    n_pairs, steps, rows = paths["rows"].shape[0], paths["steps"], paths["rows"]
    top = image_grid(as_images(model, rows.reshape(-1, rows.shape[-1])), steps + 2)
    attribute, bottom, bottom_title = paths["attribute"], None, None
    if attribute is not None:
        rows_a = attribute.pop("rows")
        bottom = image_grid(as_images(model, rows_a.reshape(-1, rows_a.shape[-1])), steps + 2)
        a_cls, b_cls = to_jsonable(attribute["to_class"]), to_jsonable(attribute["from_class"])
        bottom_title = (f"Attribute arithmetic: class-{b_cls} input (left), then "
                        f"decode(mu + t (mean mu[{a_cls}] - mean mu[{b_cls}])), t = 0..1 | "
                        f"decode(mean mu[{a_cls}])")

    h_top = top.shape[0]
    h_bot = 0 if bottom is None else bottom.shape[0]
    width_px = top.shape[1]
    scale = min(9.0 / width_px * 100.0, 3.0)
    fw = max(width_px * scale / 100.0, 5.0)
    fh = (h_top + h_bot) * scale / 100.0 + (0.6 if bottom is None else 1.1)
    fig = Figure(figsize=(fw, fh), layout="constrained")
    if bottom is None:
        ax1 = fig.add_subplot()
    else:
        ax1, ax2 = fig.subplots(2, 1, height_ratios=[h_top, h_bot])
        _show(ax2, bottom)
        ax2.set_title(bottom_title, fontsize=9)
    _show(ax1, top)
    ax1.set_title(f"Interpolation between test encodings: x_a | decode(mu_a + t (mu_b - mu_a)), "
                  f"{steps} steps | x_b", fontsize=9)
    _save(fig, path, run_id)
    return to_jsonable({
        "path": os.fspath(path),
        "n_pairs": n_pairs,
        "steps": steps,
        "pairs": paths["pairs"],
        "endpoint_mse": paths["endpoint_mse"],
        "attribute": attribute,
    })


def plot_posterior(history, path, run_id=None, epoch=None):
    """Posterior collapse made visible: the KL of each latent dimension and the active units.

    Left: the test KL per dimension of epoch ``epoch`` (the epoch of the
    parameters the other figures use, e.g. the best one; default the last),
    a bar per dimension, dark where the dimension is active
    (``Var_x(E_q[z_j]) > 0.01``, Burda et al.).
    Right: the number of active units per epoch.

    Parameters
    ----------
    history : list of dict
        Per-epoch records with ``kl_per_dim``, ``latent_activity`` and
        ``active_units`` (as the trainer writes them for a VAE).
    path : str or os.PathLike

    Returns
    -------
    dict
        ``path``, ``active_units`` (last epoch), ``latent_dim``, ``collapsed``
        (the indices of the inactive dimensions).
    """
    levels = [h for h in history if h.get("latent_activity") is not None and isinstance(h["active_units"], list)]
    if levels:
        return _plot_posterior_levels(levels, path, run_id, _record_of(levels, epoch))
    rows = [h for h in history if h.get("kl_per_dim") is not None]
    if not rows:
        raise ValueError("plot_posterior needs epochs with kl_per_dim (a VAE's history)")
    last = _record_of(rows, epoch)
    kl = np.asarray(last["kl_per_dim"], dtype=np.float64)
    active = np.asarray(last["latent_activity"], dtype=np.float64) > 0.01
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[2, 1])
    dims = np.arange(kl.size)
    ax1.bar(dims[active], kl[active], color="#1f4e79", label="active")
    if not active.all():
        ax1.bar(dims[~active], kl[~active], color="#c0c0c0", label="inactive (collapsed)")
    ax1.set_xlabel("latent dimension")
    ax1.set_ylabel("test KL (nats)")
    ax1.set_title(f"KL per dimension, epoch {last.get('epoch', len(rows))}: {int(active.sum())} of {kl.size} "
                  "active (Var_x E[z_j] > 0.01)", fontsize=10)
    ax1.legend(fontsize=8)
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(rows)]
    ax2.plot(epochs, [h["active_units"] for h in rows], "-o", ms=4)
    ax2.axvline(last.get("epoch", len(rows)), color="gray", lw=0.8, ls=":")   # the epoch the bars show
    ax2.set_ylim(0, kl.size + 0.5)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("active units")
    ax2.set_title("Active units per epoch", fontsize=10)
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.grid(alpha=0.3)
    _save(fig, path, run_id)
    return to_jsonable({"path": os.fspath(path), "active_units": int(active.sum()), "latent_dim": int(kl.size),
                        "collapsed": np.flatnonzero(~active)})


def _record_of(rows, epoch):
    """The record of ``epoch`` among ``rows`` (the last one when ``epoch`` is None or not recorded)."""
    return next((h for h in rows if epoch is not None and h.get("epoch") == epoch), rows[-1])


def _plot_posterior_levels(rows, path, run_id, last):
    """posterior.png of a hierarchy: per level (bottom first) Burda et al.'s activity Var_x E[z_j] of every
    dimension at the epoch of record ``last``, and the active units per level per epoch. The collapse of the
    upper level is the known failure of hierarchical VAEs: its bars then sit under the 0.01 line."""
    activity = [np.asarray(a, dtype=np.float64) for a in last["latent_activity"]]
    fig = Figure(figsize=(11, 2.6 * len(activity)), layout="constrained")
    axes = fig.subplots(len(activity), 2, width_ratios=[2, 1], squeeze=False)
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(rows)]
    for level, (act, (ax1, ax2)) in enumerate(zip(activity, axes), 1):
        dims, active = np.arange(act.size), act > 0.01
        ax1.bar(dims[active], act[active], color="#1f4e79", label="active")
        if not active.all():
            ax1.bar(dims[~active], np.maximum(act[~active], 1e-6), color="#c0c0c0", label="inactive (collapsed)")
        ax1.axhline(0.01, color="gray", lw=0.8, ls="--")
        ax1.set_yscale("log")
        ax1.set_ylabel("Var_x E[z_j]")
        ax1.set_title(f"level {level} (z{level}), epoch {last.get('epoch', len(rows))}: {int(active.sum())} of "
                      f"{act.size} active", fontsize=10)
        ax1.legend(fontsize=8)
        ax2.plot(epochs, [h["active_units"][level - 1] for h in rows], "-o", ms=3)
        ax2.axvline(last.get("epoch", len(rows)), color="gray", lw=0.8, ls=":")   # the epoch the bars show
        ax2.set_ylim(0, act.size + 0.5)
        ax2.set_title(f"active units of z{level} per epoch", fontsize=10)
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.grid(alpha=0.3)
    axes[-1][0].set_xlabel("latent dimension")
    axes[-1][1].set_xlabel("epoch")
    _save(fig, path, run_id)
    return to_jsonable({"path": os.fspath(path), "active_units": [int((a > 0.01).sum()) for a in activity],
                        "latent_dim": int(activity[0].size),
                        "collapsed": [np.flatnonzero(a <= 0.01) for a in activity]})


def plot_denoising(model, x_clean, x_noisy, path, n=12, run_id=None):
    """A denoising model at work: corrupted inputs (top row), the clean images, and the
    reconstructions of the corrupted inputs (bottom row).

    Parameters
    ----------
    model : VAE or autoencoder
    x_clean, x_noisy : array_like, shape (N, D)
        The clean test images and the corrupted copies the model is given.
    n : int
        Images shown, evenly spaced over the split.

    Returns
    -------
    dict
        ``path``, ``n``, ``mse_noisy`` and ``mse_denoised`` (per pixel, against the clean images).
    """
    clean = flatten_input(model, x_clean)
    noisy = flatten_input(model, x_noisy)
    if clean.shape != noisy.shape:
        raise ValueError(f"plot_denoising: clean {tuple(clean.shape)} and noisy {tuple(noisy.shape)} differ")
    n = min(int(n), int(clean.shape[0]))
    idx = np.linspace(0, clean.shape[0] - 1, n).round().astype(np.int64)
    c = host(model, take(model, clean, idx)).reshape(n, -1).astype(np.float64)
    z = host(model, take(model, noisy, idx)).reshape(n, -1).astype(np.float64)
    r = reconstruct_all(model, take(model, noisy, idx))
    grid = image_grid(as_images(model, np.concatenate([z, c, r])), n)
    fig, ax = _grid_figure(grid, "Denoising: corrupted input (top), clean image, reconstruction of the corrupted input",
                           max_inches=9.0)
    h = image_shape(model)[1]
    ax.set_yticks([k * (h + 1) + (h - 1) / 2 for k in range(3)], ["input", "clean", "recon"], fontsize=8)
    ax.tick_params(axis="y", length=0)
    _save(fig, path, run_id)
    return to_jsonable({"path": os.fspath(path), "n": n, "mse_noisy": float(np.mean((z - c) ** 2)),
                        "mse_denoised": float(np.mean((r - c) ** 2))})


def plot_attribute_vectors(model, blocks, multiples, path, run_id=None):
    """Test images moved along attribute vectors: one block of rows per attribute (or combination).

    Parameters
    ----------
    model : VAE or autoencoder
    blocks : list of (title, x, vector)
        ``x`` (n, D) the test images of the block's rows (their posterior
        means are the starting codes), ``vector`` (L,) the direction added.
    multiples : sequence of float
        The columns: ``decode(mu + m * vector)`` for each ``m`` (0 is the
        plain reconstruction).

    Returns
    -------
    dict
        ``path``, the blocks' titles, rows and vector norms.
    """
    multiples = np.asarray(multiples, dtype=np.float64)
    rows, titles, out = [], [], []
    for title, x, vector in blocks:
        mu = encode_all(model, flatten_input(model, x))[0]                       # (n, L)
        z = (mu[:, None, :] + multiples[None, :, None] * np.asarray(vector)[None, None, :]).reshape(-1, mu.shape[1])
        rows.append(decode_all(model, z).reshape(mu.shape[0] * multiples.size, -1))
        titles.append(f"{title} ({mu.shape[0]} rows)")
        out.append({"title": title, "rows": int(mu.shape[0]), "vector_norm": float(np.linalg.norm(vector))})
    grid = image_grid(as_images(model, np.concatenate(rows)), multiples.size)
    fig, ax = _grid_figure(grid, "; ".join(titles) + "\ncolumns: code + m x vector, m = "
                           + ", ".join(f"{m:g}" for m in multiples), max_inches=8.0)
    _save(fig, path, run_id)
    return to_jsonable({"path": os.fspath(path), "multiples": multiples.tolist(), "blocks": out})


def plot_pseudo_inputs(model, path, n=100, run_id=None):
    """The VampPrior's learned pseudo-inputs ``u_k = clip(pseudo_k, 0, 1)`` as images (the first ``n``).

    Returns ``path``, ``n`` (shown), ``K`` (all) and ``mean_intensity``.
    """
    u = host(model, model.prior.pseudo_inputs()).astype(np.float64)      # (K, D)
    n = min(int(n), u.shape[0])
    grid = image_grid(as_images(model, u[:n]), int(math.ceil(math.sqrt(n))))
    fig, _ = _grid_figure(grid, f"VampPrior pseudo-inputs (the first {n} of K = {u.shape[0]}); the prior is "
                                "the mixture of q(z | u_k)", max_inches=7.0)
    _save(fig, path, run_id)
    return to_jsonable({"path": os.fspath(path), "n": n, "K": int(u.shape[0]), "mean_intensity": float(u.mean())})


def save_all(model, out_dir, x_test, rng, labels=None, history=None, run_id=None, noisy=None, epoch=None):
    """Write every figure into ``out_dir``.

    Files: ``samples.png``, ``reconstructions.png``, ``pseudo_inputs.png`` (a VampPrior's), ``curves.png`` (only
    when ``history`` is given), ``posterior.png`` (a VAE's history),
    ``latent.png``, ``manifold.png`` and ``interpolation.png``.

    Parameters
    ----------
    model : VAE or autoencoder
    out_dir : str or os.PathLike
        Created if missing.
    x_test : array_like, shape (N, D) or (N, C, H, W)
    rng : numpy.random.Generator
        Used by the samples and the interpolation (in that order).
    labels : array_like of int, shape (N,), optional
    history : list of dict, optional
        Per-epoch metrics for :func:`plot_curves`.
    run_id : str, optional
        The run's identity, written into every PNG's text metadata
        (``scratchvae-run-id``); every ``plot_*`` function takes it too.
    noisy : array_like, shape of ``x_test``, optional
        Corrupted copies of ``x_test`` (a denoising model): adds ``denoising.png``.
    epoch : int, optional
        The epoch whose parameters ``model`` holds (the best one of a ``--keep-best`` run):
        ``posterior.png`` shows that epoch's record; default the last.

    Returns
    -------
    dict
        The dicts returned by each function, keyed by figure name
        (``"samples"``, ``"reconstructions"``, ``"curves"``, ``"latent"``,
        ``"manifold"``, ``"interpolation"``); JSON-serialisable.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    p = lambda name: os.path.join(out_dir, name + ".png")  # noqa: E731
    results = {"samples": plot_samples(model, p("samples"), rng, run_id=run_id),
               "reconstructions": plot_reconstructions(model, x_test, p("reconstructions"), run_id=run_id)}
    if history:
        results["curves"] = plot_curves(history, p("curves"), run_id=run_id)
        if any(h.get("kl_per_dim") is not None or isinstance(h.get("active_units"), list) for h in history):
            results["posterior"] = plot_posterior(history, p("posterior"), run_id=run_id, epoch=epoch)
    results["latent"] = plot_latent(model, x_test, p("latent"), labels=labels, run_id=run_id)
    results["manifold"] = plot_manifold(model, p("manifold"), x_test=x_test, run_id=run_id)
    if len(x_test) >= 2:
        results["interpolation"] = plot_interpolation(model, x_test, p("interpolation"), rng, run_id=run_id,
                                                      labels=labels)
    else:   # a small folder of images can have a one-image test split
        results["interpolation"] = {"skipped": f"needs two test images; the test split has {len(x_test)}"}
    if noisy is not None:
        results["denoising"] = plot_denoising(model, x_test, noisy, p("denoising"), run_id=run_id)
    if hasattr(getattr(model, "prior", None), "pseudo_inputs"):
        results["pseudo_inputs"] = plot_pseudo_inputs(model, p("pseudo_inputs"), run_id=run_id)
    return results
