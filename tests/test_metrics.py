"""BCE and exact AUC against scikit-learn and the definition."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from compemb.metrics import auc, bce


@settings(max_examples=100, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.integers(-5, 5), st.integers(0, 1)), min_size=2, max_size=60).filter(
        lambda pairs: len({label for _, label in pairs}) == 2
    )
)
def test_auc_equals_scikit_learn_with_ties(pairs):
    scores = np.array([score for score, _ in pairs], dtype=np.float64)  # few values: many ties
    labels = np.array([label for _, label in pairs])
    assert auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_on_a_large_random_set_and_tensors():
    generator = np.random.default_rng(0)
    labels = generator.integers(0, 2, 100_000)
    scores = labels * 0.3 + generator.normal(size=100_000)
    assert auc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_of_a_perfect_and_a_reversed_ranking():
    assert auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0


@pytest.mark.parametrize("labels, match", [([1, 1, 1], "both classes"), ([0, 2, 1], "0 or 1")])
def test_auc_refuses_undefined_input(labels, match):
    with pytest.raises(ValueError, match=match):
        auc(np.array([0.1, 0.2, 0.3]), np.array(labels))


def test_bce_equals_scikit_learn_log_loss():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(1000, generator=generator) * 3
    labels = torch.randint(0, 2, (1000,), generator=generator)
    expected = log_loss(labels.numpy(), torch.sigmoid(logits.double()).numpy())
    assert bce(logits, labels) == pytest.approx(expected, rel=1e-9)


def test_binned_auc_streamed_in_blocks_is_within_its_bound_of_the_exact_auc():
    from compemb.metrics import BinnedAUC

    generator = np.random.default_rng(3)
    labels = generator.integers(0, 2, 200_000)
    scores = 1 / (1 + np.exp(-(labels * 0.8 + generator.normal(size=labels.size))))
    binned = BinnedAUC()
    for block in np.array_split(np.arange(labels.size), 7):
        binned.update(scores[block], labels[block])
    exact = roc_auc_score(labels, scores)
    assert abs(binned.value() - exact) <= binned.error_bound + 1e-12
    assert binned.error_bound < 1e-4
    coarse = BinnedAUC(bins=4)  # four bins: most pairs tie, the bound says how far off it may be
    coarse.update(scores, labels)
    assert abs(coarse.value() - exact) <= coarse.error_bound and coarse.error_bound > 0.05
    distinct = BinnedAUC(bins=8)  # one score per bin: exact
    distinct.update(np.array([0.01, 0.2, 0.3, 0.6, 0.99]), np.array([0, 1, 0, 1, 1]))
    exact = roc_auc_score([0, 1, 0, 1, 1], [0.01, 0.2, 0.3, 0.6, 0.99])
    assert distinct.value() == pytest.approx(exact, abs=1e-15) and distinct.error_bound == 0


@pytest.mark.parametrize(
    "scores, labels, match",
    [
        ([0.1, 1.5], [0, 1], r"in \[0, 1\]"),
        ([0.1, float("nan")], [0, 1], r"in \[0, 1\]"),
        ([0.1, 0.2], [0, 2], "0 or 1"),
    ],
)
def test_binned_auc_refuses_what_is_not_a_probability_or_a_label(scores, labels, match):
    from compemb.metrics import BinnedAUC

    with pytest.raises(ValueError, match=match):
        BinnedAUC().update(np.array(scores), np.array(labels))
    with pytest.raises(ValueError, match="both classes"):
        empty = BinnedAUC()
        empty.update(np.array([0.3]), np.array([1]))
        empty.value()
