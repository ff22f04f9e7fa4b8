"""The data writers under a full disk, a file-size limit, a killed worker or an earlier writer's leftovers: one line,
nothing half-made left behind, never a crash by signal or a hang; an overwritten set is never missing."""

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from compemb.cli import main
from compemb.data.synthetic import SyntheticConfig, generate_synthetic
from compemb.io import _host, atomic_write_bytes, exchange_paths
from tests.cli_errors import one_line_error as _one_line_error

SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "criteo-kaggle-sample" / "train.txt"


def _synth(out, rows="1000", *extra):
    return ["synth", "--out", str(out), "--train-rows", rows, "--eval-rows", "100", "--scale", "1e-4", *extra]


def test_a_set_larger_than_the_free_space_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    line = _one_line_error(capsys, main(_synth(tmp_path / "huge", "100000000000")))
    need = (10**11 + 2 * 100) * (13 * 4 + 26 * 4 + 1)  # every row: 13 float32, 26 int32 ids, a uint8 label
    assert "no room for the data set" in line and f"need {need:,} bytes" in line and "are free" in line
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**6, 10**6 - 5_000, 5_000))
    line = _one_line_error(capsys, main(_synth(tmp_path / "small")))
    assert "need 188,400 bytes, 5,000 are free" in line
    assert os.listdir(tmp_path) == []


def _limited(limit: int):
    def apply() -> None:  # in the child: a write past the limit fails with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_file_size_limit_while_writing_is_one_line_not_a_bus_error(tmp_path):
    """Memory-mapped arrays past the limit once died by SIGBUS (exit 135, no message)."""
    command = [sys.executable, "-m", "compemb", *_synth(tmp_path / "s", "100000")]
    done = subprocess.run(command, preexec_fn=_limited(1_000_000), capture_output=True, text=True)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.startswith("compemb: error: no room for the data set") and "File too large" in done.stderr
    assert os.listdir(tmp_path) == []  # no .partial left


def test_a_full_small_filesystem_is_one_line_and_leaves_nothing(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root and a system that allows it")
    try:  # the arrays fit (1.3 MB), the TSV beside them does not: a plain write finds the disk full
        done = subprocess.run(
            [sys.executable, "-m", "compemb", *_synth(mount / "s", "8000", "--tsv", str(mount / "s.tsv"))],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "No space left on device" in done.stderr
        assert os.listdir(mount) == []
    finally:
        subprocess.run(["umount", str(mount)])


def test_an_earlier_writers_leftovers_are_removed_when_its_process_is_gone(tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no live process has it
    assert not Path(f"/proc/{dead}").exists()
    leftovers = [tmp_path / f".set.{dead}@{_host()}.abc.partial", tmp_path / f".scores.txt.{dead}@{_host()}.xyz"]
    leftovers[0].mkdir()
    (leftovers[0] / "big.npy").write_bytes(b"x" * 1000)
    leftovers[1].write_bytes(b"half")
    alive = tmp_path / f".set.{os.getppid()}@{_host()}.def.partial"  # a live writer's: left alone
    alive.mkdir()
    other_host = tmp_path / f".set.{dead}@elsewhere.ghi.partial"  # another host's: its pid says nothing here
    other_host.mkdir()
    generate_synthetic(tmp_path / "set", SyntheticConfig(rows={"train": 64, "val": 16}, scale=1e-4), progress=False)
    atomic_write_bytes(tmp_path / "scores.txt", b"0.5\n")
    assert not any(path.exists() for path in leftovers)
    assert alive.exists() and other_host.exists()


def test_an_overwritten_set_is_swapped_in_one_step(tmp_path, monkeypatch):
    import compemb.data.dataset.writer as writer

    out = tmp_path / "set"
    generate_synthetic(out, SyntheticConfig(rows={"train": 64, "val": 16}, scale=1e-4, seed=1), progress=False)
    swaps = []

    def exchange(a, b):
        swaps.append((Path(b) / "manifest.json").is_file())  # the old set is whole at the moment of the swap
        return exchange_paths(a, b)

    monkeypatch.setattr(writer, "exchange_paths", exchange)
    generate_synthetic(
        out, SyntheticConfig(rows={"train": 32, "val": 16}, scale=1e-4, seed=2), progress=False, overwrite=True
    )
    assert swaps == [True]
    assert (out / "train" / "labels.npy").stat().st_size < 1000 and os.listdir(tmp_path) == ["set"]


def test_exchange_paths_swaps_two_directories():
    import tempfile

    root = Path(tempfile.mkdtemp())
    (root / "a").mkdir()
    (root / "b").mkdir()
    (root / "a" / "from_a").write_text("")
    (root / "b" / "from_b").write_text("")
    if not exchange_paths(root / "a", root / "b"):
        pytest.skip("this platform has no atomic exchange (the two-step rename is used)")
    assert os.listdir(root / "a") == ["from_b"] and os.listdir(root / "b") == ["from_a"]


def _killed_worker(*args):
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.skipif(not SAMPLE.exists(), reason=f"the shared Criteo sample is not at {SAMPLE}")
def test_a_killed_preprocessing_worker_ends_the_run_in_one_line_instead_of_a_hang(tmp_path, monkeypatch):
    import compemb.data.criteo as criteo
    import compemb.data.criteo.preprocess as preprocess

    monkeypatch.setattr(preprocess, "write_piece", _killed_worker)  # forked workers inherit it
    with pytest.raises(OSError, match="a preprocessing worker process died"):
        # pieces of 256 KiB: the sample is several, so the workers (not this process) write them
        criteo.preprocess_criteo(SAMPLE, tmp_path / "out", processes=2, piece_bytes=1 << 18, progress=False)
    assert os.listdir(tmp_path) == []
