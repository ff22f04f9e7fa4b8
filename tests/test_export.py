"""compemb export / load_model / predict on the shared Criteo sample: predictions equal the trained model's."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from compemb import quantize
from compemb.cli import main
from compemb.data.criteo import preprocess_criteo
from compemb.data.dataset import open_dataset
from compemb.export import ModelFileError, export_run, load_model
from compemb.train import TrainConfig, Trainer

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo-kaggle-sample" / "train.txt"
pytestmark = pytest.mark.skipif(not SAMPLE.exists(), reason=f"the shared Criteo sample is not at {SAMPLE}")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("criteo") / "data"
    preprocess_criteo(SAMPLE, out, progress=False)
    return out


def _train(data: Path, out: Path, method: str, compression: float | None, **options) -> Trainer:
    config = TrainConfig(
        data=str(data),
        out=str(out),
        method=method,
        compression=compression,
        bottom=(16,),
        top=(16,),
        embedding_dim=8,
        batch_size=512,
        evals_per_epoch=2,
        optimizer="adagrad",
        lr=0.05,
        sharing="shared",
        method_options=options,
    )
    trainer = Trainer(config)
    trainer.fit()
    trainer.load(out / "checkpoints" / "best")  # what export reads
    trainer.model.eval()
    return trainer


def _test_rows(data: Path):
    _, splits = open_dataset(data)
    test = splits["test"]
    return torch.from_numpy(np.array(test.dense)), torch.from_numpy(np.array(test.sparse, dtype=np.int64))


@pytest.mark.parametrize(
    "method, compression, options",
    [
        ("full", None, {}),
        ("hash", 20, {}),
        ("cce", 6, {"cluster_every": 4}),
        ("cafe-ml", 8, {}),
        ("adaembed", 4, {}),
        ("offline", 8, {}),
        ("tt", 20, {}),
        ("mde", 4, {}),
        ("dhe", 20, {}),
    ],
)
def test_loaded_model_predicts_exactly_as_the_trained_one(data, tmp_path, method, compression, options):
    trainer = _train(data, tmp_path / "run", method, compression, **options)
    if method == "cce":  # clustered during training: pointers and h1's seed moved, the file must carry them
        assert trainer.model.embeddings.embeddings["shared"].rounds > 0
    report = export_run(tmp_path / "run", tmp_path / "model.compemb")
    served = load_model(tmp_path / "model.compemb")
    dense, ids = _test_rows(data)
    with torch.no_grad():
        torch.testing.assert_close(served(dense, ids), trainer.model(dense, ids), rtol=0, atol=1e-6)
    assert not served.training
    if method == "adaembed":  # its per-id importance scores only steer training: left out
        assert any(key.endswith(".scores") for key in report["dropped"])
    # the file: the tables as stored, the MLPs, the vocabulary, and the header (8 bytes of length, then the JSON)
    stored = report["stored_embedding_bytes"] + report["mlp_bytes"] + report["vocabulary_bytes"]
    payload = (tmp_path / "model.compemb").read_bytes()
    assert report["file_bytes"] == len(payload) == stored + 8 + int.from_bytes(payload[:8], "little")
    if not report["dropped"]:
        assert report["stored_embedding_bytes"] == report["embedding_memory_bytes"]


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    return _train(data, out, "full", None), out


@pytest.mark.parametrize("scheme", ["int8", "pq"])
def test_quantized_export_predicts_as_the_quantized_model(data, full_run, tmp_path, scheme):
    trainer, run = full_run
    report = export_run(run, tmp_path / "q.compemb", scheme=scheme)
    served = load_model(tmp_path / "q.compemb")
    dense, ids = _test_rows(data)
    with torch.no_grad():
        expected = quantize(trainer.model, scheme)(dense, ids)
        torch.testing.assert_close(served(dense, ids), expected, rtol=0, atol=1e-6)
        fp32 = trainer.model(dense, ids)
        if scheme == "int8":  # int8 moves the logits a little; PQ's 256 centroids per subspace far more
            assert float((served(dense, ids) - fp32).abs().max()) < 0.01
        assert float(torch.corrcoef(torch.stack([served(dense, ids), fp32]))[0, 1]) > 0.8
    full_bytes = sum(f * 8 * 4 for f in open_dataset(data)[0]["cardinalities"])
    if scheme == "int8":  # (d + 4) / (4 d) of fp32 at d = 8: codes plus an fp16 scale and bias per row
        assert report["stored_embedding_bytes"] == full_bytes * 12 // 32
    fp32_report = export_run(run, tmp_path / "fp32.compemb")
    assert report["stored_embedding_bytes"] < 0.4 * fp32_report["stored_embedding_bytes"]


def test_predict_scores_raw_lines_as_the_model_scores_their_preprocessed_rows(data, full_run, tmp_path):
    trainer, run = full_run
    export_run(run, tmp_path / "model.compemb")
    assert (
        main(
            [
                "predict",
                "--model",
                str(tmp_path / "model.compemb"),
                "--input",
                str(SAMPLE),
                "--labeled",
                "--out",
                str(tmp_path / "scores.txt"),
            ]
        )
        == 0
    )
    scores = [float(line) for line in (tmp_path / "scores.txt").read_text().split()]
    manifest, _ = open_dataset(data)
    assert len(scores) == sum(manifest["rows"].values())
    train_rows, test_rows = manifest["rows"]["train"], manifest["rows"]["test"]
    dense, ids = _test_rows(data)
    with torch.no_grad():
        expected = torch.sigmoid(trainer.model(dense, ids)).double()
    got = torch.tensor(scores[train_rows : train_rows + test_rows], dtype=torch.float64)
    served = load_model(tmp_path / "model.compemb")  # in inference: no autograd graph behind its output
    assert served(dense, ids).grad_fn is None and not any(p.requires_grad for p in served.parameters())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_predict_tells_a_labelled_file_itself_and_reports_log_loss_and_auc(data, full_run, tmp_path, capsys):
    from compemb.metrics import auc

    _, run = full_run
    export_run(run, tmp_path / "model.compemb")
    capsys.readouterr()
    assert (
        main(
            [
                "predict",
                "--model",
                str(tmp_path / "model.compemb"),
                "--input",
                str(SAMPLE),
                "--out",
                str(tmp_path / "scores.txt"),
            ]
        )
        == 0
    )  # no --labeled: the 40 fields say so
    out = capsys.readouterr().out
    assert "start with a label column (40 fields)" in out
    scores = np.array([float(v) for v in (tmp_path / "scores.txt").read_text().split()])
    labels = np.array([float(line.split("\t", 1)[0]) for line in SAMPLE.read_text().splitlines()])
    assert not np.isnan(scores).any() and len(scores) == len(labels)
    p = np.clip(scores, 1e-15, 1 - 1e-15)
    log_loss = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    assert f"log loss {log_loss:.4f}, AUC {auc(scores, labels):.4f}" in out
    unlabeled = tmp_path / "test.txt"  # Kaggle's test.txt shape: no label column, no metrics
    unlabeled.write_text("".join(line.split("\t", 1)[1] + "\n" for line in SAMPLE.read_text().splitlines()[:5]))
    assert (
        main(
            [
                "predict",
                "--model",
                str(tmp_path / "model.compemb"),
                "--input",
                str(unlabeled),
                "--out",
                str(tmp_path / "u.txt"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "5 of 5 lines scored" in out and "log loss" not in out and "label column" not in out
    (tmp_path / "odd.txt").write_text("1\t2\t3\n")
    assert (
        main(
            [
                "predict",
                "--model",
                str(tmp_path / "model.compemb"),
                "--input",
                str(tmp_path / "odd.txt"),
                "--out",
                str(tmp_path / "o.txt"),
            ]
        )
        == 2
    )
    assert "has 3 tab-separated fields" in capsys.readouterr().err


def test_a_bad_line_scores_nan_and_is_counted_and_unseen_values_map_as_preprocessing_maps_them(full_run, tmp_path):
    _, run = full_run
    export_run(run, tmp_path / "model.compemb")
    lines = SAMPLE.read_text().splitlines()[:3]
    fields = lines[0].split("\t")
    unseen = [fields[0], *fields[1:14], "fedcba98", "", *fields[16:]]  # C1 never seen, C2 missing
    rows = [lines[0], "1\tnot a row", "\t".join(unseen)]
    (tmp_path / "in.txt").write_text("\n".join(rows) + "\n")
    from compemb.export import predict_file

    counts = predict_file(tmp_path / "model.compemb", tmp_path / "in.txt", tmp_path / "out.txt", labeled=True)
    out = (tmp_path / "out.txt").read_text().split()
    assert counts["rows_read"] == 3 and counts["rows_scored"] == 2 and counts["rejected"] == 1
    assert math.isnan(float(out[1])) and not math.isnan(float(out[0])) and not math.isnan(float(out[2]))
    served = load_model(tmp_path / "model.compemb")
    sparse = np.array([[int(v, 16) if v else -1 for v in unseen[14:]]], dtype=np.int64)
    _, ids = served.encode(np.zeros((1, 13), np.int64), sparse)
    assert ids[0, 0] == 1 and ids[0, 1] == 0  # rare id, missing id: as preprocessing maps them


def test_truncated_altered_and_foreign_files_are_refused(full_run, tmp_path, capsys):
    _, run = full_run
    good = tmp_path / "model.compemb"
    export_run(run, good)
    payload = good.read_bytes()
    (tmp_path / "short.compemb").write_bytes(payload[: len(payload) // 2])
    with pytest.raises(ModelFileError, match="damaged"):
        load_model(tmp_path / "short.compemb")
    altered = bytearray(payload)
    altered[-100] ^= 0xFF  # a byte of the tensors
    (tmp_path / "altered.compemb").write_bytes(bytes(altered))
    with pytest.raises(ModelFileError, match="altered"):
        load_model(tmp_path / "altered.compemb")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ModelFileError, match="not a compemb model"):
        load_model(tmp_path / "foreign.safetensors")
    # the command says it in one line, exit 2
    assert (
        main(
            [
                "predict",
                "--model",
                str(tmp_path / "short.compemb"),
                "--input",
                str(SAMPLE),
                "--labeled",
                "--out",
                str(tmp_path / "s.txt"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compemb: error:") and "short.compemb" in err[0]
    assert not (tmp_path / "s.txt").exists()


def test_export_of_a_directory_that_is_not_a_run_is_one_line(tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "m.compemb")]) == 2
    assert "is not a finished compemb run" in capsys.readouterr().err


def test_header_holds_config_and_quantization_spec(full_run, tmp_path):
    _, run = full_run
    export_run(run, tmp_path / "q.compemb", scheme="int8")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q.compemb"), framework="pt") as opened:
        header = json.loads(opened.metadata()["compemb"])
    assert header["config"]["method"] == "full" and header["ids"]["rule"] == "vocabulary"
    assert header["quantized"]["embeddings.embeddings.shared"]["scheme"] == "int8"
    with safe_open(str(tmp_path / "q.compemb"), framework="pt") as opened:
        assert not any(key.startswith("optimizer") for key in opened.keys())


def _rewrite(source: Path, target: Path, edit, resign: bool) -> None:
    """A copy of a model file whose tensors and header ``edit(tensors, header)`` changed; re-signed (a forger who
    knows the checksum's rule) or keeping the old checksum."""
    from safetensors import safe_open
    from safetensors.torch import save

    from compemb.export.model_file import signed_payload

    with safe_open(str(source), framework="pt") as opened:
        tensors = {name: opened.get_tensor(name) for name in opened.keys()}
        header = json.loads(opened.metadata()["compemb"])
    edit(tensors, header)
    if resign:
        header.pop("sha256")
        target.write_bytes(signed_payload(tensors, header))
    else:
        target.write_bytes(save(tensors, metadata={"compemb": json.dumps(header)}))


def test_the_checksum_covers_the_header_an_edited_id_rule_or_config_is_refused(full_run, tmp_path):
    _, run = full_run
    good = tmp_path / "model.compemb"
    export_run(run, good)
    assert load_model(good).header["ids"]["rule"] == "vocabulary"

    def hash_mod_rule(tensors, header):  # the file as a hash_mod model would be: only the checksum tells
        header.update(ids={"rule": "hash_mod", "hash_mod": 2})
        for name in [k for k in tensors if k.startswith("vocabulary.")]:
            del tensors[name]

    edits = {
        "rule": hash_mod_rule,
        "seed": lambda t, h: h["config"].update(seed=h["config"]["seed"] + 1),
        "step": lambda t, h: h.update(step=h["step"] + 1),
    }
    for name, edit in edits.items():
        _rewrite(good, tmp_path / f"{name}.compemb", edit, resign=False)
        with pytest.raises(ModelFileError, match="altered after it was written"):
            load_model(tmp_path / f"{name}.compemb")
    _rewrite(good, tmp_path / "same.compemb", lambda t, h: None, resign=False)  # only re-serialized: still served
    assert load_model(tmp_path / "same.compemb").header["sha256"] == load_model(good).header["sha256"]


def test_a_file_without_the_tensors_its_lookups_need_is_refused_even_when_re_signed(data, tmp_path):
    trainer = _train(data, tmp_path / "run", "adaembed", 4)
    good = tmp_path / "model.compemb"
    report = export_run(tmp_path / "run", good)
    assert report["dropped"]  # its importance scores: training-only, left out, and the model still serves
    load_model(good)

    def drop_everything(tensors, header):
        header["dropped"] = sorted(k[len("model.") :] for k in tensors if k.startswith("model."))
        for key in [k for k in tensors if k.startswith("model.")]:
            del tensors[key]

    _rewrite(good, tmp_path / "empty.compemb", drop_everything, resign=True)
    with pytest.raises(ModelFileError, match=r"does not hold the model its header describes: missing \['model\."):
        load_model(tmp_path / "empty.compemb")

    def drop_a_table(tensors, header):  # one tensor the lookups read, listed as training-only
        name = next(k for k in sorted(tensors) if k.startswith("model.embeddings.") and k.endswith("weight"))
        header["dropped"] = sorted([*header["dropped"], name[len("model.") :]])
        del tensors[name]

    _rewrite(good, tmp_path / "table.compemb", drop_a_table, resign=True)
    with pytest.raises(ModelFileError, match="which the model needs"):
        load_model(tmp_path / "table.compemb")
    assert trainer.model is not None


def test_a_forged_header_of_huge_sizes_is_refused_before_anything_is_allocated(full_run, tmp_path, capsys):
    import resource

    _, run = full_run
    good = tmp_path / "model.compemb"
    export_run(run, good)
    forgeries = {
        "cardinalities": lambda t, h: h.update(cardinalities=[10**12] * len(h["cardinalities"])),
        "dim": lambda t, h: h["config"].update(embedding_dim=10**9),
        "width": lambda t, h: h["config"].update(top=[10**7, 10**7]),
    }
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, forge in forgeries.items():
        _rewrite(good, tmp_path / f"{name}.compemb", forge, resign=True)
        with pytest.raises(ModelFileError, match="more than this machine's memory|does not hold the model"):
            load_model(tmp_path / f"{name}.compemb")
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB
    assert grown < 200_000, f"refusing the forgeries grew the peak memory by {grown:,} KiB"
    # the honest model under a --max-memory it does not fit: refused in one line, naming what it needs
    assert (
        main(
            [
                "predict",
                "--model",
                str(good),
                "--input",
                str(SAMPLE),
                "--out",
                str(tmp_path / "s.txt"),
                "--max-memory",
                "64K",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs" in err[0] and "more than --max-memory" in err[0]
    with pytest.raises(SystemExit) as exited:  # argparse's own exit
        main(
            [
                "predict",
                "--model",
                str(good),
                "--input",
                str(SAMPLE),
                "--out",
                str(tmp_path / "s.txt"),
                "--max-memory",
                "lots",
            ]
        )
    assert exited.value.code == 2
    assert "'lots' is not a size" in capsys.readouterr().err
    assert (
        main(
            [
                "predict",
                "--model",
                str(good),
                "--input",
                str(SAMPLE),
                "--out",
                str(tmp_path / "s.txt"),
                "--max-memory",
                "1G",
            ]
        )
        == 0
    )


def _first_spec(header):
    return next(iter(next(iter(header["quantized"].values()))["tables"].values()))


@pytest.mark.parametrize(
    "name, forge, expected",
    [
        (
            "pq widths of 3e8",
            lambda h: _first_spec(h).update(scheme="pq", widths=[300_000_000], centroids=256),
            "widths",
        ),
        ("pq widths of 1e11", lambda h: _first_spec(h).update(scheme="pq", widths=[10**11], centroids=256), "widths"),
        ("group_rows 0", lambda h: _first_spec(h).update(scheme="int8", group_rows=0), "group_rows"),
        ("dtype load", lambda h: _first_spec(h).update(dtype="load"), "dtype must be one of"),
        (
            "cardinalities 10^400",
            lambda h: h.update(cardinalities=[10**400] * len(h["cardinalities"])),
            "cardinalities are not a list of integers",
        ),
        ("num_dense 10^12", lambda h: h.update(num_dense=10**12), "num_dense"),
    ],
)
def test_a_forged_quantized_spec_or_header_field_is_refused_before_it_allocates(
    full_run, tmp_path, capsys, name, forge, expected
):
    """A spec's sizes were once built on the CPU before the memory check (widths of 3e8: a 5 GB peak), and a
    dtype string looked up on the torch module."""
    import resource

    _, run = full_run
    good = tmp_path / "model.compemb"
    export_run(run, good, scheme="int8")
    _rewrite(good, tmp_path / "forged.compemb", lambda tensors, header: forge(header), resign=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code = main(
        [
            "predict",
            "--model",
            str(tmp_path / "forged.compemb"),
            "--input",
            str(SAMPLE),
            "--out",
            str(tmp_path / "s.txt"),
            "--max-memory",
            "64M",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], err
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB
    assert grown < 200_000, f"refusing {name} grew the peak memory by {grown:,} KiB"


def test_a_flipped_byte_anywhere_in_a_model_file_is_refused(full_run, tmp_path):
    _, run = full_run
    good = tmp_path / "model.compemb"
    export_run(run, good)
    payload = good.read_bytes()
    index_end = 8 + int.from_bytes(payload[:8], "little")
    header_at = payload.index(b"compemb-model")  # inside the compemb header (the safetensors metadata)
    rng = np.random.default_rng(0)
    positions = [0, 3, header_at + 2, *rng.integers(8, index_end, 6), *rng.integers(index_end, len(payload), 12)]
    for position in positions:
        broken = bytearray(payload)
        broken[position] ^= 0x5A
        (tmp_path / "broken.compemb").write_bytes(bytes(broken))
        with pytest.raises(ModelFileError):
            load_model(tmp_path / "broken.compemb")


def test_a_version_1_model_file_is_refused_with_how_to_get_a_version_2(full_run, tmp_path):
    _, run = full_run
    export_run(run, tmp_path / "model.compemb")
    _rewrite(tmp_path / "model.compemb", tmp_path / "v1.compemb", lambda t, h: h.update(version=1), resign=False)
    with pytest.raises(ModelFileError, match="version 1's checksum left the header out: export the run again"):
        load_model(tmp_path / "v1.compemb")


def test_predict_on_an_input_without_newlines_stops_at_the_line_bound(full_run, tmp_path, capsys):
    _, run = full_run
    export_run(run, tmp_path / "model.compemb")
    for labeled in ([], ["--labeled"]):  # both the field-count probe and the block reader are bounded
        assert (
            main(
                [
                    "predict",
                    "--model",
                    str(tmp_path / "model.compemb"),
                    "--input",
                    "/dev/zero",
                    "--out",
                    str(tmp_path / "z.txt"),
                    *labeled,
                ]
            )
            == 2
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "/dev/zero:1: a line longer than 1,048,576 bytes" in err[0], err
        assert not (tmp_path / "z.txt").exists()


def test_predict_memory_does_not_grow_with_the_input(full_run, tmp_path):
    import tracemalloc

    from compemb.export import predict_file
    from compemb.metrics import auc

    _, run = full_run
    export_run(run, tmp_path / "model.compemb")
    lines = SAMPLE.read_bytes().splitlines(keepends=True)
    peaks, results = {}, {}
    for copies in (2, 16):
        (tmp_path / "in.txt").write_bytes(b"".join(lines) * copies)
        tracemalloc.start()
        results[copies] = predict_file(
            tmp_path / "model.compemb",
            tmp_path / "in.txt",
            tmp_path / "out.txt",
            labeled=True,
            block_bytes=1 << 16,
            overwrite=True,
        )
        peaks[copies] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert results[copies]["rows_read"] == len(lines) * copies
    # 8x the rows, (about) the same peak: the scores go to the file as they come, the AUC is counted in bins
    assert peaks[16] < 1.25 * peaks[2], peaks
    scores = np.array([float(v) for v in (tmp_path / "out.txt").read_text().split()])
    labels = np.array([float(line.split(b"\t", 1)[0]) for line in lines] * 16)
    assert abs(results[16]["auc"] - auc(scores, labels)) < 1e-5
    assert results[16]["log_loss"] == pytest.approx(results[2]["log_loss"], rel=1e-9)


def test_predict_refuses_labels_a_file_lacks_and_pipes_scores_to_standard_output(full_run, tmp_path, capsys):
    _, run = full_run
    model = tmp_path / "model.compemb"
    export_run(run, model)
    unlabeled = tmp_path / "test.txt"
    unlabeled.write_text("".join(line.split("\t", 1)[1] + "\n" for line in SAMPLE.read_text().splitlines()[:7]))
    capsys.readouterr()
    assert (
        main(
            ["predict", "--model", str(model), "--input", str(unlabeled), "--labeled", "--out", str(tmp_path / "u.txt")]
        )
        == 2
    )
    error = capsys.readouterr().err
    assert "(--labeled), but its first line has no label column (39 fields, not 40)" in error
    assert error.count("\n") == 1 and not (tmp_path / "u.txt").exists()
    assert main(["predict", "--model", str(model), "--input", str(unlabeled), "--out", str(tmp_path / "u.txt")]) == 0
    written = (tmp_path / "u.txt").read_text()
    capsys.readouterr()
    assert main(["predict", "--model", str(model), "--input", str(unlabeled), "--out", "-"]) == 0
    captured = capsys.readouterr()
    assert captured.out == written and len(written.split()) == 7  # the scores, and nothing else, on stdout
    assert "wrote standard output: 7 of 7 lines scored" in captured.err
    assert not Path("-").exists()
    assert main(["predict", "--model", str(model), "--input", "-", "--out", str(tmp_path / "v.txt")]) == 2
    assert "'-' (standard input) is not read" in capsys.readouterr().err


AVAZU = SAMPLE.parents[1] / "avazu-sample" / "train.csv"


@pytest.mark.skipif(not AVAZU.exists(), reason=f"the shared Avazu sample is not at {AVAZU}")
def test_an_avazu_model_says_at_export_what_it_scores_and_predict_says_how_to_serve_it(tmp_path, capsys):
    from compemb.data.avazu import preprocess_avazu

    preprocess_avazu(AVAZU, tmp_path / "avazu")
    assert (
        main(
            [
                "train",
                "--data",
                str(tmp_path / "avazu"),
                "--out",
                str(tmp_path / "run"),
                "--method",
                "hash",
                "--compression",
                "4",
                "--dim",
                "4",
                "--bottom",
                "4",
                "--top",
                "4",
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "m.compemb")]) == 0
    assert (
        "it scores preprocessed ids (load_model); compemb predict reads raw Criteo TSV rows only, and avazu's "
        "raw values are not kept" in capsys.readouterr().out
    )
    assert (
        main(
            ["predict", "--model", str(tmp_path / "m.compemb"), "--input", str(AVAZU), "--out", str(tmp_path / "s.txt")]
        )
        == 2
    )
    error = capsys.readouterr().err
    assert (
        "was trained on avazu data: compemb predict reads raw Criteo TSV rows; score preprocessed ids with "
        "compemb.export.load_model"
        in error
        and error.count("\n") == 1
    )
    served = load_model(tmp_path / "m.compemb")  # what it does serve: ids
    _, splits = open_dataset(tmp_path / "avazu")
    ids = torch.from_numpy(np.array(splits["test"].sparse[:5], dtype=np.int64))
    assert served(torch.zeros(5, 0), ids).shape == (5,)
