"""torch.compile: a compiled DLRM trains to the eager model's weights, for full, hash, qr and ce tables."""

import shutil

import pytest
import torch

from compemb.data.synthetic import SyntheticConfig, generate_synthetic
from compemb.train import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler"
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("compile") / "data"
    generate_synthetic(path, SyntheticConfig(rows={"train": 1024, "val": 256}, scale=1e-4, seed=2), progress=False)
    return path


@pytest.mark.parametrize("method", ["full", "hash", "qr", "ce"])
def test_compiled_training_matches_eager(data, tmp_path, method):
    torch._dynamo.reset()
    trainers = {}
    for compiled in (False, True):
        config = TrainConfig(
            data=str(data),
            out=str(tmp_path / f"{method}-{compiled}"),
            method=method,
            compression=None if method == "full" else 4,
            embedding_dim=8,
            bottom=(16,),
            top=(16,),
            optimizer="adam",
            lr=0.01,
            batch_size=128,
            checkpoint_minutes=0,
            checkpoint_epochs=False,
            compile=compiled,
        )
        trainers[compiled] = Trainer(config)
        trainers[compiled].fit(stop_at=6)
    eager, compiled = trainers[False], trainers[True]
    assert compiled.train_model is not compiled.model  # trained through the compiled module
    state = compiled.model.state_dict()
    assert not any("_orig_mod" in name for name in state)  # checkpoints hold the model itself
    for name, value in eager.model.state_dict().items():
        # the compiled MLPs may round differently; six Adam steps keep that far below one step's size (lr 0.01)
        torch.testing.assert_close(state[name], value, rtol=0, atol=1e-4, msg=name)
    moved = sum(
        float((p - q).abs().max()) for p, q in zip(eager.model.parameters(), Trainer(eager.config).model.parameters())
    )
    assert moved > 1e-3  # the runs trained: the comparison is not of two untouched models


def test_building_only_a_shared_collection_marks_its_lookups_to_run_eagerly():
    import subprocess
    import sys

    # a fresh process: an earlier per-feature collection in this one has already marked them
    code = (
        "from compemb.collection import EmbeddingCollection, Feature\n"
        "EmbeddingCollection([Feature('a', 10), Feature('b', 20)], 4, 'hash', compression=2, sharing='shared')\n"
        "print(getattr(EmbeddingCollection.__dict__['forward'], '_runs_eagerly', False))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"
