"""Round two of bad input: each case below was a traceback or read outside the data set; now one line
``compemb: error: ...`` (exit 2)."""

import gzip
import json
import shutil

import numpy as np
import pytest

from compemb.cli import main
from compemb.data.criteo import Rejections, read_rows
from compemb.data.dataset import DatasetError, open_dataset
from compemb.data.synthetic import SyntheticConfig, generate_synthetic
from tests.cli_errors import one_line_error as _one_line_error


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("round2") / "synth"
    generate_synthetic(out, SyntheticConfig(rows={"train": 512, "val": 128}, scale=1e-4, seed=3), progress=False)
    return out


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--bottom", ",,,"], "bottom MLP widths: give at least one"),
        (["--bottom", ""], "bottom MLP widths: give at least one"),
        (["--device", "xla"], "compemb trains on 'cpu' or 'cuda'"),
        (["--device", "mps"], "compemb trains on 'cpu' or 'cuda'"),
        (["--device", "meta"], "compemb trains on 'cpu' or 'cuda'"),
        (["--lr", "1e308"], "more than a float32 holds"),
    ],
)
def test_train_settings_that_were_tracebacks(data, tmp_path, capsys, extra, expected):
    args = [
        "train",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "r"),
        "--method",
        "hash",
        "--compression",
        "4",
        "--dim",
        "8",
        "--batch-size",
        "128",
        "--quiet",
        *extra,
    ]
    assert expected in _one_line_error(capsys, main(args))


def test_methods_at_compression_zero_and_a_hash_mod_past_int64(tmp_path, capsys):
    assert "--compression must be a ratio >= 1" in _one_line_error(capsys, main(["methods", "--compression", "0"]))
    (tmp_path / "t.tsv").write_text("\t".join(["0"] * 14 + ["a"] * 26) + "\n")
    line = _one_line_error(
        capsys,
        main(
            [
                "preprocess",
                "criteo",
                str(tmp_path / "t.tsv"),
                "--out",
                str(tmp_path / "p"),
                "--hash-mod",
                "99999999999999999999",
            ]
        ),
    )
    assert "hash_mod must be in [1, 2^62)" in line


def _edited(data, tmp_path, edit):
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest, copy)
    (copy / "manifest.json").write_text(json.dumps(manifest) if isinstance(manifest, dict) else manifest)
    return copy


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda m, d: m.update(cardinalities=[10**400] * 26), "cardinalities[0] = a 401-digit number"),
        (
            lambda m, d: m.update(rows={"train": 512, "val": 128, "../outside": 128}),
            "split name '../outside' is not a plain name",
        ),
        (lambda m, d: m.update(rows={"train": 512, "/etc": 128}), "split name '/etc' is not a plain name"),
        (
            lambda m, d: m.update(bags=[{"name": "../../../x", "cardinality": 5, "pooling": "sum"}]),
            "bag name '../../../x' is not a plain name",
        ),
        (lambda m, d: m.update(bags=[{"cardinality": 5, "pooling": "sum"}]), "bag name None is not a plain name"),
        (lambda m, d: m.update(bags=[{"name": "B1", "cardinality": 5, "pooling": "max"}]), "pooling sum or mean"),
        (lambda m, d: m.update(unlabeled=["../x"]), "unlabeled split name '../x'"),
    ],
)
def test_a_manifest_that_would_read_outside_its_set_or_overflow_is_refused(data, tmp_path, capsys, edit, expected):
    outside = tmp_path / "outside"  # what an escaping name would have read
    shutil.copytree(data / "val", outside)
    copy = _edited(data, tmp_path, edit)
    with pytest.raises(DatasetError, match=expected.replace("[", r"\[").replace("(", r"\(")):
        open_dataset(copy)
    line = _one_line_error(
        capsys, main(["train", "--data", str(copy), "--out", str(tmp_path / "r"), "--method", "full", "--quiet"])
    )
    assert "manifest.json" in line


def test_a_deeply_nested_manifest_is_one_line(data, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    (copy / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DatasetError, match="not a compemb manifest"):
        open_dataset(copy)


@pytest.mark.parametrize(
    "content", [b"\x1f\x8b\x08\x00garbage and more garbage", gzip.compress(bytes(range(256)) * 40)[:200]]
)
def test_a_garbled_or_cut_gzip_input_is_one_line(tmp_path, content):
    path = tmp_path / "in.tsv"
    path.write_bytes(content)
    with pytest.raises((ValueError, OSError)) as raised:  # BadGzipFile is an OSError: both are one line
        list(read_rows(path, True, Rejections(), strict=False))
    assert str(path) in str(raised.value) or "gzip" in str(raised.value).lower()
    from compemb.export import has_label_column

    with pytest.raises((ValueError, OSError)):
        has_label_column(path)


def test_a_manifest_with_a_plain_name_still_opens(data):
    manifest, splits = open_dataset(data)
    assert set(splits) == {"train", "val"} and len(splits["train"]) == 512
    assert np.asarray(splits["val"].labels).size == 128
