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
    config = TrainConfig(data=str(data), out=str(out), method=method, compression=compression, bottom=(16,),
                         top=(16,), embedding_dim=8, batch_size=512, evals_per_epoch=2, optimizer="adagrad",
                         lr=0.05, sharing="shared", method_options=options)
    trainer = Trainer(config)
    trainer.fit()
    trainer.load(out / "checkpoints" / "best")  # what export reads
    trainer.model.eval()
    return trainer


def _test_rows(data: Path):
    _, splits = open_dataset(data)
    test = splits["test"]
    return torch.from_numpy(np.array(test.dense)), torch.from_numpy(np.array(test.sparse, dtype=np.int64))


@pytest.mark.parametrize("method, compression, options", [
    ("full", None, {}), ("hash", 20, {}), ("cce", 8, {"cluster_every": 4}), ("cafe-ml", 8, {}), ("adaembed", 4, {}),
    ("offline", 8, {}), ("tt", 20, {}), ("mde", 4, {}), ("dhe", 20, {}),
])
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
    assert main(["predict", "--model", str(tmp_path / "model.compemb"), "--input", str(SAMPLE), "--labeled",
                 "--out", str(tmp_path / "scores.txt")]) == 0
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
    assert main(["predict", "--model", str(tmp_path / "model.compemb"), "--input", str(SAMPLE),
                 "--out", str(tmp_path / "scores.txt")]) == 0  # no --labeled: the 40 fields say so
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
    assert main(["predict", "--model", str(tmp_path / "model.compemb"), "--input", str(unlabeled),
                 "--out", str(tmp_path / "u.txt")]) == 0
    out = capsys.readouterr().out
    assert "5 of 5 lines scored" in out and "log loss" not in out and "label column" not in out
    (tmp_path / "odd.txt").write_text("1\t2\t3\n")
    assert main(["predict", "--model", str(tmp_path / "model.compemb"), "--input", str(tmp_path / "odd.txt"),
                 "--out", str(tmp_path / "o.txt")]) == 2
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
    assert main(["predict", "--model", str(tmp_path / "short.compemb"), "--input", str(SAMPLE), "--labeled",
                 "--out", str(tmp_path / "s.txt")]) == 2
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
