"""What the figures show, computed apart from how they are drawn (NumPy only, no matplotlib).

Encoding, decoding and reconstructing a whole split in batches on the model's
backend (results on the host), the latent-space views (the PCA projection
and the 99% radius of :func:`latent_projection`, the lattice of
:func:`manifold_lattice`, the interpolation paths of
:func:`interpolation_paths`), class and attribute vectors. Every function
returns host NumPy arrays; :mod:`scratchvae.figures` only draws them.
"""
from __future__ import annotations

import math
import statistics

import numpy as np

__all__ = ["BATCH", "PRIOR_R99_1D", "PRIOR_R99_2D", "image_shape", "flat_dim", "as_images", "flatten_input", "take",
           "host", "encode_all", "decode_all", "reconstruct_all", "check_labels", "radius_holding",
           "pca_directions", "normal_quantiles", "latent_projection", "manifold_lattice", "interpolation_paths",
           "posterior_means", "attribute_vector", "attribute_blocks", "prior_component_usage"]

#: Rows sent to the model per call (bounds host and device memory).
BATCH = 500

# Radius of the circle holding 99% of a standard normal in 2-D (chi with 2
# degrees of freedom: sqrt(-2 ln 0.01)) and of the interval in 1-D.
PRIOR_R99_2D = math.sqrt(-2.0 * math.log(0.01))
PRIOR_R99_1D = statistics.NormalDist().inv_cdf(0.995)


def image_shape(model):
    """``model.input_shape`` as ``(C, H, W)``.

    ``(H, W)`` means one channel; a flat ``(D,)`` (an MLP built without an
    image shape) is shown as a square grayscale ``(1, s, s)`` when
    ``D = s * s``.
    """
    shape = tuple(int(s) for s in model.input_shape)
    if len(shape) == 1:
        side = math.isqrt(shape[0])
        if side * side != shape[0]:
            raise ValueError(f"cannot draw flat inputs of {shape[0]} values as images: build the "
                             f"model with input_shape=(C, H, W)")
        shape = (1, side, side)
    if len(shape) == 2:
        shape = (1,) + shape
    if len(shape) != 3:
        raise ValueError(f"model.input_shape must be (C, H, W), got {model.input_shape}")
    return shape


def flat_dim(model):
    return int(np.prod(image_shape(model)))


def as_images(model, flat):
    """Host array ``(N, D)`` -> ``(N, C, H, W)``."""
    flat = np.asarray(flat)
    return flat.reshape((flat.shape[0],) + image_shape(model))


def flatten_input(model, x):
    """Reshape a host or backend array of ``N`` images to ``(N, D)``."""
    d = flat_dim(model)
    n = int(x.shape[0])
    if int(np.prod(x.shape[1:])) != d:
        raise ValueError(f"x has shape {tuple(x.shape)}, which does not match the model's "
                         f"input_shape {tuple(model.input_shape)} (D = {d})")
    return x.reshape(n, d)


def take(model, x, idx):
    """``x[idx]`` for a host or backend ``x`` and host integer ``idx``."""
    idx = np.asarray(idx, dtype=np.int64)
    if isinstance(x, np.ndarray):
        return x[idx]
    return x[model.backend.asarray(idx)]


def host(model, a):
    return np.asarray(model.backend.asnumpy(a))


def encode_all(model, x, batch=BATCH):
    """Encode ``(N, D)`` ``x`` in batches; host ``mu`` and ``log_sigma`` (or None)."""
    mus, logs = [], []
    has_sigma = True
    for s in range(0, int(x.shape[0]), batch):
        xb = model.backend.asarray(x[s:s + batch], dtype=model.dtype)
        mu, log_sigma = model.encode(xb)
        mus.append(host(model, mu).reshape(xb.shape[0], -1))
        if log_sigma is None:
            has_sigma = False
        elif has_sigma:
            logs.append(host(model, log_sigma).reshape(xb.shape[0], -1))
    if not mus:
        raise ValueError("cannot encode an empty batch")
    mu = np.concatenate(mus).astype(np.float64)
    log_sigma = np.concatenate(logs).astype(np.float64) if has_sigma else None
    return mu, log_sigma


def decode_all(model, z, batch=BATCH):
    """Decode host latents ``(N, K)`` in batches; host images ``(N, D)``."""
    z = np.asarray(z)
    out = []
    for s in range(0, z.shape[0], batch):
        zb = model.backend.asarray(z[s:s + batch], dtype=model.dtype)
        out.append(host(model, model.decode(zb)).reshape(zb.shape[0], -1))
    return np.concatenate(out).astype(np.float64)


def reconstruct_all(model, x, batch=BATCH):
    out = []
    for s in range(0, int(x.shape[0]), batch):
        xb = model.backend.asarray(x[s:s + batch], dtype=model.dtype)
        out.append(host(model, model.reconstruct(xb)).reshape(xb.shape[0], -1))
    return np.concatenate(out).astype(np.float64)


def check_labels(model, labels, n):
    if labels is None:
        return None
    labels = np.asarray(model.backend.asnumpy(labels)).reshape(-1)
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} entries but x_test has {n} images")
    return labels


def radius_holding(norms, fraction=0.99):
    """Smallest radius ``r`` among the norms with ``mean(norms <= r) >= fraction``."""
    s = np.sort(np.asarray(norms, dtype=np.float64))
    k = max(int(math.ceil(fraction * s.size - 1e-9)), 1)
    return float(s[k - 1])


def pca_directions(mu, k=2):
    """Top-``k`` principal directions (rows) of ``mu`` and their variance share."""
    centred = mu - mu.mean(axis=0)
    # fewer points than directions (a one-image test split): the full basis completes them (zero variance)
    _, s, vt = np.linalg.svd(centred, full_matrices=centred.shape[0] < k)
    var = s ** 2
    total = var.sum()
    share = float(var[:k].sum() / total) if total > 0 else 1.0
    # fix the sign so the output is deterministic: largest |entry| positive
    signs = np.sign(vt[np.arange(k), np.argmax(np.abs(vt[:k]), axis=1)])
    signs[signs == 0] = 1.0
    return vt[:k] * signs[:, None], share


def normal_quantiles(n, lo=0.05, hi=0.95):
    inv = statistics.NormalDist().inv_cdf
    return np.asarray([inv(p) for p in np.linspace(lo, hi, n)])


def posterior_means(model, x) -> np.ndarray:
    """The posterior means (a plain autoencoder's codes) of the images ``x`` (N, D), host (N, L)."""
    return encode_all(model, flatten_input(model, x))[0]


def prior_component_usage(model, x, rng, batch=BATCH) -> dict | None:
    """How the images ``x`` (N, D) use a VampPrior's K components; None for the standard normal prior.

    For each image one z ~ q(z_T | x) (the top level), and its responsibilities p(k | z) over the
    components q(z_T | u_k). ``n_k = sum_n p(k | z_n)`` is the number of images component k explains;
    ``effective_components`` is exp of the entropy of n_k / N (K when every component explains as many
    images, 1 when one explains them all). ``pseudo_pixels_at_0`` / ``_at_1``: the share of the
    pseudo-inputs' pixels clamped to 0 or 1, where the clamp passes them no gradient.
    """
    prior = getattr(model, "prior", None)
    if not hasattr(prior, "pseudo_inputs"):
        return None
    comps = model.prior_components()                                 # (mu_k, log_sigma_k), (K, L) each
    K = int(comps[0].shape[0])
    n_k, most, max_r = np.zeros(K), np.zeros(K, dtype=np.int64), []
    for s in range(0, int(x.shape[0]), batch):
        xb = model.backend.asarray(x[s:s + batch], dtype=model.dtype)
        mu, log_sigma = model.encode(xb)                                  # (B, L) each
        eps = model.backend.asarray(rng.standard_normal(mu.shape, dtype=model.dtype))
        r = host(model, prior.responsibilities(mu + model.xp.exp(log_sigma) * eps, comps)).astype(np.float64)
        n_k += r.sum(axis=0)
        most += np.bincount(r.argmax(axis=1), minlength=K)
        max_r.append(r.max(axis=1))
    if not max_r:
        raise ValueError("cannot measure the prior's components on an empty split")
    share = n_k / n_k.sum()
    share = share[share > 0]
    pseudo = host(model, prior.params["pseudo"])
    return {"components": K, "images": int(x.shape[0]),
            "effective_components": float(np.exp(-(share * np.log(share)).sum())),
            "components_explaining_one_image_or_more": int((n_k >= 1).sum()),
            "components_most_responsible_for_some_image": int((most > 0).sum()),
            "mean_largest_responsibility": float(np.concatenate(max_r).mean()),
            "pseudo_pixels_at_0": float((pseudo <= 0).mean()), "pseudo_pixels_at_1": float((pseudo >= 1).mean())}


def attribute_vector(mu, has) -> np.ndarray:
    """The latent direction of an attribute: ``mean mu[has] - mean mu[~has]``, (L,).

    ``mu`` (N, L) posterior means (host), ``has`` (N,) bool: the images
    with the attribute (or of the target class).
    """
    mu, has = np.asarray(mu, dtype=np.float64), np.asarray(has, dtype=bool)
    if mu.ndim != 2 or has.shape != (mu.shape[0],):
        raise ValueError(f"attribute_vector: mu {mu.shape} and has {has.shape} do not match")
    if not has.any() or has.all():
        raise ValueError(f"attribute_vector needs images with and without the attribute; {int(has.sum())} of "
                         f"{has.size} have it")
    return mu[has].mean(axis=0) - mu[~has].mean(axis=0)


def attribute_blocks(model, x_train, attrs_train, x_test, attrs_test, names, chosen, rows=6) -> list:
    """The blocks of :func:`plot_attribute_vectors` for attributes ``chosen`` (names from ``names``).

    ``attrs_train`` (N, A) and ``attrs_test`` (N_test, A) hold 1 where an
    image has an attribute. Each attribute's vector comes from the training
    images' posterior means; its rows are test images without it; with
    several attributes a last block adds all their vectors to images
    lacking all of them.
    """
    mu = posterior_means(model, x_train)
    blocks, vectors, lacking_all = [], [], np.ones(x_test.shape[0], dtype=bool)
    for name in chosen:
        j = list(names).index(name)
        vectors.append(attribute_vector(mu, np.asarray(attrs_train)[:, j] == 1))
        lacking = np.asarray(attrs_test)[:, j] != 1
        lacking_all &= lacking
        blocks.append((f"+ {name}", x_test[np.flatnonzero(lacking)[:rows]], vectors[-1]))
    if len(vectors) > 1:
        pick = np.flatnonzero(lacking_all)[:rows]
        blocks.append((" + ".join(chosen), x_test[pick if pick.size else np.arange(min(rows, x_test.shape[0]))],
                       np.sum(vectors, axis=0)))
    return blocks


# -- the views of the latent space -------------------------------------------------------------------

def latent_projection(model, x_test, labels=None) -> dict:
    """The test-set posterior means as :func:`scratchvae.figures.plot_latent` shows them.

    Returns a dict: ``mu`` (N, L); ``kind`` ``"1d"`` (plotted against the
    label or index), ``"2d"`` (the latent plane itself) or ``"pca"`` (the top
    two principal directions of the means, a linear projection through the
    origin, so the prior projects to a standard 2-D normal); ``xs``, ``ys``
    (N,) the plotted coordinates; ``norms`` (N,) each point's distance from
    the prior's centre; ``radius99`` (the smallest radius holding 99% of
    them), ``prior_radius99``, ``explained_variance`` (the plane's share of
    the means' variance; 1 without projection) and ``labels``.
    """
    mu, _ = encode_all(model, flatten_input(model, x_test))
    n, k = mu.shape
    labels = check_labels(model, labels, n)
    if k == 1:
        xs = labels.astype(np.float64) if labels is not None else np.arange(n, dtype=np.float64)
        ys, share, kind = mu[:, 0], 1.0, "1d"
        norms, prior_r = np.abs(ys), PRIOR_R99_1D
    else:
        if k == 2:
            pts, share, kind = mu, 1.0, "2d"
        else:
            directions, share = pca_directions(mu)
            pts, kind = mu @ directions.T, "pca"
        xs, ys = pts[:, 0], pts[:, 1]
        norms, prior_r = np.hypot(xs, ys), PRIOR_R99_2D
    return {"mu": mu, "kind": kind, "xs": xs, "ys": ys, "norms": norms, "radius99": radius_holding(norms, 0.99),
            "prior_radius99": prior_r, "explained_variance": share, "labels": labels}


def manifold_lattice(model, x_test=None, n=20) -> dict:
    """The latent points :func:`scratchvae.figures.plot_manifold` decodes, and the images.

    The lattice sits at the standard normal's quantiles
    ``Phi^-1(linspace(0.05, 0.95, n))`` on each axis; above 2-D, over the two
    most active dimensions (activity = variance of ``mu_j`` over ``x_test``),
    the others at 0. A plain autoencoder has no prior: its lattice spans the
    square inside the circle holding 99% of its test codes.

    Returns ``dims``, ``activity`` ((L,) or None), ``prior`` (bool),
    ``radius`` (the autoencoder's circle, else None), ``quantiles`` (n,),
    ``z`` (n*n, L) (n, L for a 1-D latent; top row = largest value of the
    second dimension) and ``images`` (len(z), D).
    """
    k, n = int(model.latent_dim), int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    activity, mu, prior, radius = None, None, True, None
    if x_test is not None:
        mu, log_sigma = encode_all(model, flatten_input(model, x_test))
        activity, prior = mu.var(axis=0), log_sigma is not None   # a plain autoencoder has no prior
    if k <= 2:
        dims = tuple(range(k))
    else:
        if activity is None:
            raise ValueError(f"plot_manifold needs x_test for a {k}-D latent (to pick the two "
                             f"most active dimensions)")
        order = np.argsort(-activity, kind="stable")
        dims = (int(order[0]), int(order[1]))
    q = normal_quantiles(n)
    if not prior:   # no prior to take quantiles of: span the square inside the codes' 99% circle
        radius = radius_holding(np.linalg.norm(mu[:, list(dims)], axis=1))
        q = np.linspace(-radius, radius, n) / math.sqrt(2) if k > 1 else np.linspace(-radius, radius, n)
    if k == 1:
        z = q[:, None].copy()
    else:
        z = np.zeros((n * n, k))
        rows, cols = np.divmod(np.arange(n * n), n)
        z[:, dims[0]] = q[cols]
        z[:, dims[1]] = q[n - 1 - rows]
    return {"dims": dims, "activity": activity, "prior": prior, "radius": radius, "quantiles": q, "z": z,
            "images": decode_all(model, z)}


def interpolation_paths(model, x_test, rng, labels=None, n_pairs=6, steps=10, classes=None,
                        n_attribute=3) -> dict:
    """The rows of :func:`scratchvae.figures.plot_interpolation`, decoded.

    ``pairs``: ``n_pairs`` random pairs of test images; each row is ``x_a``,
    ``decode(mu_a + t (mu_b - mu_a))`` for ``steps`` values of t in [0, 1],
    then ``x_b``. With ``labels``: ``attribute`` rows, ``x`` of class b,
    ``decode(mu + t (m_a - m_b))`` with the class-mean encodings, then
    ``decode(m_a)``. Returns ``rows`` ((n_pairs, steps + 2, D)), ``pairs``,
    ``endpoint_mse``, and ``attribute`` (None, or a dict with ``rows``,
    ``from_class``, ``to_class``, ``indices``, ``vector_norm``).
    """
    x = flatten_input(model, x_test)
    n, steps = int(x.shape[0]), int(steps)
    if n < 2:
        raise ValueError("plot_interpolation needs at least two test images")
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    labels = check_labels(model, labels, n)
    n_pairs = max(1, min(int(n_pairs), n // 2))
    idx = rng.choice(n, size=2 * n_pairs, replace=False)
    mu_pair, _ = encode_all(model, take(model, x, idx))
    mu_a, mu_b = mu_pair[:n_pairs], mu_pair[n_pairs:]
    t = np.linspace(0.0, 1.0, steps)
    z = (mu_a[:, None, :] + t[None, :, None] * (mu_b - mu_a)[:, None, :]).reshape(-1, mu_a.shape[1])
    dec = decode_all(model, z).reshape(n_pairs, steps, -1)
    real = host(model, take(model, x, idx)).reshape(2 * n_pairs, -1).astype(np.float64)
    rows = np.stack([np.concatenate([real[i:i + 1], dec[i], real[n_pairs + i:n_pairs + i + 1]])
                     for i in range(n_pairs)])
    out = {"rows": rows, "pairs": np.stack([idx[:n_pairs], idx[n_pairs:]], axis=1), "steps": steps,
           "endpoint_mse": float(np.mean((dec[:, 0] - dec[:, -1]) ** 2)), "attribute": None}
    if labels is None:
        return out
    present = np.unique(labels)
    if classes is None and len(present) >= 2:
        a_cls, b_cls = rng.choice(present, size=2, replace=False)
    elif classes is not None:
        a_cls, b_cls = classes
    else:
        return out
    if not (np.any(labels == a_cls) and np.any(labels == b_cls)):
        raise ValueError(f"classes {classes!r} are not both present in labels")
    mu_all, _ = encode_all(model, x)
    vec = mu_all[labels == a_cls].mean(axis=0) - mu_all[labels == b_cls].mean(axis=0)
    pool = np.flatnonzero(labels == b_cls)
    pick = rng.choice(pool, size=min(int(n_attribute), pool.size), replace=False)
    base = mu_all[pick]
    za = (base[:, None, :] + t[None, :, None] * vec[None, None, :]).reshape(-1, base.shape[1])
    dec_a = decode_all(model, za).reshape(len(pick), steps, -1)
    real_b = host(model, take(model, x, pick)).reshape(len(pick), -1).astype(np.float64)
    target = decode_all(model, mu_all[labels == a_cls].mean(axis=0, keepdims=True))   # decode(mean mu[a])
    out["attribute"] = {"rows": np.stack([np.concatenate([real_b[i:i + 1], dec_a[i], target])
                                          for i in range(len(pick))]),
                        "from_class": b_cls, "to_class": a_cls, "indices": pick,
                        "vector_norm": float(np.linalg.norm(vec))}
    return out
