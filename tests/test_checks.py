"""The compiled input scan equals the tensor-op one and the plain definition."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compemb.checks import id_range, scan_bags, scan_bags_torch


@settings(max_examples=200, deadline=None)
@given(
    offsets=st.lists(st.integers(-5, 40), min_size=1, max_size=12),
    ids=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=30),
    want_range=st.booleans(),
)
def test_scan_matches_the_definition_on_both_paths(offsets, ids, want_range):
    ids_tensor, offsets_tensor = torch.tensor(ids, dtype=torch.long), torch.tensor(offsets)
    sizes = [b - a for a, b in zip(offsets, offsets[1:])] + [len(ids) - offsets[-1]]
    low, high = (min(ids), max(ids)) if want_range and ids else (0, 0)
    expected = (offsets[0], min(sizes), low, high)
    assert scan_bags(ids_tensor, offsets_tensor, want_range) == expected
    assert scan_bags_torch(ids_tensor, offsets_tensor, want_range) == expected


def test_id_range_of_any_shape_and_strides():
    ids = torch.tensor([[5, -3, 9], [2, 2**62, 0]])
    assert id_range(ids) == (-3, 2**62)
    assert id_range(ids[:, 1]) == (-3, 2**62)  # a strided column


def test_the_device_side_range_assert_passes_good_ids_and_fails_bad_ones():
    """The assert CUDA lookups use, run on CPU (where it fails at once)."""
    from compemb.checks import assert_ids_in_range

    assert_ids_in_range(torch.tensor([[0, 4], [2, 9]]), torch.tensor([3, 10]), "C1")
    for bad in ([[3, 4]], [[0, 10]], [[-1, 0]]):
        with pytest.raises(RuntimeError, match="compemb: an id of C1 is outside"):
            assert_ids_in_range(torch.tensor(bad), torch.tensor([3, 10]), "C1")
