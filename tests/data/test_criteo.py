"""Criteo preprocessing: the shared sample, every kind of bad row, gzip, hashing and the Kaggle split."""

import contextlib
import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from compemb.data.criteo import (
    REASONS,
    Rejections,
    RowError,
    kaggle_split_rows,
    parse_row,
    preprocess_criteo,
    read_rows,
    transform_dense,
)
from compemb.data.dataset import open_dataset
from compemb.data.synthetic import SyntheticConfig, generate_synthetic

SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "criteo-kaggle-sample" / "train.txt"
needs_sample = pytest.mark.skipif(not SAMPLE.exists(), reason=f"the shared Criteo sample is not at {SAMPLE}")
GOOD = "1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0a1b2c3d"] * 26) + "\n"


@needs_sample
def test_shared_sample_keeps_every_row_with_cardinalities_of_an_independent_count(tmp_path):
    facts = preprocess_criteo(SAMPLE, tmp_path / "out", progress=False)
    manifest, splits = open_dataset(tmp_path / "out")
    lines = SAMPLE.read_text().splitlines()
    assert facts["rows_read"] == facts["rows_kept"] == len(lines) and facts["rejected"]["total"] == 0
    assert sum(len(split) for split in splits.values()) == len(lines)
    for column in range(26):  # pure Python: values seen >= 3 times, plus the missing and rare ids
        counts = Counter(line.split("\t")[14 + column] for line in lines)
        expected = sum(1 for value, count in counts.items() if value and count >= 3) + 2
        assert manifest["cardinalities"][column] == expected
    first = lines[0].split("\t")
    assert splits["train"].labels[0] == int(first[0])
    np.testing.assert_allclose(
        splits["train"].dense[0], np.log1p([max(int(v or 0), 0) for v in first[1:14]]), rtol=1e-6
    )


BAD_ROWS = {
    "columns": "1\t2\t3\n",
    "label": "2" + GOOD[1:],
    "dense": GOOD.replace("\t3\t", "\t3.5\t", 1),
    "categorical": GOOD.replace("0a1b2c3d", "zzzz", 1),
}


def _write(path, text, gzipped=False):
    if gzipped:
        with gzip.open(path, "wt") as file:
            file.write(text)
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("reason", list(BAD_ROWS))
def test_each_kind_of_bad_row_is_rejected_with_its_line_and_counts_reconcile(tmp_path, reason):
    text = GOOD * 10 + BAD_ROWS[reason] + GOOD * 3
    facts = preprocess_criteo(_write(tmp_path / "in.txt", text), tmp_path / "out", progress=False)
    assert facts["rejected"]["by_reason"] == {reason: 1}
    assert facts["rejected"]["first_lines"] == {reason: [11]}
    assert facts["rows_read"] == facts["rows_kept"] + facts["rejected"]["total"] == 14
    with pytest.raises(ValueError, match=rf"in.txt:11: bad row \({reason}\)"):
        preprocess_criteo(tmp_path / "in.txt", tmp_path / "strict", strict=True, progress=False)
    assert not (tmp_path / "strict").exists()


def test_parse_row_reads_missing_values_and_refuses_wide_hex():
    label, dense, sparse = parse_row("0\t\t-4" + "\t1" * 11 + "\t" + "\t" * 25 + "ff\n")
    assert label == 0 and dense[:2] == [0, -4] and sparse[:25] == [-1] * 25 and sparse[25] == 255
    with pytest.raises(ValueError, match="at most 32 bits"):
        parse_row(GOOD.replace("0a1b2c3d", "1234567890", 1))


def test_gzip_input_equals_plain_and_truncated_or_empty_input_is_an_error(tmp_path):
    text = GOOD * 20
    preprocess_criteo(_write(tmp_path / "a.txt", text), tmp_path / "plain", progress=False)
    preprocess_criteo(_write(tmp_path / "a.gz", text, gzipped=True), tmp_path / "gz", progress=False)
    plain, gz = open_dataset(tmp_path / "plain")[1], open_dataset(tmp_path / "gz")[1]
    assert np.array_equal(plain["train"].sparse, gz["train"].sparse)
    whole = (tmp_path / "a.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="truncated"):
        preprocess_criteo(tmp_path / "cut.gz", tmp_path / "cut", progress=False)
    with pytest.raises(ValueError, match="empty"):
        preprocess_criteo(_write(tmp_path / "empty.txt", ""), tmp_path / "e", progress=False)


def test_hash_mod_takes_values_mod_m_and_gives_missing_its_own_id(tmp_path):
    row = GOOD.replace("0a1b2c3d", "", 1)  # feature 1 missing
    preprocess_criteo(_write(tmp_path / "in.txt", row * 7), tmp_path / "out", hash_mod=1000, progress=False)
    manifest, splits = open_dataset(tmp_path / "out")
    assert manifest["cardinalities"] == [1001] * 26
    assert splits["train"].sparse[0, 0] == 1000 and splits["train"].sparse[0, 1] == 0x0A1B2C3D % 1000


def test_dense_transform_and_the_kaggle_split():
    np.testing.assert_allclose(transform_dense(np.array([[-3, 0, 9]])), [[0, 0, np.log(10)]], rtol=1e-6)
    assert kaggle_split_rows(7000) == {"train": 6000, "test": 500, "val": 500}
    assert sum(kaggle_split_rows(7203).values()) == 7203


def _fields(rng):
    """One random Criteo-like line, good or bad in the ways real files are."""
    odd = 0.02 if rng.random() < 0.6 else 0.2  # most lines are plain, some are full of odd values
    label = rng.choice(["0", "1"]) if rng.random() > odd else rng.choice(["2", "", "01"])
    dense = [
        rng.choice(["", str(rng.integers(-5, 10**6)), "3.5", "+5", " 5", "1_0", "-", "9" * 19, "٣"])
        if rng.random() < odd
        else str(rng.integers(0, 1000))
        for _ in range(13)
    ]
    sparse = [
        rng.choice(["", "0x1f", "ABCDEF12", "abcdef1", "123456789", "zz", " 1f", "1f\r"])
        if rng.random() < odd
        else f"{rng.integers(0, 2**32):08x}"
        for _ in range(26)
    ]
    fields = [label, *dense, *sparse]
    if rng.random() < 0.05:
        del fields[rng.integers(len(fields))]
    return "\t".join(fields)


def test_the_compiled_parser_equals_the_readable_definition_on_random_lines():
    rng = np.random.default_rng(0)
    lines = [_fields(rng) for _ in range(3000)] + ["", "\r", GOOD.rstrip("\n") + "\r"]
    data = ("\n".join(lines)).encode()  # the last line has no newline
    rejections = Rejections()
    blocks = list(read_rows_from_bytes(data, rejections, block_bytes=4096))
    status = np.concatenate([block.status for block in blocks])
    good = [line for line in lines if _reason(line) is None]
    assert len(status) == len(lines) and int((status == 0).sum()) == len(good) > 100
    for line, code in zip(lines, status):
        assert (REASONS[code - 1] if code else None) == _reason(line), line
    expected = [parse_row(line) for line in good]
    assert np.concatenate([b.labels for b in blocks]).tolist() == [row[0] for row in expected]
    assert np.concatenate([b.dense for b in blocks]).tolist() == [row[1] for row in expected]
    assert np.concatenate([b.sparse for b in blocks]).tolist() == [row[2] for row in expected]
    assert rejections.total == len(lines) - len(good)


def _reason(line):
    try:
        parse_row(line)
    except RowError as error:
        return error.reason
    return None


def read_rows_from_bytes(data, rejections, block_bytes):
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "in.txt"
        path.write_bytes(data)
        yield from read_rows(path, True, rejections, strict=False, block_bytes=block_bytes)


def test_a_synthetic_set_written_as_tsv_preprocesses_back_to_identical_arrays(tmp_path):
    config = SyntheticConfig(rows={"train": 6000, "test": 500, "val": 500}, scale=1e-4, seed=3)
    generate_synthetic(tmp_path / "synth", config, progress=False, tsv=tmp_path / "synth.tsv.gz")
    preprocess_criteo(
        tmp_path / "synth.tsv.gz", tmp_path / "back", hash_mod=max(config.cardinalities()), progress=False
    )
    (_, original), (_, back) = open_dataset(tmp_path / "synth"), open_dataset(tmp_path / "back")
    for split in ("train", "test", "val"):
        for name in ("dense", "sparse", "labels"):
            a, b = getattr(original[split], name), getattr(back[split], name)
            assert a.dtype == b.dtype and np.array_equal(a, b), (split, name)


def test_terabyte_days_split_by_day_and_rejections_are_kept_per_file(tmp_path):
    days = [_write(tmp_path / f"day_{d}", GOOD * (10 + d) + ("2" + GOOD[1:] if d == 1 else "")) for d in range(3)]
    facts = preprocess_criteo(days, tmp_path / "out", min_count=1, progress=False, days=True)
    manifest, splits = open_dataset(tmp_path / "out")
    assert manifest["rows"] == {"train": 10 + 11, "test": 6, "val": 6}
    assert facts["source"] == "criteo-terabyte" and facts["rows_read"] == 10 + (11 + 1) + 12
    assert facts["rejected"]["first_lines"] == {str(days[1]): {"label": [12]}}


def test_kaggle_test_txt_has_no_labels_and_uses_the_training_vocabulary(tmp_path):
    train = _write(tmp_path / "train.txt", GOOD * 14)
    unseen = GOOD[2:].replace("0a1b2c3d", "ffff", 1)  # no label; one value never seen in training
    test = _write(tmp_path / "test.txt", GOOD[2:] * 3 + unseen)
    facts = preprocess_criteo(train, tmp_path / "out", unlabeled=test, progress=False)
    manifest, splits = open_dataset(tmp_path / "out")
    assert manifest["rows"]["unlabeled"] == 4 and splits["unlabeled"].labels is None
    assert manifest["unlabeled"] == ["unlabeled"] and facts["rows_kept"] == 18
    ids = splits["unlabeled"].sparse
    assert ids[0].tolist() == splits["train"].sparse[0].tolist() and ids[3, 0] == 1  # unseen -> the rare id
    with pytest.raises(ValueError, match="columns"):  # a labelled file given as test.txt
        preprocess_criteo(
            train, tmp_path / "bad", unlabeled=_write(tmp_path / "labelled.txt", GOOD * 2), strict=True, progress=False
        )
    with pytest.raises(ValueError, match="given twice"):
        preprocess_criteo(train, tmp_path / "bad", unlabeled=train, progress=False)


def _mixed_rows(count, seed):
    """Good rows of varied values and lengths with a bad row of every kind among them."""
    generator = np.random.default_rng(seed)
    lines = []
    for index in range(count):
        if index % 97 == 13:
            lines.append(list(BAD_ROWS.values())[index % len(BAD_ROWS)])
            continue
        dense = [str(v) if v >= 0 else "" for v in generator.integers(-1, 50, 13)]
        sparse = [format(int(v), "x") if v % 7 else "" for v in generator.integers(0, 300, 26)]
        lines.append(f"{index % 2}\t" + "\t".join(dense) + "\t" + "\t".join(sparse) + "\n")
    return "".join(lines)


def test_byte_ranges_tile_a_file_and_read_every_line_once(tmp_path):
    path = _write(tmp_path / "train.txt", _mixed_rows(300, 0))
    size = path.stat().st_size
    whole = np.concatenate([b.sparse for b in read_rows(path, True, Rejections(), False)])
    for bounds in ([0, 1, size], [0, 500, 501, 9000, size], list(range(0, size, 777)) + [size]):
        parts = [
            b.sparse
            for start, end in zip(bounds, bounds[1:])
            for b in read_rows(path, True, Rejections(), False, start=start, end=end)
        ]
        assert np.array_equal(np.concatenate(parts), whole), bounds


@pytest.mark.parametrize("hash_mod", [None, 50])
def test_parallel_preprocessing_equals_one_process(tmp_path, hash_mod):
    """Many small ranges over 2 processes, plain and gzip days, an unlabeled file: the same data set, rejections
    and line numbers as one process reading in order."""
    days = [
        _write(tmp_path / "day_0", _mixed_rows(700, 1)),
        _write(tmp_path / "day_1.gz", _mixed_rows(400, 2), True),
        _write(tmp_path / "day_2", _mixed_rows(500, 3)),
    ]
    unlabeled = _write(
        tmp_path / "test.txt",
        "".join(line.split("\t", 1)[1] for line in _mixed_rows(200, 4).splitlines(keepends=True) if "\t" in line),
    )
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"out{processes}"
        facts = preprocess_criteo(
            days,
            out,
            hash_mod=hash_mod,
            unlabeled=unlabeled,
            progress=False,
            days=True,
            processes=processes,
            piece_bytes=4096,
        )
        results[processes] = (facts, *open_dataset(out))
    (facts_1, manifest_1, splits_1), (facts_2, manifest_2, splits_2) = results[1], results[2]
    assert facts_1["rejected"]["total"] > 0 and facts_1["rejected"] == facts_2["rejected"]
    assert manifest_1 == manifest_2
    for name, split in splits_1.items():
        for array in ("dense", "sparse", "labels"):
            assert np.array_equal(getattr(split, array), getattr(splits_2[name], array)), (name, array)


def test_the_users_own_validation_and_test_files_are_written_as_they_are(tmp_path, capsys):
    from compemb.cli import main

    train = [_write(tmp_path / "a.txt", GOOD * 9), _write(tmp_path / "b.txt", GOOD * 5 + "x\n")]
    unseen = GOOD.replace("0a1b2c3d", "ffff", 1)  # a value only the test file holds
    val, test = _write(tmp_path / "val.txt", GOOD * 3), _write(tmp_path / "test.txt", GOOD + unseen * 2)
    facts = preprocess_criteo(train, tmp_path / "out", min_count=1, val=val, test=test, progress=False)
    manifest, splits = open_dataset(tmp_path / "out")
    assert manifest["rows"] == {"train": 14, "val": 3, "test": 3} and facts["source"] == "criteo-own-splits"
    assert facts["files"][str(train[1])] == {"kept": 5, "rejected": 1} and facts["files"][str(test)]["kept"] == 3
    assert splits["test"].sparse[1, 0] == 1 and splits["test"].sparse[0, 0] == splits["train"].sparse[0, 0]
    # the CLI: each file's rows reported; several files without --days or --val/--test are refused, not guessed
    assert (
        main(
            [
                "preprocess",
                "criteo",
                *map(str, train),
                "--val",
                str(val),
                "--test",
                str(test),
                "--out",
                str(tmp_path / "cli"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"  {train[1]}: kept 5, rejected 1" in out and "splits: train 14, val 3, test 3" in out
    assert main(["preprocess", "criteo", *map(str, train), "--out", str(tmp_path / "guess")]) == 2
    assert "give --days" in capsys.readouterr().err and not (tmp_path / "guess").exists()
    assert main(["preprocess", "criteo", str(train[0]), "--val", str(val), "--out", str(tmp_path / "half")]) == 2
    assert "both --val and --test" in capsys.readouterr().err


def test_a_line_longer_than_the_bound_is_refused_naming_it_and_memory_stays_bounded(tmp_path):
    from compemb.data.criteo import Rejections, read_rows

    text = GOOD * 3 + "1\t" + "7" * 5000 + "\n" + GOOD
    source = _write(tmp_path / "long.txt", text)
    blocks = read_rows(source, True, Rejections(), strict=False, block_bytes=1024, max_line_bytes=4096)
    with pytest.raises(ValueError, match=r"long.txt:4: a line longer than 4,096 bytes"):
        list(blocks)
    rows = list(read_rows(source, True, Rejections(), strict=False, block_bytes=1024, max_line_bytes=8192))
    assert sum(len(block.status) for block in rows) == 5  # under a larger bound it is one (rejected) line
    # a byte range whose boundary falls inside the long line reads its rest with the same bound
    with pytest.raises(ValueError, match="a line longer than 4,096 bytes"):
        list(read_rows(source, True, Rejections(), strict=False, start=len(GOOD) * 3 + 10, max_line_bytes=4096))
    with pytest.raises(ValueError, match=r"zero:1: a line longer than 1,048,576 bytes"):
        next(read_rows("/dev/zero", True, Rejections(), strict=False))  # no newline, ever: one block, then refused


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not reaped by its new parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads worker pids from Linux's /proc")
def test_preprocess_workers_are_stopped_when_their_parent_is_killed():
    import os
    import signal
    import subprocess
    import sys
    import time

    # the parent runs two pool workers that would sleep 120 s each: killed, it must take them with it
    script = (
        "from tqdm import tqdm; import time; from compemb.data.criteo.pieces import run_in_processes; "
        "run_in_processes(time.sleep, [(120,), (120,)], 2, tqdm(disable=True), lambda result: 0)"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        workers: list[int] = []
        for _ in range(3000):  # until both workers are up (a fresh interpreter imports torch first: on a loaded
            # machine that alone took over a minute)
            children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
            workers = [int(pid) for pid in children.read_text().split()] if children.exists() else []
            if len(workers) == 2:
                break
            time.sleep(0.1)
        assert len(workers) == 2, "the pool never started"
        time.sleep(0.5)  # past the workers' initializer
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        for _ in range(200):  # they die at once; 20 s leaves any machine time to deliver the signal
            if not any(_alive(pid) for pid in workers):
                break
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers), "a worker outlived its killed parent"
    finally:
        parent.kill()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
