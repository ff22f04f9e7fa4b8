"""The registry: typed method options checked at build time, and registered variants."""

import pytest
import torch

from compemb import METHODS, make_embedding
from compemb.registry import check_options, method_options, parse_method_spec


def test_an_unknown_option_names_itself_the_method_and_its_options():
    with pytest.raises(ValueError) as error:
        make_embedding("cafe", 1000, 8, compression=4, treshold=3)
    message = str(error.value)
    assert message.startswith("cafe has no option 'treshold' (did you mean 'threshold'?); its options: ")
    assert {"hash_rate", "threshold", "tuning", "sparse"} <= set(message.split("its options: ")[1].split(", "))


@pytest.mark.parametrize(
    "method, options, fragment",
    [
        ("hash", {"sparse": "yes"}, "hash: option sparse must be bool, got str 'yes'"),
        ("cce", {"pointers": 2.5}, "cce: option pointers must be int | None, got float 2.5"),
        ("cce", {"cluster_every": True}, "cce: option cluster_every must be int | None, got bool True"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_before_building(method, options, fragment):
    with pytest.raises(ValueError, match=fragment.replace("|", r"\|").replace(".", r"\.")):
        make_embedding(method, 1000, 8, compression=4, **options)


def test_ints_are_floats_and_none_fills_an_optional():
    check_options("cafe", {"threshold": 3, "hash_rate": None})  # raises nothing
    assert make_embedding("cafe", 1000, 8, compression=4, threshold=3).threshold == 3.0


def test_every_registered_method_lists_its_options_with_types_and_defaults():
    for name, cls in METHODS.items():
        options = method_options(cls)
        assert {"mode", "sparse", "name", "init", "device"} <= set(options), name
        assert "num_embeddings" not in options and "compression" not in options
    assert method_options(METHODS["cce"])["cluster_every"].default is None  # derived from the run


def test_cce_paper_is_registered_and_is_cce_with_paper_accounting():
    assert list(METHODS).index("cce-paper") == list(METHODS).index("cce") + 1
    assert method_options(METHODS["cce-paper"])["accounting"].default == "paper"
    variant = make_embedding("cce-paper", 20_000, 16, compression=50, seed=3)
    spelled = make_embedding("cce", 20_000, 16, compression=50, seed=3, accounting="paper")
    assert variant.accounting == "paper" and variant.memory() == spelled.memory()
    ids = torch.arange(0, 20_000, 37)
    assert torch.equal(variant(ids), spelled(ids))
    check_options("cce-paper", {"cluster_every": 5, "accounting": "honest"})  # the parent's options, through it


def test_method_specs_are_checked_where_they_are_parsed():
    assert parse_method_spec("cce:accounting=paper:cluster_every=200") == (
        "cce",
        {"accounting": "paper", "cluster_every": 200},
    )
    with pytest.raises(ValueError, match="unknown method 'cafee'; did you mean 'cafe'"):
        parse_method_spec("cafee")
    with pytest.raises(ValueError, match="cce has no option 'cluster'"):
        parse_method_spec("cce:cluster=200")
