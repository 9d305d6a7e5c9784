"""atomic_write: the old file or the complete new one, never a torn write."""
import os
import stat

import pytest

from scratchvae.atomic import atomic_write


def test_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.bin"
    with atomic_write(path) as f:
        f.write(b"first")
    with atomic_write(path) as f:
        f.write(b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(path.parent) == ["out.bin"]
    assert stat.S_IMODE(path.stat().st_mode) & 0o044, "readable by group/others as a normal file, not 0600"


def test_an_error_inside_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"good")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(path) as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"good"
    assert os.listdir(tmp_path) == ["out.bin"]
