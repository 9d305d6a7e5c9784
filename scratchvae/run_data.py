"""The data as a run sees it: loaded, subset, checked and placed on the device once, with the SHA-256 a
checkpoint records so that a run never continues on other data."""
from __future__ import annotations

import dataclasses
import hashlib

import numpy

from . import datasets
from .config import TrainConfig
from .streams import EVAL_DEQUANTIZATION_STREAM, seeds

__all__ = ["RunData", "prepare_data", "data_sha256", "check_same_data"]


@dataclasses.dataclass
class RunData:
    train: object                  # (N, D) on the backend: uint8 for 0/1 pixels, else the model's dtype
    test: numpy.ndarray            # (N_test, D) host
    test_labels: numpy.ndarray | None
    test_dev: object               # the test split on the backend
    valid_dev: object | None       # the validation split on the backend (keep_best)
    image_shape: tuple
    dynamic: bool                  # resample binary pixels every epoch
    binary: bool                   # batches hold 0/1 pixels (static or dynamic binarization)
    levels: int | None = None      # 256: train holds uint8 levels, made intensities batch by batch
    dataset: object = None         # the loaded datasets.Dataset (labels, attributes, names)
    test_attributes: numpy.ndarray | None = None   # (N_test, A) of the test images kept
    sha256: str | None = None      # SHA-256 of the dataset's train and test pixels as loaded (data_sha256)


def prepare_data(cfg: TrainConfig, be, log=None, progress=None) -> RunData:
    """Load, subset and check the splits as the run ``cfg`` trains on them; refused before training if bad.

    Returns the trainer's view: ``train`` on the backend (uint8 for 0/1 pixels
    and 8-bit images), ``test`` (host intensities, for figures),
    ``test_dev`` and ``valid_dev`` (on the backend; 8-bit images dequantized
    once), ``image_shape``, ``levels`` and the loaded ``dataset``.
    """
    data = datasets.load(cfg.dataset, data_dir=cfg.data_dir, binarize=cfg.binarize, rng=cfg.seed, log=log,
                         color=cfg.color, image_size=cfg.image_size, progress=progress,
                         max_image_pixels=cfg.max_image_pixels)
    x_train, x_test, test_labels = data.train, data.test, data.test_labels
    test_attributes = None if data.attributes is None else data.attributes.get("test")
    if cfg.limit is not None:
        x_train = x_train[:cfg.limit]
    if cfg.test_limit is not None and cfg.test_limit < x_test.shape[0]:
        # evenly spaced, not the first N: MNIST's test split is ordered by class
        keep = numpy.linspace(0, x_test.shape[0] - 1, cfg.test_limit).round().astype(numpy.int64)
        x_test = x_test[keep]
        test_labels = None if test_labels is None else test_labels[keep]
        test_attributes = None if test_attributes is None else test_attributes[keep]
    x_valid = data.valid if cfg.keep_best else None
    if cfg.keep_best and x_valid is None:
        raise ValueError(f"keep_best (--keep-best) needs a validation split and dataset {cfg.dataset!r} has none")
    dtype = numpy.dtype(cfg.dtype)
    if data.levels:   # 8-bit images: uint8 on the device; the test and validation splits dequantized once
        gen = numpy.random.default_rng(seeds(cfg.seed, 0, EVAL_DEQUANTIZATION_STREAM))
        x_test, x_valid = (None if x is None else datasets.to_intensities(x, cfg.likelihood, gen)
                           for x in (x_test, x_valid))
        x_train = numpy.ascontiguousarray(x_train, dtype=numpy.uint8)
    for name, x in (("training data", None if data.levels else x_train), ("validation data", x_valid),
                    ("test data", x_test)):
        if x is not None:
            datasets.validate_images(x, cfg.likelihood, name=f"{cfg.dataset} {name}", expected_shape=data.image_shape)
    # the training split lives on the device for the whole run: 0/1 pixels as uint8 (a quarter of the
    # float32 size), expanded batch by batch
    stored_as_bits = data.binary and not data.dynamic_binarization   # 0/1 pixels already (dynamic: probabilities)
    stored_as_uint8 = stored_as_bits or bool(data.levels)
    train_dev = be.asarray(numpy.ascontiguousarray(x_train, dtype=numpy.uint8 if stored_as_uint8 else dtype))
    return RunData(train=train_dev, test=x_test, test_labels=test_labels, levels=data.levels, dataset=data,
                 test_attributes=test_attributes, sha256=data_sha256(data.train, data.test),
                 test_dev=be.asarray(x_test, dtype=dtype),
                 valid_dev=None if x_valid is None else be.asarray(x_valid, dtype=dtype),
                 image_shape=data.image_shape, dynamic=data.dynamic_binarization,
                 binary=bool(data.binary or data.dynamic_binarization))


def data_sha256(*splits) -> str:
    """SHA-256 of the splits' pixels (dtype, shape and bytes, in order): what a checkpoint records of its data."""
    h = hashlib.sha256()
    for x in splits:
        h.update(f"{x.dtype.str}{x.shape}".encode())
        for start in range(0, x.shape[0], 4096):     # in blocks: a memory-mapped image cache stays on disk
            h.update(numpy.ascontiguousarray(x[start:start + 4096]).tobytes())
    return h.hexdigest()


def check_same_data(meta: dict, data: RunData, path, cfg: TrainConfig) -> None:
    """Refuse to continue (or evaluate) the run of checkpoint ``path`` on data other than its own."""
    stored = meta.get("data_sha256")   # absent in checkpoints written before it was recorded
    if stored is not None and stored != data.sha256:
        where = f"--data-dir {cfg.data_dir}" if cfg.data_dir else f"the {cfg.dataset} data found"
        raise ValueError(f"{path}: the run was trained on other data than {where} holds (data SHA-256 "
                         f"{stored[:12]}..., found {data.sha256[:12]}...); point --data-dir at the run's own "
                         "data, or start a new run")
