"""Synthetic Criteo-like data: determinism, the planted teacher, and the Bayes limit it reports."""

import numpy as np
import pytest

from compemb.data.dataset import open_dataset
from compemb.data.synthetic import CRITEO_KAGGLE_CARDINALITIES, SyntheticConfig, Teacher, generate_synthetic
from compemb.metrics import auc

SMALL = SyntheticConfig(rows={"train": 30_000, "val": 5_000}, chunk_rows=7_000, seed=3)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    generate_synthetic(out, SMALL, progress=False)
    return open_dataset(out)


def test_cardinalities_scale_criteo_kaggle_and_keep_small_features():
    cards = SyntheticConfig(scale=1e-3).cardinalities()
    assert len(cards) == 26 and 33_000 < sum(cards) < 35_000
    assert cards[2] == 10_132 and cards[8] == 3  # 10,131,227 / 1000 rounded up; 3 stays 3
    assert SyntheticConfig(scale=1.0).cardinalities() == list(CRITEO_KAGGLE_CARDINALITIES)


def test_the_same_config_gives_the_same_bytes_and_another_seed_does_not(small_set, tmp_path):
    manifest, splits = small_set
    generate_synthetic(tmp_path / "again", SMALL, progress=False)
    _, again = open_dataset(tmp_path / "again")
    for name in ("dense", "sparse", "labels"):
        assert np.array_equal(getattr(splits["train"], name), getattr(again["train"], name))
    other = SyntheticConfig(rows={"train": 1000}, seed=4)
    generate_synthetic(tmp_path / "other", other, progress=False)
    assert not np.array_equal(open_dataset(tmp_path / "other")[1]["train"].sparse, splits["train"].sparse[:1000])


def test_manifest_bayes_figures_are_the_teachers_on_the_written_labels(small_set):
    manifest, splits = small_set
    teacher = Teacher(SMALL)
    for name, split in splits.items():
        p = teacher.probabilities(np.asarray(split.dense), np.asarray(split.sparse, dtype=np.int64))
        y = np.asarray(split.labels)
        bce = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
        assert manifest["bayes"][name]["bce"] == pytest.approx(bce, rel=1e-9)
        assert manifest["bayes"][name]["auc"] == pytest.approx(auc(p, y), abs=1e-12)


def test_click_rate_is_calibrated_and_the_task_is_learnable(small_set):
    manifest, splits = small_set
    train = manifest["bayes"]["train"]
    assert train["click_rate"] == pytest.approx(0.25, abs=0.015)
    rate = train["click_rate"]
    constant_bce = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    assert train["bce"] < 0.9 * constant_bce  # the features carry real signal
    assert 0.75 < train["auc"] < 0.97


def test_ids_follow_zipf_within_their_cardinalities(small_set):
    manifest, splits = small_set
    sparse = np.asarray(splits["train"].sparse)
    cards = np.array(manifest["cardinalities"])
    assert (sparse >= 0).all() and (sparse < cards).all()
    column = int(np.argmax(cards))  # the largest feature
    counts = np.sort(np.bincount(sparse[:, column], minlength=cards[column]))[::-1]
    n = cards[column]
    expected_top = 1 / np.sum(1.0 / np.arange(1, n + 1) ** SMALL.zipf)
    assert counts[0] / len(sparse) == pytest.approx(expected_top, rel=0.1)
    assert counts[0] > 5 * counts[9]  # rank 10 is (1/10)^1.1 as likely as rank 1


def test_first_order_share_mixes_the_two_normalised_parts():
    dense_rows = np.random.default_rng(0)
    for share in (0.0, 1.0):
        teacher = Teacher(SyntheticConfig(rows={"train": 10}, first_order=share, seed=2))
        dense, sparse = teacher.sample_features(dense_rows, 5_000)
        interactions, first_order = teacher._parts(dense, sparse)
        expected = first_order / teacher.first_order_sd if share else interactions / teacher.interaction_sd
        np.testing.assert_allclose(teacher.raw_logits(dense, sparse), expected)
        assert teacher.raw_logits(dense, sparse).std() == pytest.approx(1.0, rel=0.05)


def test_drift_rotates_popularity_along_the_stream_and_keeps_the_bayes_limits(tmp_path):
    rows = {"train": 16_000, "val": 2_000, "test": 2_000}
    config = SyntheticConfig(rows=rows, cardinalities_override=(1_000,), drift=1.0, seed=5, chunk_rows=4_000)
    facts = generate_synthetic(tmp_path / "drift", config, progress=False)
    teacher = Teacher(config)
    first = teacher.popular_ids[0]  # the planted order at the start: rank r -> id first[r]
    assert teacher.drift_ranks() == [10]  # the top 1% of 1,000 ids, all of it by the end (drift 1)
    _, splits = open_dataset(tmp_path / "drift")
    early = np.asarray(splits["train"].sparse[:2_000, 0])
    late = np.asarray(splits["test"].sparse[:, 0])
    top, gone = set(first[:10].tolist()), set(first[:9].tolist())
    share = lambda ids, chosen: float(np.isin(ids, list(chosen)).mean())  # noqa: E731
    # early the start's top 1% draws its Zipf share of the rows; in the test split (the stream's last tenth, rotated
    # by 9 ranks) nine of those ten ids have left the top 1% for the bottom of the order, and the ids that held
    # ranks 9..19 at the start have moved up
    assert share(early, top) > 0.3 and share(late, gone) < 0.01
    assert np.bincount(late, minlength=1_000).argmax() in first[9:11].tolist()
    for split in rows:  # the truth is still known
        assert 0 < facts["bayes"][split]["bce"] < 0.7
    # no drift: the start's top 1% keeps its share to the end
    still = SyntheticConfig(rows=rows, cardinalities_override=(1_000,), seed=5, chunk_rows=4_000)
    generate_synthetic(tmp_path / "still", still, progress=False)
    _, steady = open_dataset(tmp_path / "still")
    assert share(np.asarray(steady["test"].sparse[:, 0]), top) > 0.3
