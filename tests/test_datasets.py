"""Tests of scratchvae.datasets: shipped data, IDX parsing, downloads, validation.

Downloads are tested against a local HTTP server on 127.0.0.1 serving small
fake "MNIST" files whose SHA-256 sums are patched into the module; nothing
here touches the network.  Tests on the real MNIST test files in
``../shared/data/mnist`` are skipped when that folder is absent.
"""
import gzip
import hashlib
import http.server
import pathlib
import socket
import struct
import threading

import numpy as np
import pytest

import scratchvae.datasets.download  # noqa: F401  (datasets.download, monkeypatched below)
from scratchvae import datasets

SHARED_MNIST = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# --------------------------------------------------------------------------
# helpers


def idx_bytes(array, magic=None):
    """Serialize a uint8 array as IDX (big-endian header, as MNIST's files)."""
    array = np.asarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write(path, data, gz=False):
    path = pathlib.Path(path)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def small_idx_set(folder, n_train=7, n_test=3, rows=5, cols=4, gz=(True, False, True, False), seed=1):
    """Write the four MNIST-named IDX files of a tiny dataset; return the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, rows, cols), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, rows, cols), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for (role, filename), compress in zip(datasets.MNIST_FILES.items(), gz):
        name = filename if compress else filename[:-3]
        write(pathlib.Path(folder) / name, idx_bytes(arrays[role]), gz=compress)
    return arrays


# --------------------------------------------------------------------------
# the shipped binarized MNIST


def test_binarized_mnist_ships_with_the_package():
    ds = datasets.load()
    assert ds.name == "binarized-mnist"
    assert ds.train.shape == (50000, 784)
    assert ds.valid.shape == (10000, 784)
    assert ds.test.shape == (10000, 784)
    for x in (ds.train, ds.valid, ds.test):
        assert x.dtype == np.float32
    assert ds.binary and not ds.dynamic_binarization
    assert set(np.unique(ds.test).tolist()) == {0.0, 1.0}
    assert ds.image_shape == (1, 28, 28) and ds.n_features == 784
    assert ds.train_labels is None and ds.valid_labels is None
    assert np.bincount(ds.test_labels, minlength=10).tolist() == MNIST_TEST_COUNTS
    # The mean pixel of binarized MNIST is about 0.13.
    assert 0.10 < float(ds.train[:5000].mean()) < 0.16


def test_shipped_file_hash_is_checked(monkeypatch):
    monkeypatch.setattr(datasets, "BINARIZED_MNIST_SHA256", "0" * 64)
    with pytest.raises(datasets.DatasetIntegrityError, match=r"binarized_mnist\.npz is corrupted"):
        datasets.load("binarized-mnist")


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="binarized-mnist.*mnist.*idx"):
        datasets.load("cifar10")
    with pytest.raises(ValueError, match="static.*dynamic"):
        datasets.load("binarized-mnist", binarize="yes")
    with pytest.raises(ValueError, match="data_dir"):
        datasets.load("idx")


# --------------------------------------------------------------------------
# read_idx on the real MNIST test files


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"real MNIST test files not present at {SHARED_MNIST}")
def test_read_idx_on_real_mnist_test_files():
    images = datasets.read_idx(SHARED_MNIST / "t10k-images-idx3-ubyte.gz")
    labels = datasets.read_idx(SHARED_MNIST / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == MNIST_TEST_COUNTS
    assert images.max() == 255 and images.min() == 0
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        digest = hashlib.sha256((SHARED_MNIST / name).read_bytes()).hexdigest()
        assert digest == datasets.MNIST_SHA256[name]


# --------------------------------------------------------------------------
# the idx loader and its validations


def test_idx_round_trip(tmp_path):
    arrays = small_idx_set(tmp_path)
    ds = datasets.load("idx", data_dir=tmp_path)
    assert ds.image_shape == (1, 5, 4)
    # 7 // 6 = 1 image held out, the last one
    assert ds.train.shape == (6, 20) and ds.valid.shape == (1, 20) and ds.test.shape == (3, 20)
    assert ds.train.dtype == np.float32
    all_train = arrays["train_images"].reshape(7, 20) / 255.0
    np.testing.assert_allclose(ds.train, all_train[:6], rtol=1e-6)
    np.testing.assert_allclose(ds.valid, all_train[6:], rtol=1e-6)
    np.testing.assert_allclose(ds.test, arrays["test_images"].reshape(3, 20) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.train_labels, arrays["train_labels"][:6])
    np.testing.assert_array_equal(ds.valid_labels, arrays["train_labels"][6:])
    np.testing.assert_array_equal(ds.test_labels, arrays["test_labels"])
    assert not ds.binary

    no_valid = datasets.load("idx", data_dir=tmp_path, n_valid=0)
    assert no_valid.valid is None and no_valid.train.shape == (7, 20)

    static = datasets.load("idx", data_dir=tmp_path, binarize="static", rng=0)
    again = datasets.load("idx", data_dir=tmp_path, binarize="static", rng=0)
    assert static.binary and not static.dynamic_binarization
    np.testing.assert_array_equal(static.train, again.train)
    assert set(np.unique(static.train).tolist()) <= {0.0, 1.0}

    dynamic = datasets.load("idx", data_dir=tmp_path, binarize="dynamic")
    assert dynamic.dynamic_binarization and not dynamic.binary
    np.testing.assert_array_equal(dynamic.train, ds.train)


def test_idx_missing_file_lists_it(tmp_path):
    small_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(datasets.DatasetUnavailable, match=r"t10k-labels-idx1-ubyte\[\.gz\]") as info:
        datasets.load("idx", data_dir=tmp_path)
    assert str(tmp_path) in str(info.value)


def test_idx_corrupted_magic(tmp_path):
    arrays = small_idx_set(tmp_path)
    bad = idx_bytes(arrays["train_images"], magic=0x12340803)
    write(tmp_path / "train-images-idx3-ubyte.gz", bad, gz=True)
    with pytest.raises(datasets.IDXFormatError, match=r"train-images-idx3-ubyte\.gz: not an IDX file.*0x12340803"):
        datasets.load("idx", data_dir=tmp_path)


def test_idx_wrong_kind_of_file(tmp_path):
    arrays = small_idx_set(tmp_path)
    # a labels file that holds images
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(arrays["test_images"]))
    with pytest.raises(datasets.IDXFormatError, match=r"t10k-labels-idx1-ubyte: expected an IDX labels file.*0x00000803"):
        datasets.load("idx", data_dir=tmp_path)


def test_idx_truncated_and_trailing_bytes(tmp_path):
    arrays = small_idx_set(tmp_path)
    good = idx_bytes(arrays["test_images"])
    write(tmp_path / "t10k-images-idx3-ubyte", good[:-3])
    with pytest.raises(datasets.IDXFormatError, match=r"t10k-images-idx3-ubyte: truncated"):
        datasets.load("idx", data_dir=tmp_path)
    write(tmp_path / "t10k-images-idx3-ubyte", good + b"\0")
    with pytest.raises(datasets.IDXFormatError, match=r"t10k-images-idx3-ubyte: trailing bytes"):
        datasets.load("idx", data_dir=tmp_path)
    # a truncated gzip stream
    compressed = gzip.compress(good)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    write(tmp_path / "t10k-images-idx3-ubyte.gz", compressed[: len(compressed) // 2])
    with pytest.raises(datasets.IDXFormatError, match=r"t10k-images-idx3-ubyte\.gz: corrupt or truncated gzip"):
        datasets.load("idx", data_dir=tmp_path)


def test_idx_count_mismatch(tmp_path):
    arrays = small_idx_set(tmp_path)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(arrays["train_labels"][:6]))
    with pytest.raises(datasets.IDXFormatError,
                       match=r"train-labels-idx1-ubyte: holds 6 labels but train-images-idx3-ubyte\.gz holds 7 images"):
        datasets.load("idx", data_dir=tmp_path)


def test_read_idx_header_too_short(tmp_path):
    path = write(tmp_path / "x-idx3-ubyte", struct.pack(">I", 0x00000803) + b"\0\0\0\7")
    with pytest.raises(datasets.IDXFormatError, match="truncated header"):
        datasets.read_idx(path)


# --------------------------------------------------------------------------
# downloads from a local HTTP server


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files``; ``server.mode`` is "ok", "corrupt" or "truncate"."""

    def do_GET(self):
        server = self.server
        name = self.path.rsplit("/", 1)[-1]
        with server.lock:
            server.requests.append(name)
        body = server.files.get(name)
        if body is None:
            self.send_error(404)
            return
        if server.mode == "corrupt":
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.mode == "truncate":
            self.wfile.write(body[: len(body) // 2])  # then close: fewer bytes than announced
            self.close_connection = True
        else:
            self.wfile.write(body)

    def log_message(self, format, *args):
        pass


@pytest.fixture
def serve(monkeypatch):
    """Start local HTTP servers: ``serve(files, mode) -> (url, server)``; all stopped afterwards."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    started = []

    def start(files, mode="ok"):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.files, server.mode, server.requests, server.lock = dict(files), mode, [], threading.Lock()
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        started.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}/mnist/", server

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def dead_mirror():
    """A URL whose port refuses connections (bound, never listening)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/mnist/"
    sock.close()


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """Small valid gzip IDX files under MNIST's names, their hashes patched in."""
    src = tmp_path.parent / f"{tmp_path.name}-src"  # beside tmp_path, so tests see tmp_path empty
    src.mkdir()
    arrays = small_idx_set(src, n_train=12, n_test=4, rows=6, cols=5, gz=(True,) * 4, seed=7)
    files = {name: (src / name).read_bytes() for name in datasets.MNIST_FILES.values()}
    monkeypatch.setattr(datasets.download, "MNIST_SHA256",
                        {name: hashlib.sha256(body).hexdigest() for name, body in files.items()})
    return files, arrays


def listing(folder):
    return sorted(p.name for p in pathlib.Path(folder).iterdir())


def test_download_happy_path_and_load(tmp_path, serve, fake_mnist):
    files, arrays = fake_mnist
    url, server = serve(files)
    cache = tmp_path / "cache"
    messages = []
    ds = datasets.load("mnist", data_dir=cache, mirrors=[url], timeout=5, log=messages.append)
    assert listing(cache) == sorted(files)  # no temporary files left behind
    for name, body in files.items():
        assert (cache / name).read_bytes() == body
    assert sorted(server.requests) == sorted(files)
    assert any("downloading" in m for m in messages)
    # 12 // 6 = 2 held out as valid
    assert ds.train.shape == (10, 30) and ds.valid.shape == (2, 30) and ds.test.shape == (4, 30)
    assert ds.image_shape == (1, 6, 5)
    np.testing.assert_array_equal(ds.test_labels, arrays["test_labels"])

    # already present and verified: no new request
    datasets.load("mnist", data_dir=cache, mirrors=[url], timeout=5)
    assert len(server.requests) == 4


def test_present_file_with_wrong_hash_is_downloaded_again(tmp_path, serve, fake_mnist):
    files, _ = fake_mnist
    url, server = serve(files)
    datasets.download_mnist(tmp_path, mirrors=[url], timeout=5)
    assert len(server.requests) == 4
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not the file")
    datasets.download_mnist(tmp_path, mirrors=[url], timeout=5)
    assert server.requests[4:] == ["t10k-labels-idx1-ubyte.gz"]
    assert (tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes() == files["t10k-labels-idx1-ubyte.gz"]


def test_dead_first_mirror_falls_back(tmp_path, serve, fake_mnist, dead_mirror):
    files, _ = fake_mnist
    url, server = serve(files)
    datasets.download_mnist(tmp_path, mirrors=[dead_mirror, url], timeout=5)
    assert listing(tmp_path) == sorted(files)
    assert len(server.requests) == 4


@pytest.mark.parametrize("mode", ["corrupt", "truncate"])
def test_bad_first_mirror_falls_back(tmp_path, serve, fake_mnist, mode):
    files, _ = fake_mnist
    bad_url, bad = serve(files, mode=mode)
    good_url, good = serve(files)
    messages = []
    datasets.download_mnist(tmp_path, mirrors=[bad_url, good_url], timeout=5, log=messages.append)
    assert listing(tmp_path) == sorted(files)
    for name, body in files.items():
        assert (tmp_path / name).read_bytes() == body
    assert len(bad.requests) == 4 and len(good.requests) == 4
    expected = "SHA-256 mismatch" if mode == "corrupt" else "truncated download"
    assert any(expected in m for m in messages)


def test_all_mirrors_bad(tmp_path, serve, fake_mnist, dead_mirror):
    files, _ = fake_mnist
    corrupt_url, _ = serve(files, mode="corrupt")
    truncate_url, _ = serve(files, mode="truncate")
    missing_url, _ = serve({})  # 404 for everything
    cache = tmp_path / "cache"
    mirrors = [dead_mirror, corrupt_url, truncate_url, missing_url]
    with pytest.raises(datasets.DatasetUnavailable) as info:
        datasets.load("mnist", data_dir=cache, mirrors=mirrors, timeout=5)
    message = str(info.value)
    for name in files:
        assert name in message
    assert str(cache) in message
    for url in mirrors:
        assert url in message
    assert "SHA-256 mismatch" in message and "truncated download" in message and "404" in message
    assert sorted(info.value.files) == sorted(files) and info.value.folder == cache
    assert listing(cache) == []  # no partial file


def test_empty_mirror_list_names_folder_and_files(tmp_path, fake_mnist):
    with pytest.raises(datasets.DatasetUnavailable, match=r"(?s)train-images-idx3-ubyte\.gz.*none \(mirrors=\[\]\)"):
        datasets.download_mnist(tmp_path / "offline", mirrors=[], timeout=5)


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"real MNIST test files not present at {SHARED_MNIST}")
def test_real_test_files_verify_through_a_file_mirror(tmp_path):
    # The real t10k files pass the module's SHA-256 sums; the train files are absent
    # from the mirror, so only they are reported (a missing file does not mark the
    # mirror unreachable).
    with pytest.raises(datasets.DatasetUnavailable) as info:
        datasets.download_mnist(tmp_path, mirrors=[SHARED_MNIST.as_uri() + "/"], timeout=5)
    assert sorted(info.value.files) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    assert listing(tmp_path) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert datasets.default_cache_dir() == tmp_path / "scratchvae" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert datasets.default_cache_dir() == pathlib.Path.home() / ".cache" / "scratchvae" / "mnist"


# --------------------------------------------------------------------------
# binarization and validation


def test_binarize_dynamic_samples_bernoulli():
    p = np.full((2000, 50), 0.3, dtype=np.float32)
    p[:, 0], p[:, 1] = 0.0, 1.0
    b = datasets.binarize_dynamic(p, np.random.default_rng(3))
    assert b.dtype == np.float32 and set(np.unique(b).tolist()) == {0.0, 1.0}
    assert b[:, 0].max() == 0 and b[:, 1].min() == 1
    assert abs(float(b[:, 2:].mean()) - 0.3) < 0.01
    np.testing.assert_array_equal(datasets.binarize_static(p, 5), datasets.binarize_dynamic(p, np.random.default_rng(5)))


def test_validate_images_accepts_grayscale_for_bernoulli():
    x = np.linspace(0, 1, 20, dtype=np.float32).reshape(2, 10)
    assert datasets.validate_images(x, "bernoulli", expected_shape=10) is x


def test_validate_images_nan():
    x = np.zeros((4, 6), dtype=np.float32)
    x[2, 3] = np.nan
    x[3, 0] = np.inf
    with pytest.raises(datasets.NonFiniteImagesError, match=r"train: 1 NaN and 1 infinite.*row 2, column 3"):
        datasets.validate_images(x, "bernoulli", name="train")


def test_validate_images_range_for_bernoulli():
    x = np.zeros((3, 4), dtype=np.float32)
    x[1, 2] = 255.0
    with pytest.raises(datasets.ImageRangeError, match=r"1 value\(s\).*outside \[0.0, 1.0\].*row 1, column 2.*Bernoulli"):
        datasets.validate_images(x, "bernoulli")
    with pytest.raises(ValueError):  # the error classes are ValueErrors
        datasets.validate_images(-x, "bernoulli")


def test_validate_images_shape_and_dtype():
    with pytest.raises(datasets.ImageShapeError, match=r"2-D.*\(2, 28, 28\)"):
        datasets.validate_images(np.zeros((2, 28, 28), np.float32), "bernoulli")
    with pytest.raises(datasets.ImageShapeError, match=r"780 features.*expected 784 features \(image shape \(1, 28, 28\)\)"):
        datasets.validate_images(np.zeros((2, 780), np.float32), "bernoulli", expected_shape=(1, 28, 28))
    with pytest.raises(datasets.ImageDtypeError, match=r"uint8.*/ 255"):
        datasets.validate_images(np.zeros((2, 784), np.uint8), "bernoulli")
