"""Atomic writes: whole files or none, with the mode any new file gets."""

import os

import pytest

from compemb.io import atomic_write_bytes, atomic_write_text


def test_a_written_file_gets_the_mode_the_umask_gives_a_new_file(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    atomic_write_bytes(tmp_path / "b.bin", b"y")
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o666 & ~old
    import torch
    from safetensors.torch import save_file

    from compemb.io import atomic_path

    with atomic_path(tmp_path / "c.safetensors") as temporary:  # a writer that makes the file itself (checkpoints)
        save_file({"x": torch.zeros(2)}, str(temporary))
    assert (tmp_path / "c.safetensors").stat().st_mode & 0o777 == 0o666 & ~old


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    from compemb.io import atomic_binary_writer

    atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_binary_writer(tmp_path / "a.txt") as file:
        file.write(b"new")
        raise RuntimeError("interrupted")
    assert (tmp_path / "a.txt").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
