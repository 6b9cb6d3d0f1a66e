"""d2c.files.NpzRows: an .npz member read by rows, equal to np.load's array, never read whole."""
import os

import numpy as np
import pytest

from d2c.files import NpzRows


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_rows_equal_np_load(tmp_path, save):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(37, 5, 4, 3), dtype=np.uint8)
    save(tmp_path / "a.npz", arr_0=arr, arr_1=rng.normal(size=(37,)), mu=np.arange(6.0))
    rows = NpzRows(tmp_path / "a.npz", "arr_0")
    assert len(rows) == 37 and rows.shape == arr.shape and rows.dtype == arr.dtype and rows.ndim == 4
    assert np.array_equal(rows[:], arr) and np.array_equal(rows[5:9], arr[5:9])
    assert np.array_equal(rows[0], arr[0]) and np.array_equal(rows[-1], arr[-1]) and np.array_equal(rows[36], arr[36])
    assert rows[40:50].shape == (0, 5, 4, 3) and np.array_equal(rows[30:], arr[30:])
    assert rows[3].flags.writeable                     # a copy: torch.from_numpy takes it without a warning
    other = NpzRows(tmp_path / "a.npz", "arr_1")       # another member of the same file, other dtype
    assert np.array_equal(other[:], np.load(tmp_path / "a.npz")["arr_1"])
    for bad in (37, -38):
        with pytest.raises(IndexError):
            rows[bad]
    with pytest.raises(KeyError):
        NpzRows(tmp_path / "a.npz", "arr_9")


def test_reads_only_the_rows_asked_for(tmp_path, monkeypatch):
    arr = np.arange(64 * 1000, dtype=np.uint8).reshape(64, 10, 100)
    np.savez(tmp_path / "a.npz", arr_0=arr)
    rows = NpzRows(tmp_path / "a.npz", "arr_0")
    read = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: read.append(n) or real(fd, n, off))
    for b in range(0, 64, 16):
        assert np.array_equal(rows[b:b + 16], arr[b:b + 16])
    assert read == [16 * 1000] * 4


def test_refused_files(tmp_path):
    np.savez(tmp_path / "o.npz", arr_0=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ValueError, match="need a C-order numeric array"):
        NpzRows(tmp_path / "o.npz", "arr_0")
    np.savez(tmp_path / "f.npz", arr_0=np.asfortranarray(np.zeros((3, 4))))
    with pytest.raises(ValueError, match="Fortran-order"):
        NpzRows(tmp_path / "f.npz", "arr_0")
