#!/usr/bin/env python
"""Move test images along attribute vectors in a trained run's latent space.

    python examples/attribute_vectors.py RUN --attribute Blond_Hair [--attribute Eyeglasses ...] [--out FIG.png]
    python examples/attribute_vectors.py RUN --from 4 --to 9          # class labels (MNIST, Fashion-MNIST, folders)

An attribute's vector is the mean posterior mean of the training images that
have it minus that of those that do not (with ``--from A --to B``: of class
B minus class A). The figure (default ``RUN/attribute_vectors.png``) shows
test images without the attribute (of class A), one per row, decoded from
their code plus 0, 0.5, 1, ... times the vector (the columns); with two or
more attributes, a last block adds all their vectors at once.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

from scratchvae import datasets, figures
from scratchvae.cli import USER_ERRORS, describe_error
from scratchvae.reload import load_trained


def _floats(text):
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _split(data, name):
    """(images as the model sees them (N, D), labels or None, attributes or None) of split ``name``."""
    ds = data.dataset
    x = getattr(ds, name)
    if x is None:
        return None, None, None
    if ds.levels:
        x = datasets.to_intensities(x, "bernoulli")   # the grey levels, without dequantization noise
    attrs = None if ds.attributes is None else ds.attributes.get(name)
    return np.asarray(x, dtype=np.float32), getattr(ds, f"{name}_labels"), attrs


def _class_index(ds, value):
    """A class given by name (class subfolders) or number."""
    if ds.class_names and value in ds.class_names:
        return ds.class_names.index(value)
    try:
        return int(value)
    except ValueError:
        known = f"; the classes are {', '.join(ds.class_names)}" if ds.class_names else ""
        raise ValueError(f"--from/--to {value!r}: not a class of {ds.name}{known}") from None


def blocks_for(model, data, args, rows):
    """[(title, test images of the rows, vector)] for the attributes or the class pair asked for."""
    ds = data.dataset
    x_train, y_train, a_train = _split(data, "train")
    x_test, y_test, a_test = _split(data, "test")
    if args.attribute:
        if ds.attribute_names is None:
            raise ValueError(f"--attribute: dataset {ds.name!r} has no attributes (CelebA, or a folder with "
                             "attributes.csv); use --from/--to with class labels")
        unknown = [a for a in args.attribute if a not in ds.attribute_names]
        if unknown:
            raise ValueError(f"--attribute {', '.join(unknown)}: not an attribute of {ds.name}; it has "
                             f"{', '.join(ds.attribute_names)}")
        return figures.attribute_blocks(model, x_train, a_train, x_test, a_test, ds.attribute_names,
                                        args.attribute, rows)
    a, b = _class_index(ds, args.from_), _class_index(ds, args.to)
    x_src, y_src = (x_train, y_train) if y_train is not None else (x_test, y_test)
    if y_src is None:
        raise ValueError(f"--from/--to: dataset {ds.name!r} has no class labels")
    if y_train is None:
        print(f"note: {ds.name} has labels for its test split only; the class vector is computed there",
              file=sys.stderr)
    for c in (a, b):
        if not np.any(y_src == c):
            raise ValueError(f"--from/--to {c}: no image of class {c} in {ds.name}")
    keep = (y_src == a) | (y_src == b)
    mu = figures.posterior_means(model, x_src[keep])
    vector = figures.attribute_vector(mu, y_src[keep] == b)
    names = ds.class_names or {}
    label = (lambda c: names[c]) if names else str
    return [(f"{label(a)} -> {label(b)}", x_test[np.flatnonzero(y_test == a)[:rows]], vector)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--attribute", action="append", default=[], metavar="NAME",
                   help="an attribute of the dataset (repeat for several)")
    p.add_argument("--from", dest="from_", metavar="CLASS", help="with --to: the class vector from CLASS ...")
    p.add_argument("--to", metavar="CLASS", help="... to this class (names of class subfolders, or numbers)")
    p.add_argument("--multiples", type=_floats, default=(0, 0.5, 1, 1.5, 2), metavar="M,M,...",
                   help="the columns: code + m x vector (default 0,0.5,1,1.5,2)")
    p.add_argument("--rows", type=int, default=6, help="test images per block (default 6)")
    p.add_argument("--params", choices=("auto", "best", "last"), default="auto")
    p.add_argument("--out", help="the figure (default RUN/attribute_vectors.png)")
    p.add_argument("--data-dir", help="where the run's data is now, when it moved (checked against the run's "
                                      "record of its data)")
    args = p.parse_args(argv)
    if bool(args.attribute) == bool(args.from_ is not None or args.to is not None) or \
            (args.from_ is None) != (args.to is None):
        print("error: give --attribute NAME (one or more), or --from CLASS --to CLASS", file=sys.stderr)
        return 1
    if args.rows < 1 or not args.multiples:
        print("error: --rows must be >= 1 and --multiples must name at least one number", file=sys.stderr)
        return 1
    run = pathlib.Path(args.run_dir)
    out = pathlib.Path(args.out) if args.out else run / "attribute_vectors.png"
    try:
        model, data, cfg, meta, _ = load_trained(run, args.params, data_dir=args.data_dir)
        blocks = blocks_for(model, data, args, args.rows)
        result = figures.plot_attribute_vectors(model, blocks, args.multiples, out, run_id=meta.get("run_id"))
    except (*USER_ERRORS, OSError) as err:
        print(f"error: {describe_error(err)}", file=sys.stderr)
        return 1
    for block in result["blocks"]:
        print(f"{block['title']}: {block['rows']} test images, vector norm {block['vector_norm']:.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
