"""`atomic_write`: all or nothing, and the permissions a plain `open(path, "wb")` gives.

The reference for a mode is a file written with a plain `open` under the same umask in
the same directory. `umask` and `open_mode` are shared with the CLI and file format tests.
"""

from __future__ import annotations

import contextlib
import os
import stat

import pytest

from clusterjax._src.atomic import atomic_write

MASKS = [0o022, 0o077, 0o027]


@contextlib.contextmanager
def umask(mask: int):
    """Sets the process umask for the block and restores it after."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def open_mode(directory) -> int:
    """The mode a plain `open(path, "wb")` gives a new file in `directory` now."""
    probe = os.path.join(directory, "plain-open-probe")
    with open(probe, "wb") as f:
        f.write(b"x")
    try:
        return mode(probe)
    finally:
        os.unlink(probe)


def _write(path, data: bytes) -> None:
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def _leftovers(directory) -> list[str]:
    return [p for p in os.listdir(directory) if p.endswith(".tmp")]


@pytest.mark.parametrize("mask", MASKS)
def test_a_new_file_gets_the_mode_of_a_plain_open(tmp_path, mask):
    with umask(mask):
        _write(tmp_path / "new.bin", b"data")
        want = open_mode(tmp_path)
    assert want == 0o666 & ~mask
    assert mode(tmp_path / "new.bin") == want
    assert (tmp_path / "new.bin").read_bytes() == b"data"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("old_mode", [0o640, 0o600, 0o664])
def test_a_replaced_file_keeps_its_mode(tmp_path, old_mode):
    path = tmp_path / "model.bin"
    path.write_bytes(b"old")
    os.chmod(path, old_mode)
    reference = tmp_path / "plain.bin"  # what open() does to an existing file
    reference.write_bytes(b"old")
    os.chmod(reference, old_mode)
    with umask(0o022):
        _write(path, b"new")
        with open(reference, "wb") as f:
            f.write(b"new")
    assert mode(path) == mode(reference) == old_mode
    assert path.read_bytes() == b"new"


def test_a_writer_that_swaps_the_temporary_file_does_not_change_the_mode(tmp_path):
    # As safetensors' save_file does: it writes its own 0o600 file and renames it over tmp.
    with umask(0o022):
        with atomic_write(tmp_path / "out.bin") as tmp:
            own = os.path.join(tmp_path, "writer-own-temp")
            fd = os.open(own, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, b"swapped")
            os.close(fd)
            os.replace(own, tmp)
        want = open_mode(tmp_path)
    assert mode(tmp_path / "out.bin") == want == 0o644
    assert (tmp_path / "out.bin").read_bytes() == b"swapped"


def test_a_symlink_is_followed_like_open_does(tmp_path):
    (tmp_path / "v1.bin").write_bytes(b"old")
    os.chmod(tmp_path / "v1.bin", 0o640)
    os.symlink("v1.bin", tmp_path / "latest.bin")
    _write(tmp_path / "latest.bin", b"new")
    assert os.path.islink(tmp_path / "latest.bin")
    assert (tmp_path / "v1.bin").read_bytes() == b"new"
    assert mode(tmp_path / "v1.bin") == 0o640
    assert _leftovers(tmp_path) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            f.write(b"half")
            raise RuntimeError("disk on fire")
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["model.bin"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(tmp_path / "new.bin"):
            raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["model.bin"]


def test_errors_name_the_destination(tmp_path):
    missing = tmp_path / "no-such-dir" / "x.bin"
    with pytest.raises(FileNotFoundError) as err:
        _write(missing, b"x")
    assert err.value.filename == str(missing)
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "inside").write_bytes(b"keep")
    with pytest.raises(OSError) as err:
        _write(tmp_path / "adir", b"x")
    assert err.value.filename == str(tmp_path / "adir")
    assert (tmp_path / "adir" / "inside").read_bytes() == b"keep"
    assert _leftovers(tmp_path) == []
