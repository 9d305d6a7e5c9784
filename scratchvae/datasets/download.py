"""Downloading MNIST: public mirrors, published SHA-256 sums, atomic writes.

Imported only when a dataset must be downloaded, so that training on the
shipped data never loads the network modules.
"""
from __future__ import annotations

import errno
import hashlib
import http.client
import os
import pathlib
import socket
import urllib.error
import urllib.request

from ..atomic import atomic_write
from .core import DatasetUnavailable
from .idx import MNIST_FILES

__all__ = ["download_mnist", "default_cache_dir", "MNIST_SHA256", "MNIST_MIRRORS"]

#: SHA-256 of each official MNIST file, byte for byte as published.
#: The two t10k sums were computed here from the published files (whose MD5
#: sums, 9fb629c4... and ec29112d..., are the well-known ones).  The two
#: train files are not available offline on the development machines, so
#: their sums are the widely published ones (TensorFlow Datasets, torchrb,
#: tensorflow-haskell, ...), which other projects pair with the well-known
#: MD5 sums f68b3c2dcbeaaa9fbdd348bbdeb94873 (train images) and
#: d53e105ee54ea40749a09fcbcd1e9432 (train labels).  Read at call time, so a
#: test may monkeypatch this dict (or pass ``sha256=`` to
#: :func:`download_mnist`).
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

#: Public mirrors of the MNIST files, tried in order.  Each is a URL prefix
#: to which a file name is appended (``file://`` URLs work too).
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

_CHUNK = 1 << 16
_UNREACHABLE_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}
_USER_AGENT = "scratchvae-datasets (python urllib)"


def default_cache_dir(name="mnist") -> pathlib.Path:
    """The folder downloads go to: ``$XDG_CACHE_HOME/scratchvae/<name>``.

    Falls back to ``~/.cache/scratchvae/<name>`` when ``XDG_CACHE_HOME`` is
    unset or not an absolute path.
    """
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = pathlib.Path(base) if base and os.path.isabs(base) else pathlib.Path.home() / ".cache"
    return root / "scratchvae" / name


def _sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _url(mirror, filename):
    return mirror.rstrip("/") + "/" + filename


def _fetch_one(opener, url, folder, filename, expected_sha256, timeout):
    """Download ``url`` to ``folder/filename`` atomically; return None or the reason it failed.

    The body goes to a temporary file in ``folder``, is checked against
    ``Content-Length`` and ``expected_sha256``, flushed and fsynced, then
    renamed over the target.  The temporary file never survives a failure.
    """
    try:
        with atomic_write(folder / filename) as out:
            request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
            with opener.open(request, timeout=timeout) as response:
                announced = response.headers.get("Content-Length")
                digest = hashlib.sha256()
                received = 0
                for block in iter(lambda: response.read(_CHUNK), b""):
                    digest.update(block)
                    out.write(block)
                    received += len(block)
            if announced is not None and announced.strip().isdigit() and received != int(announced):
                raise _Rejected(f"truncated download: received {received} of {int(announced)} bytes")
            actual = digest.hexdigest()
            if actual != expected_sha256:
                raise _Rejected(f"SHA-256 mismatch ({received} bytes): got {actual}, expected {expected_sha256}")
    except _Rejected as rejected:  # atomic_write has removed the temporary file
        return str(rejected)
    return None


class _Rejected(Exception):
    """A download that arrived but must not be kept (the message says why)."""


def _unreachable(err):
    """True for errors that say the mirror's host is down or unknown (not a bad or missing file)."""
    if isinstance(err, urllib.error.HTTPError):
        return False
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, (socket.gaierror, ConnectionRefusedError, TimeoutError)):
        return True
    return isinstance(reason, OSError) and reason.errno in _UNREACHABLE_ERRNOS


def download_mnist(data_dir=None, *, mirrors=None, sha256=None, timeout=30.0, log=None) -> pathlib.Path:
    """Make sure MNIST's four official files are in a folder, downloading what is missing.

    A file already present with the right SHA-256 is not downloaded again; a
    present file with a wrong SHA-256 is downloaded again (never used).  Each
    download is tried on every mirror in turn: a network error, an HTTP
    error, a truncated body or a hash mismatch moves on to the next mirror.
    A mirror that cannot be reached at all is skipped for the remaining files
    of this call.  Each file is written to a temporary file in the same
    folder, flushed, fsynced and atomically renamed into place, so the folder
    never holds a partial file under a final name.

    Parameters
    ----------
    data_dir : str, os.PathLike or None
        The folder; None means :func:`default_cache_dir` ``("mnist")``.
        Created if needed.
    mirrors : sequence of str or None
        URL prefixes tried in order (a file name is appended); None means
        :data:`MNIST_MIRRORS`.  ``file://`` URLs work.
    sha256 : dict or None
        File name -> expected SHA-256 hex digest; None means
        :data:`MNIST_SHA256` (read at call time).
    timeout : float
        Seconds to wait on each connection or read.
    log : callable or None
        Called with one progress message (str) at a time.

    Returns
    -------
    pathlib.Path
        The folder, holding the four verified files.

    Raises
    ------
    DatasetUnavailable
        When some file could not be obtained from any mirror; the message
        lists the files, the folder and every attempt.
    """
    folder = pathlib.Path(data_dir).expanduser() if data_dir is not None else default_cache_dir("mnist")
    if isinstance(mirrors, str):
        raise TypeError(f"mirrors must be a sequence of URL prefixes, got one string {mirrors!r}; "
                        f"wrap it in a list")
    mirrors = list(MNIST_MIRRORS if mirrors is None else mirrors)
    if not all(isinstance(m, str) for m in mirrors):
        raise TypeError(f"mirrors must be a sequence of URL prefixes (str), got {mirrors!r}")
    hashes = dict(MNIST_SHA256 if sha256 is None else sha256)
    say = log or (lambda message: None)
    filenames = list(MNIST_FILES.values())
    unknown = [f for f in filenames if f not in hashes]
    if unknown:
        raise ValueError(f"sha256 is missing the expected digest of {', '.join(unknown)}")

    needed, stale = [], {}
    if folder.is_dir():
        for filename in filenames:
            target = folder / filename
            if target.is_file():
                actual = _sha256_of(target)
                if actual == hashes[filename]:
                    say(f"{filename}: present in {folder}, SHA-256 verified")
                    continue
                stale[filename] = actual
                say(f"{filename}: present in {folder} but its SHA-256 is {actual}, expected "
                    f"{hashes[filename]}; downloading it again")
            needed.append(filename)
    else:
        needed = filenames
    if not needed:
        return folder

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DatasetUnavailable(
            f"MNIST: cannot create the folder {folder} for {', '.join(needed)} ({err}); point "
            f"--data-dir (data_dir= in Python) at a writable folder", files=needed, folder=folder) from err

    opener = urllib.request.build_opener()
    attempts, dead, failed = [], set(), []
    for filename in needed:
        for mirror in mirrors:
            url = _url(mirror, filename)
            if mirror in dead:
                attempts.append((filename, url, "skipped: mirror unreachable earlier in this call"))
                continue
            say(f"{filename}: downloading {url}")
            try:
                reason = _fetch_one(opener, url, folder, filename, hashes[filename], timeout)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
                # URLError covers HTTPError, DNS and refused connections; OSError
                # covers resets and timeouts mid-body; ValueError a malformed URL.
                reason = f"{type(err).__name__}: {err}"
                if _unreachable(err):
                    dead.add(mirror)
            if reason is None:
                say(f"{filename}: saved to {folder / filename}, SHA-256 verified")
                break
            say(f"{filename}: {url} failed ({reason})")
            attempts.append((filename, url, reason))
        else:
            failed.append(filename)

    if failed:
        lines = [f"MNIST is unavailable: could not obtain {len(failed)} of {len(filenames)} files "
                 f"for the folder {folder}.", "Files missing or unverified:"]
        for filename in failed:
            note = f"; the copy present has SHA-256 {stale[filename]} and is not used" if filename in stale else ""
            lines.append(f"  {folder / filename}  (expected SHA-256 {hashes[filename]}{note})")
        lines.append("Mirrors tried: " + (", ".join(mirrors) if mirrors else "none (mirrors=[])"))
        lines.append("Attempts:")
        lines += [f"  {url}: {reason}" for filename, url, reason in attempts if filename in failed]
        lines.append(
            f"Offline? Copy the official files ({', '.join(filenames)}) into {folder}, or point "
            f"--data-dir (data_dir= in Python) at a folder that holds them; from Python, mirrors= "
            f"also takes URL prefixes that serve them (file:// works). The 'binarized-mnist' "
            f"dataset (the default --dataset) ships with scratchvae and needs no download.")
        raise DatasetUnavailable("\n".join(lines), files=failed, folder=folder, mirrors=mirrors,
                                 attempts=attempts)
    return folder
