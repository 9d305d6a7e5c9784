"""A user's own images: any folder of image files, and CelebA as distributed.

Every image is decoded once with Pillow, converted to RGB or grayscale,
center-cropped to a square and resized to ``image_size`` x ``image_size``
with a Lanczos filter, as uint8. The decoded set is cached (a uint8 ``.npy``
in the user cache folder, one per source folder and options, written
atomically, with a record of the SHA-256 of the source files' contents and of
the cached pixels) and later runs load the cache memory-mapped once both
checksums match. Images larger than ``max_pixels`` are refused from their
header, before any pixel is decoded.

The splits hold uint8 pixel levels, ``(N, C*H*W)``; :attr:`Dataset.levels`
is 256, and the trainer turns a batch into intensities only when it uses it
(uniform dequantization ``(x + u) / 256`` for the Gaussian likelihood, so the
negative ELBO bounds the discrete data's negative log-likelihood;
``x / 255`` for the Bernoulli one).
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import pathlib
import secrets
import sys
import warnings

import numpy

from ..atomic import atomic_write, remove_stale_temporaries, write_json
from .core import Dataset, DatasetUnavailable

__all__ = ["IMAGE_EXTENSIONS", "COLORS", "CELEBA_CROP", "MAX_IMAGE_PIXELS", "ImageFolderError", "load_folder",
           "load_celeba", "decode_image"]

#: Files with these extensions are decoded; every other file is ignored (and counted).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
COLORS = ("rgb", "gray")
#: The usual aligned-face crop of CelebA: the central 148 x 148 of the 178 x 218 images (as a share of the width).
CELEBA_CROP = 148 / 178
_SPLITS = ("train", "valid", "test")
_CACHE_VERSION = 2
#: Images of more pixels than this are refused before they are decoded (--max-image-pixels raises it).
MAX_IMAGE_PIXELS = 64_000_000
#: Threads that decode a folder side by side: one per core, at most this many.
_DECODE_THREADS_MAX = 16


class ImageFolderError(ValueError):
    """An image that cannot be decoded, or a malformed list or attribute file; the message names the
    file (and the line)."""


# -- one image ------------------------------------------------------------------------------

def decode_image(path, color: str = "rgb", image_size: int = 64, crop: float = 1.0,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> numpy.ndarray:
    """One image file as uint8 ``(C, image_size, image_size)`` (C = 3 for ``"rgb"``, 1 for ``"gray"``).

    Any mode Pillow reads: RGB, grayscale, palette, 16-bit (scaled to 8
    bits), with transparency (composited onto black), CMYK; the EXIF
    orientation is applied. The central square of side ``crop * min(W, H)``
    is resized with a Lanczos filter.

    An image of more than ``max_pixels`` pixels is refused from its header,
    before its pixels are decoded: a small compressed file can hold a huge
    image (a 328 KB PNG of 13000 x 13000 16-bit pixels needs 338 MB decoded).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with _pillow_limit(Image, max_pixels), Image.open(path) as im:
            w, h = im.size                                      # from the header: nothing decoded yet
            if w * h > max_pixels:
                raise ImageFolderError(
                    f"the image {path} is {w} x {h} = {w * h / 1e6:.1f} megapixels, more than the limit of "
                    f"{max_pixels / 1e6:g} (--max-image-pixels {max_pixels}); raise the limit to decode it "
                    f"(it needs about {w * h * _bytes_per_pixel(im.mode) / 2**20:,.0f} MiB of memory)")
            im.load()
            im = ImageOps.exif_transpose(im)
            w, h = im.size
            side = max(1, round(min(w, h) * crop))
            left, top = (w - side) // 2, (h - side) // 2
            im = _to_color(im.crop((left, top, left + side, top + side)), color)   # the crop only, converted
    except ImageFolderError:
        raise
    except MemoryError as err:
        raise ImageFolderError(f"out of memory decoding the image {path}; lower --max-image-pixels to refuse "
                               "such images, or free memory") from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageFolderError(f"cannot decode the image {path}: {err}") from err
    im = im.resize((image_size, image_size), Image.Resampling.LANCZOS)
    a = numpy.asarray(im, dtype=numpy.uint8)
    return a[None] if a.ndim == 2 else numpy.ascontiguousarray(a.transpose(2, 0, 1))   # (C, S, S)


@contextlib.contextmanager
def _pillow_limit(Image, max_pixels):
    """Pillow's own decompression-bomb check set to our limit while opening (its warning is never printed:
    :func:`decode_image` refuses such images with its own message)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _bytes_per_pixel(mode: str) -> int:
    return {"1": 1, "L": 1, "P": 1, "LA": 2, "I;16": 2, "I;16B": 2, "I;16L": 2, "RGB": 3, "YCbCr": 3,
            "RGBA": 4, "CMYK": 4, "I": 4, "F": 4}.get(mode, 4)


def _to_color(im, color):
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode in ("I", "F"):     # 16-bit (or wider) grayscale: to 8 bits
        a = numpy.asarray(im)
        if a.dtype.kind == "f":
            scale = 257.0 if a.max() > 255 else 1.0
            a = numpy.rint(a / scale)
        elif im.mode.startswith("I;16") or a.max() > 255:
            a = (a.astype(numpy.int64) + 128) // 257            # = rint(a / 257): 257 is odd, so no ties
        im = Image.fromarray(numpy.clip(a, 0, 255).astype(numpy.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return im.convert("RGB" if color == "rgb" else "L")


# -- many images, cached ----------------------------------------------------------------------

def _decode_all(files, root, color, image_size, crop, cache_dir, log, progress, name, max_pixels):
    """uint8 (N, C, S, S) for ``files`` (paths relative to ``root``): from the cache, or decoded and cached.

    One cache per source folder and options: ``<name>-<slot>.npy`` and its
    record ``<name>-<slot>.json``, which holds the SHA-256 of the sources'
    contents (file names and bytes) and of the cached pixels. The cache is
    used only when both match (an edited image, or damaged cached pixels,
    are decoded again); a new cache replaces the folder's old one.
    """
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else _default_cache()
    slot = hashlib.sha256(json.dumps({"version": _CACHE_VERSION, "root": str(pathlib.Path(root).resolve()),
                                      "color": color, "image_size": image_size, "crop": crop}).encode()).hexdigest()
    path = cache_dir / f"{name}-{slot[:40]}.npy"
    record_path = path.with_suffix(".json")
    shape = (len(files), 3 if color == "rgb" else 1, image_size, image_size)
    sources = _sources_sha256(root, files)
    with contextlib.suppress(OSError):
        removed = remove_stale_temporaries(cache_dir)    # left by a decoding that was killed
        if removed and log:
            log(f"{name}: removed {len(removed)} temporary file(s) of an interrupted decoding in {cache_dir}")
    cached, why = _read_cache(path, record_path, shape, sources)
    if cached is not None:
        if log:
            log(f"{name}: {len(files)} images from the cache {path} (pixels and sources verified)")
        return cached
    if why and log:
        log(f"{name}: the cache {path} {why}; decoding again")
    images = _decode_into_cache(files, root, color, image_size, crop, path, record_path, shape, sources,
                                progress, name, max_pixels, log)
    if images is not None:
        if log:
            log(f"{name}: decoded {len(files)} images; cached in {path}")
        return images
    out = numpy.empty(shape, dtype=numpy.uint8)    # the cache folder is not writable: decode into memory
    for i, pixels in enumerate(_decoded(files, root, color, image_size, crop, max_pixels, progress, name)):
        out[i] = pixels
    return out


def _read_cache(path, record_path, shape, sources):
    """(the cached pixels, memory-mapped, None) when the cache matches; else (None, why, or None if there is none)."""
    if not path.is_file():
        return None, None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        cached = numpy.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None, "is unreadable or has no record"
    if not isinstance(record, dict) or record.get("sources_sha256") != sources:
        return None, "was made from other image files (their contents changed)"
    if cached.shape != shape or cached.dtype != numpy.uint8 or _pixels_sha256(cached) != record.get("pixels_sha256"):
        return None, "does not hold the pixels its record names (it is damaged)"
    return cached, None


def _decode_into_cache(files, root, color, image_size, crop, path, record_path, shape, sources, progress, name,
                       max_pixels, log):
    """Decode into ``path`` with plain writes (a full disk is an OSError, never a SIGBUS through a
    memory map), atomically, then write its record; returns the cache memory-mapped, or None when the
    cache folder cannot be written at all."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        probe.touch()
        probe.unlink()
    except OSError as err:
        if log:
            log(f"{name}: cannot write the cache in {path.parent} ({err.strerror or err}); decoding into memory")
        return None
    digest = hashlib.sha256()
    with atomic_write(path) as f:
        numpy.lib.format.write_array_header_1_0(f, {"descr": numpy.dtype(numpy.uint8).str, "fortran_order": False,
                                                    "shape": shape})
        for pixels in _decoded(files, root, color, image_size, crop, max_pixels, progress, name):
            pixels = pixels.tobytes()
            digest.update(pixels)
            f.write(pixels)
    write_json(record_path, {"version": _CACHE_VERSION, "shape": list(shape), "sources_sha256": sources,
                             "pixels_sha256": digest.hexdigest()})
    return numpy.load(path, mmap_mode="r")


def _decoded(files, root, color, image_size, crop, max_pixels, progress, name):
    """Yields :func:`decode_image` of each file, in order, decoded by one thread per core.

    Pillow releases the GIL while it decodes, converts and resizes, so the
    threads decode side by side. At most a few images per thread are ahead
    of the consumer; the first file that fails, in the files' order, raises
    (as a one-by-one loop would), and the images after it are not decoded.
    """
    from concurrent.futures import ThreadPoolExecutor

    threads = max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
                         _DECODE_THREADS_MAX))
    window = 4 * threads
    with ThreadPoolExecutor(threads, thread_name_prefix="scratchvae-decode") as pool:
        pending = collections.deque()
        try:
            for file in _progress(files, progress, name):
                pending.append(pool.submit(decode_image, root / file, color, image_size, crop, max_pixels))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:        # an error or an interruption: decode nothing more
                future.cancel()


def _progress(files, progress, name):
    from tqdm.auto import tqdm
    return tqdm(files, desc=f"decoding {name} images", unit="img", leave=False, file=sys.stderr,
                disable=(not progress) if progress is not None else None)


def _sources_sha256(root, files) -> str:
    """SHA-256 of the source images: every file's relative path and bytes, in order."""
    h = hashlib.sha256()
    for f in files:
        h.update(pathlib.Path(f).as_posix().encode() + b"\0")
        file_hash = hashlib.sha256()
        with open(root / f, "rb") as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                file_hash.update(block)
        h.update(file_hash.digest())
    return h.hexdigest()


def _pixels_sha256(pixels) -> str:
    h = hashlib.sha256()
    for start in range(0, pixels.shape[0], 1024):     # in blocks: the memory map stays on disk
        h.update(numpy.ascontiguousarray(pixels[start:start + 1024]).tobytes())
    return h.hexdigest()


def _default_cache():
    from .download import default_cache_dir
    return default_cache_dir("images")


# -- a folder of images ---------------------------------------------------------------------------

def _scan(folder):
    """Image files under ``folder`` (sorted, relative) and the number of other files ignored."""
    images, other = [], 0
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(p.relative_to(folder))
            elif p.name != "attributes.csv":
                other += 1
    return images, other


def load_folder(data_dir, *, color="rgb", image_size=64, seed=0, cache_dir=None, log=None, progress=None,
                valid_fraction=0.1, test_fraction=0.1, max_pixels=MAX_IMAGE_PIXELS):
    """Every image file under ``data_dir`` as a :class:`~scratchvae.datasets.Dataset` of uint8 levels.

    Splits come from ``train/``, ``valid/`` (optional) and ``test/``
    subfolders when ``data_dir`` has them, else from a permutation drawn
    from ``seed`` (``valid_fraction`` and ``test_fraction`` of the images,
    at least one each). Labels: when every image lies in a subfolder (of
    the split folder, if any), the subfolder names are the classes
    (``class_names``, sorted). Attributes: ``data_dir/attributes.csv``, a
    header ``file,<name>,...`` and one row per image (its path relative to
    ``data_dir``, then 1 / 0 / -1 per attribute).
    """
    _check_options(color, image_size)
    folder = pathlib.Path(data_dir).expanduser()
    if not folder.is_dir():
        raise DatasetUnavailable(f"dataset 'folder': --data-dir {folder} is not a folder", folder=folder)
    files, ignored = _scan(folder)
    if not files:
        raise DatasetUnavailable(f"dataset 'folder': no image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}"
                                 + (f"; {ignored} other file(s) ignored" if ignored else " (the folder is empty)"),
                                 folder=folder)
    if log:
        log(f"folder: {len(files)} images under {folder}" + (f", {ignored} other file(s) ignored" if ignored else ""))
    split_of = _splits(folder, files, seed, valid_fraction, test_fraction)
    classes, label_of = _class_labels(files, split_of)
    attributes, names = _read_attributes(folder / "attributes.csv", files)
    pixels = _decode_all(files, folder, color, image_size, 1.0, cache_dir, log, progress, "folder", max_pixels)
    out = {}
    for split in _SPLITS:
        idx = numpy.array([i for i, f in enumerate(files) if split_of[i] == split], dtype=numpy.int64)
        if idx.size == 0:
            out[split] = (None, None, None)
            continue
        x = numpy.asarray(pixels[idx]).reshape(idx.size, -1)
        out[split] = (x, None if label_of is None else label_of[idx],
                      None if attributes is None else attributes[idx])
    if out["train"][0] is None or out["test"][0] is None:
        raise ImageFolderError(f"dataset 'folder': {folder} has a train/ or test/ subfolder but no images in "
                               f"{'train/' if out['train'][0] is None else 'test/'}; both need images")
    return Dataset(name="folder", train=out["train"][0], valid=out["valid"][0], test=out["test"][0],
                   train_labels=out["train"][1], valid_labels=out["valid"][1], test_labels=out["test"][1],
                   image_shape=(3 if color == "rgb" else 1, image_size, image_size), levels=256,
                   class_names=classes, attribute_names=names,
                   attributes=None if attributes is None else {s: out[s][2] for s in _SPLITS})


def _check_options(color, image_size):
    if color not in COLORS:
        raise ValueError(f"--color must be one of {COLORS}, got {color!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 4 <= image_size <= 1024:
        raise ValueError(f"--image-size must be an integer in [4, 1024], got {image_size!r}")


def _splits(folder, files, seed, valid_fraction, test_fraction):
    """Each file's split: its top folder when ``folder`` has train/ and test/ (valid/ optional), else drawn."""
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        outside = [f for f in files if f.parts[0] not in _SPLITS or len(f.parts) == 1]
        if outside:
            raise ImageFolderError(f"dataset 'folder': {folder} has train/ and test/ subfolders, so every image must "
                                   f"lie in train/, valid/ or test/; {folder / outside[0]} does not "
                                   f"({len(outside)} such file(s))")
        return [f.parts[0] for f in files]
    n = len(files)
    if n < 3:
        raise ImageFolderError(f"dataset 'folder': {folder} holds {n} image(s); a train, a validation and a test "
                               "split need at least 3")
    n_test, n_valid = max(1, round(n * test_fraction)), max(1, round(n * valid_fraction))
    order = numpy.random.default_rng(seed).permutation(n)
    split = numpy.empty(n, dtype=object)
    split[order[:n_test]], split[order[n_test:n_test + n_valid]], split[order[n_test + n_valid:]] = \
        "test", "valid", "train"
    return list(split)


def _class_labels(files, split_of):
    """Subfolder names as classes, when every image lies in one (below its split folder, if any)."""
    def class_dir(f, split):
        parts = f.parts[1:] if split == f.parts[0] and len(f.parts) > 1 and f.parts[0] in _SPLITS else f.parts
        return parts[0] if len(parts) > 1 else None
    dirs = [class_dir(f, s) for f, s in zip(files, split_of)]
    if any(d is None for d in dirs):
        return None, None
    classes = tuple(sorted(set(dirs)))
    index = {c: i for i, c in enumerate(classes)}
    return classes, numpy.array([index[d] for d in dirs], dtype=numpy.int32)


def _read_attributes(path, files):
    """(N, A) int8 attributes from ``attributes.csv`` (None without the file), and their names."""
    import csv

    if not path.is_file():
        return None, None
    rows, first_line = {}, {}
    with _text_file(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or header[0].strip() != "file" or len(header) < 2:
            raise ImageFolderError(f"{path}, line 1: the header must be file,<attribute>,..., got {header!r}")
        names = tuple(h.strip() for h in header[1:])
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ImageFolderError(f"{path}, line 1: the attribute {repeated[0]!r} is named more than once")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise ImageFolderError(f"{path}, line {line}: {len(row)} fields, the header has {len(header)}")
            try:
                values = [int(v) for v in row[1:]]
            except ValueError:
                raise ImageFolderError(f"{path}, line {line}: attribute values must be 1, 0 or -1, got "
                                       f"{row[1:]!r}") from None
            if any(v not in (-1, 0, 1) for v in values):
                raise ImageFolderError(f"{path}, line {line}: attribute values must be 1, 0 or -1, got {values}")
            key = pathlib.Path(row[0].strip()).as_posix()
            if key in rows:
                raise ImageFolderError(f"{path}, line {line}: {key} already has a line (line {first_line[key]})")
            rows[key], first_line[key] = values, line
    missing = [f for f in files if f.as_posix() not in rows]
    if missing:
        raise ImageFolderError(f"{path}: no line for {len(missing)} image(s), the first {missing[0].as_posix()}")
    return numpy.array([rows[f.as_posix()] for f in files], dtype=numpy.int8), names


# -- CelebA ------------------------------------------------------------------------------------------

def load_celeba(data_dir, *, color="rgb", image_size=64, cache_dir=None, log=None, progress=None,
                max_pixels=MAX_IMAGE_PIXELS):
    """CelebA as distributed: ``img_align_celeba/``, ``list_attr_celeba.txt`` and
    ``list_eval_partition.txt`` (the official 0/1/2 = train/valid/test splits)
    in ``data_dir``; the 40 attributes as ``attributes`` (+1/-1) with the
    usual aligned-face crop (:data:`CELEBA_CROP`) before the resize."""
    _check_options(color, image_size)
    folder = pathlib.Path(data_dir).expanduser() if data_dir is not None else None
    if folder is None or not folder.is_dir():
        raise DatasetUnavailable(f"dataset 'celeba' needs --data-dir, the folder holding img_align_celeba/, "
                                 f"list_attr_celeba.txt and list_eval_partition.txt; got {folder}", folder=folder)
    need = [folder / "img_align_celeba", folder / "list_attr_celeba.txt", folder / "list_eval_partition.txt"]
    missing = [p for p in need if not p.exists()]
    if missing:
        raise DatasetUnavailable(f"dataset 'celeba': missing {', '.join(str(p) for p in missing)} (the CelebA "
                                 "layout as distributed)", files=[str(p) for p in missing], folder=folder)
    names, attrs = _read_celeba_attributes(need[1])
    partition = _read_celeba_partition(need[2])
    unlisted = [name for name in partition if name not in attrs]
    if unlisted:
        raise ImageFolderError(f"{need[2]}: {unlisted[0]} has a split but no line in {need[1].name} "
                               f"({len(unlisted)} such image(s)); the two lists must name the same images")
    files = list(attrs)
    for line, name in enumerate(files, start=3):
        if not (need[0] / name).is_file():
            raise ImageFolderError(f"{need[1]}, line {line}: the image {name} is listed but {need[0] / name} does "
                                   "not exist")
        if name not in partition:
            raise ImageFolderError(f"{need[2]}: no line for {name} (listed in {need[1].name}, line {line})")
    if log:
        log(f"celeba: {len(files)} images, {len(names)} attributes, in {folder}")
    pixels = _decode_all([pathlib.Path("img_align_celeba") / f for f in files], folder, color, image_size,
                         CELEBA_CROP, cache_dir, log, progress, "celeba", max_pixels)
    table = numpy.array([attrs[f] for f in files], dtype=numpy.int8)
    which = numpy.array([partition[f] for f in files])
    split = {}
    for code, s in enumerate(_SPLITS):
        idx = numpy.flatnonzero(which == code)
        split[s] = (numpy.asarray(pixels[idx]).reshape(idx.size, -1) if idx.size else None, table[idx])
    for s in ("train", "test"):
        if split[s][0] is None:
            raise ImageFolderError(f"{need[2]}: no image is in the {s} split "
                                   f"({'0' if s == 'train' else '2'})")
    return Dataset(name="celeba", train=split["train"][0], valid=split["valid"][0], test=split["test"][0],
                   image_shape=(3 if color == "rgb" else 1, image_size, image_size), levels=256,
                   attribute_names=names, attributes={s: split[s][1] for s in _SPLITS})


def _read_celeba_attributes(path):
    with _text_file(path) as f:
        lines = f.read().splitlines()
    if len(lines) < 2:
        raise ImageFolderError(f"{path}: expected a count line and a line of attribute names, got {len(lines)} line(s)")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise ImageFolderError(f"{path}, line 1: expected the number of images, got {lines[0][:40]!r}") from None
    names = tuple(lines[1].split())
    if not names:
        raise ImageFolderError(f"{path}, line 2: expected the attribute names, got an empty line")
    rows = {}
    for line, text in enumerate(lines[2:], start=3):
        fields = text.split()
        if not fields:
            continue
        if len(fields) != len(names) + 1:
            raise ImageFolderError(f"{path}, line {line}: {len(fields) - 1} attribute values for {len(names)} "
                                   f"attributes")
        try:
            values = [int(v) for v in fields[1:]]
        except ValueError:
            raise ImageFolderError(f"{path}, line {line}: attribute values must be 1 or -1, got "
                                   f"{' '.join(fields[1:])[:60]!r}") from None
        if any(v not in (-1, 1) for v in values):
            raise ImageFolderError(f"{path}, line {line}: attribute values must be 1 or -1, got {values}")
        if fields[0] in rows:
            raise ImageFolderError(f"{path}, line {line}: {fields[0]} is listed a second time")
        rows[fields[0]] = values
    if len(rows) != count:
        raise ImageFolderError(f"{path}, line 1: says {count} images, the file lists {len(rows)}")
    return names, rows


def _read_celeba_partition(path):
    out = {}
    with _text_file(path) as f:
        for line, text in enumerate(f, start=1):
            fields = text.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise ImageFolderError(f"{path}, line {line}: expected '<image> 0|1|2', got {text.strip()[:60]!r}")
            if fields[0] in out:
                raise ImageFolderError(f"{path}, line {line}: {fields[0]} is listed a second time")
            out[fields[0]] = int(fields[1])
    return out


@contextlib.contextmanager
def _text_file(path):
    """A UTF-8 text file (a byte-order mark allowed) to read; a file that is not text is an error naming it."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            yield f
    except UnicodeDecodeError as err:
        raise ImageFolderError(f"{path} is not a UTF-8 text file (byte {err.start}: {err.reason})") from None
