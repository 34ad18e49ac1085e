"""The one atomic writer (m4fuse/io/atomic.py): complete files and folders or none, nothing
temporary left behind."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from m4fuse.io.atomic import replace_atomic, write_atomic, write_folder_atomic, write_text_atomic


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_atomic_replaces_and_cleans_up_on_error(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    write_atomic(target, lambda fh: fh.write(b"old"))
    with pytest.raises(RuntimeError):
        write_atomic(target, lambda fh: (fh.write(b"half"), _fail()), sync_dir=True)
    assert target.read_bytes() == b"old" and _names(tmp_path) == ["state.bin"]
    write_atomic(target, lambda fh: fh.write(b"new"), sync_dir=True)
    assert target.read_bytes() == b"new" and _names(tmp_path) == ["state.bin"]


def test_replace_atomic_keeps_the_suffix_for_the_writer(tmp_path: Path) -> None:
    target = tmp_path / "case_seg.nii.gz"
    seen: list[str] = []

    def save(tmp: Path) -> None:
        seen.append(tmp.name)
        nib.save(nib.Nifti1Image(np.arange(8, dtype=np.uint8).reshape(2, 2, 2), np.eye(4)), tmp)

    replace_atomic(target, save)
    assert seen[0].startswith(".tmp-") and seen[0].endswith(".nii.gz")
    assert target.read_bytes()[:2] == b"\x1f\x8b"  # gzip: the writer saw the suffix
    assert np.asarray(nib.load(target).dataobj).tolist() == np.arange(8).reshape(2, 2, 2).tolist()
    assert _names(tmp_path) == ["case_seg.nii.gz"]


def test_replace_atomic_leaves_the_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "partition.csv"
    write_text_atomic(target, "a,b\n")

    def half(tmp: Path) -> None:
        tmp.write_text("a,")
        _fail()

    with pytest.raises(RuntimeError):
        replace_atomic(target, half)
    assert target.read_text() == "a,b\n" and _names(tmp_path) == ["partition.csv"]


def test_write_folder_atomic_replaces_a_folder(tmp_path: Path) -> None:
    target = tmp_path / "cases" / "BraTS2021_00000"
    write_folder_atomic(target, lambda d: (d / "old.npy").write_bytes(b"1"))
    write_folder_atomic(target, lambda d: (d / "image.npy").write_bytes(b"2"))
    assert _names(target) == ["image.npy"] and _names(tmp_path / "cases") == ["BraTS2021_00000"]

    def half(folder: Path) -> None:
        (folder / "image.npy").write_bytes(b"3")
        _fail()

    with pytest.raises(RuntimeError):
        write_folder_atomic(target, half)
    assert (target / "image.npy").read_bytes() == b"2"
    assert _names(tmp_path / "cases") == ["BraTS2021_00000"]


def _fail() -> None:
    raise RuntimeError("write failed")
