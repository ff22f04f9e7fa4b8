"""DLRM and DCN-v2: shapes, the interaction they compute, gradients, and that they can learn."""

import pytest
import torch

from compemb.collection import EmbeddingCollection, Feature
from compemb.models import DLRM, DCNv2

FEATURES = [Feature(f"C{i}", 50 + 10 * i) for i in range(5)]


def _collection(method="hash", **options):
    budget = {} if method == "full" else {"compression": 2}
    return EmbeddingCollection(FEATURES, 8, method, seed=0, **budget, **options)


def _batch(size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    dense = torch.rand(size, 13, generator=generator)
    sparse = torch.stack([torch.randint(0, f.num_embeddings, (size,), generator=generator) for f in FEATURES], 1)
    return dense, sparse


@pytest.mark.parametrize("model_class", [DLRM, DCNv2])
def test_logits_per_sample_and_gradients_reach_every_part(model_class):
    model = (
        model_class(_collection(), bottom=(16,), top=(16,))
        if model_class is DLRM
        else model_class(_collection(), deep=(16,))
    )
    dense, sparse = _batch()
    logits = model(dense, sparse)
    assert logits.shape == (32,)
    logits.sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and bool(param.grad.abs().sum() > 0), name


def test_dlrm_interaction_is_every_unordered_pair_once():
    model = DLRM(_collection("full"), bottom=(16,), top=(16,))
    dense, sparse = _batch(4)
    assert model.num_interactions == 6 * 5 // 2
    captured = {}
    model.top.register_forward_hook(lambda module, args, out: captured.setdefault("input", args[0]))
    model(dense, sparse)
    dense_vector = model.bottom(dense)
    vectors = [dense_vector] + [model.embeddings.embeddings[f.name](sparse[:, i]) for i, f in enumerate(FEATURES)]
    expected = [(vectors[i] * vectors[j]).sum(1) for i in range(6) for j in range(i + 1, 6)]
    torch.testing.assert_close(captured["input"], torch.cat([dense_vector, torch.stack(expected, 1)], 1))


def test_dlrm_defaults_are_the_criteo_kaggle_reference():
    model = DLRM(EmbeddingCollection(FEATURES, 16, "full"))
    widths = [layer.out_features for layer in model.bottom if isinstance(layer, torch.nn.Linear)]
    assert widths == [512, 256, 64, 16]
    assert [layer.out_features for layer in model.top if isinstance(layer, torch.nn.Linear)] == [512, 256, 1]


@pytest.mark.parametrize("structure", ["stacked", "parallel"])
def test_dcn_cross_layer_formula_and_structures(structure):
    model = DCNv2(_collection(), deep=(16,), cross_layers=2, structure=structure)
    x0 = torch.randn(3, model.cross[0].linear.in_features)
    layer = model.cross[0]
    torch.testing.assert_close(layer(x0, x0), x0 * (x0 @ layer.linear.weight.T + layer.linear.bias) + x0)
    assert model(*_batch(3)).shape == (3,)
    with pytest.raises(ValueError, match="structure"):
        DCNv2(_collection(), structure="diagonal")


@pytest.mark.parametrize("model_class", [DLRM, DCNv2])
def test_models_learn_a_planted_rule(model_class):
    torch.manual_seed(0)
    collection = _collection("full")
    model = (
        model_class(collection, bottom=(16,), top=(16,)) if model_class is DLRM else model_class(collection, deep=(16,))
    )
    dense, sparse = _batch(512, seed=1)
    labels = ((sparse[:, 0] % 2) == 0).float()  # clicks decided by feature C0's id parity
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.1


def test_pairwise_dots_equal_bmm_and_its_gradient():
    """DLRM's interaction: the pairs of bmm(x, x^T) exactly, and a gradient that passes gradcheck."""
    from compemb.models.dlrm import pairwise_dots

    x = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True, generator=torch.Generator().manual_seed(0))
    rows, columns = torch.triu_indices(6, 6, offset=1)
    index = rows * 6 + columns
    assert torch.equal(pairwise_dots(x, index), torch.bmm(x, x.transpose(1, 2))[:, rows, columns])
    assert torch.autograd.gradcheck(lambda v: pairwise_dots(v, index), (x,))


def test_a_model_without_dense_features_builds_quietly_and_learns_its_dense_vector():
    import warnings

    from compemb.models.mlp import mlp

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        bottom = mlp(0, [8, 4])
    out = bottom(torch.zeros(3, 0))
    assert out.shape == (3, 4) and torch.equal(out[0], out[1])  # one learned vector for every row
    out.sum().backward()
    assert bottom[2].bias.grad.abs().sum() > 0  # the constant moves with training (the first layer's bias starts 0)
