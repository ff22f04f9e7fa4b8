"""The plain reference loop's DLRM is the model compemb's DLRM builds, and its init is the DLRM reference's."""

import math

import pytest
import torch

from compemb.bench.plain_loop import PlainDLRM
from compemb.collection import EmbeddingCollection, Feature
from compemb.models.dlrm import DLRM


def test_plain_dlrm_computes_what_compembs_dlrm_computes_with_the_same_weights():
    cardinalities = [5, 7, 300]
    ours = DLRM(
        EmbeddingCollection([Feature(f"C{i}", n) for i, n in enumerate(cardinalities)], 4, "full"), 3, (8, 6), (8,)
    )
    plain = PlainDLRM(cardinalities, 3, 4, (8, 6), (8,), init="dlrm")
    weights = dict(ours.named_parameters())
    with torch.no_grad():
        for i, table in enumerate(plain.tables):
            table.weight.copy_(weights[f"embeddings.embeddings.C{i}.weight"])
        for name, parameter in [
            *plain.bottom.named_parameters(prefix="bottom"),
            *plain.top.named_parameters(prefix="top"),
        ]:
            parameter.copy_(weights[name])
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(32, 3, generator=generator)
    sparse = torch.stack([torch.randint(0, n, (32,), generator=generator) for n in cardinalities], dim=1)
    torch.testing.assert_close(plain(dense, sparse), ours(dense, sparse))


def test_plain_tables_start_at_the_dlrm_reference_scale():
    plain = PlainDLRM([100, 40_000], 3, 16, (8,), (8,), init="dlrm")
    for table, n in zip(plain.tables, [100, 40_000]):
        bound = math.sqrt(1 / n)
        assert float(table.weight.detach().abs().max()) <= bound
        assert float(table.weight.detach().std()) == pytest.approx(bound / math.sqrt(3), rel=0.1)
