"""Synthetic Criteo-like data: determinism, the planted teacher, and the Bayes limit it reports."""

from dataclasses import replace

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


@pytest.mark.parametrize("n", [3, 10, 150, 1_000, 20_000])
@pytest.mark.parametrize("drift", [0.3, 1.0])
def test_every_feature_drifts_small_ones_included(n, drift):
    from compemb.data.drift import FeatureDrift

    feature = FeatureDrift(n, 1.1, drift, 0.0, np.random.default_rng(0).permutation(n), np.random.default_rng(1))
    m = max(1, -(-n // 100))  # the top 1%, at least one id
    start_top, end_top = set(feature.start_order[:m].tolist()), set(feature.end_order[:m].tolist())
    # at least ceil(drift x m) of the start's top m have left the end's top m: a 3-id feature's top id too
    assert len(start_top - end_top) >= -(-drift * m // 1) >= 1
    assert feature.replaced_share() == len(start_top - end_top) / m
    assert sorted(feature.end_order.tolist()) == list(range(n))  # the end order ranks every id once


def test_popularity_moves_gradually_not_as_a_conveyor():
    from compemb.data.drift import FeatureDrift

    n, rows = 1_000, 200_000
    feature = FeatureDrift(n, 1.1, 1.0, 0.0, np.random.default_rng(0).permutation(n), np.random.default_rng(1))
    top = feature.start_order[0]
    start_share = 1 / np.sum(1.0 / np.arange(1, n + 1) ** 1.1)  # the Zipf share of rank 1
    end_rank = int(np.flatnonzero(feature.end_order == top)[0])
    end_share = (1 / (end_rank + 1) ** 1.1) * start_share
    generator = np.random.default_rng(2)
    for t in (0.0, 0.3, 0.5, 0.9, 1.0):
        drawn = feature.sample(generator, np.full(rows, t))
        # the top id's traffic moves linearly from its start share to its end share
        expected = (1 - t) * start_share + t * end_share
        assert np.mean(drawn == top) == pytest.approx(expected, abs=4 * np.sqrt(expected / rows) + 1e-4)


def test_arriving_ids_are_never_drawn_before_they_arrive():
    from compemb.data.drift import FeatureDrift

    n = 2_000
    feature = FeatureDrift(n, 1.1, 1.0, 0.2, np.random.default_rng(0).permutation(n), np.random.default_rng(1))
    arriving = np.flatnonzero(feature.arrival > 0)
    assert len(arriving) == 400 and not np.isin(feature.start_order, arriving).any()
    # the start's top 1% is replaced by arriving ids first
    m = feature.top
    assert np.isin(np.setdiff1d(feature.end_order[:m], feature.start_order[:m]), arriving).all()
    generator = np.random.default_rng(3)
    for t in (0.05, 0.5, 0.95):
        drawn = feature.sample(generator, np.full(50_000, t))
        assert (feature.arrival[drawn] <= t).all()  # nothing before its arrival
        assert (feature.arrival[drawn] > 0).any()  # arrived ids are drawn


def test_drift_statistics_of_a_generated_stream_and_exact_bayes_limits(tmp_path):
    rows = {"train": 40_000, "val": 5_000, "test": 5_000}
    config = SyntheticConfig(
        rows=rows, cardinalities_override=(1_000, 300, 5), drift=1.0, new_ids=0.1, seed=5, chunk_rows=5_000
    )
    facts = generate_synthetic(tmp_path / "drift", config, progress=False)
    teacher = Teacher(config)
    assert facts["drift"]["top_replaced_share"] == [1.0, 1.0, 1.0]
    assert facts["drift"]["arriving_ids"] == [100, 30, 1]
    _, splits = open_dataset(tmp_path / "drift")
    # measured on the rows: the start's top 1% of the 1,000-id feature is not the test split's top 1%
    early = np.bincount(np.asarray(splits["train"].sparse[:4_000, 0]), minlength=1_000)
    late = np.bincount(np.asarray(splits["test"].sparse[:, 0]), minlength=1_000)
    start_top, test_top = set(np.argsort(-early)[:10].tolist()), set(np.argsort(-late)[:10].tolist())
    assert len(start_top - test_top) >= 8
    # ids training never saw: their share of the rows, counted here independently
    train_ids = [set(np.asarray(splits["train"].sparse[:, f]).tolist()) for f in range(3)]
    for split in ("val", "test"):
        ids = np.asarray(splits[split].sparse)
        unseen = sum(int((~np.isin(ids[:, f], list(train_ids[f]))).sum()) for f in range(3)) / ids.size
        assert facts["unseen_share"][split] == pytest.approx(unseen) and unseen > 0
    assert facts["unseen_share"]["test"] > facts["unseen_share"]["val"]  # arrivals accumulate along the stream
    # the truth is still the truth: the Bayes BCE is the mean log loss of the teacher's probabilities
    for split in rows:
        data = splits[split]
        p = teacher.probabilities(np.asarray(data.dense), np.asarray(data.sparse))
        y = np.asarray(data.labels)
        assert facts["bayes"][split]["bce"] == pytest.approx(
            float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()), rel=1e-4
        )
    # without drift or arrivals nothing is recorded and training sees (almost) every id
    still = generate_synthetic(tmp_path / "still", replace(config, drift=0.0, new_ids=0.0), progress=False)
    assert "drift" not in still and still["unseen_share"]["test"] < facts["unseen_share"]["test"]


def test_premise_hot_plants_strong_distinct_popular_ids_over_a_weak_tail():
    config = SyntheticConfig(
        rows={"train": 10}, cardinalities_override=(5_000, 300, 6), premise="hot", hot_ids=4, tail_scale=0.1, seed=1
    )
    teacher, plain = Teacher(config), Teacher(replace(config, premise="none"))
    for f, hot in enumerate(teacher.hot_ids()):
        assert np.array_equal(hot, teacher.popular_ids[f][:4])  # the most popular ids of the feature
        norms = np.linalg.norm(teacher.vectors[f], axis=1)
        tail = np.setdiff1d(np.arange(len(norms)), hot)
        # the tail is the mixture's vectors scaled by 0.1 (the first feature's are the plain set's: the hot ids'
        # draws come after it); the hot ids are unit normals, all different
        if f == 0:
            np.testing.assert_allclose(teacher.vectors[f][tail], 0.1 * plain.vectors[f][tail])
        assert norms[hot].mean() > 5 * norms[tail].mean()
        assert len(np.unique(teacher.vectors[f][hot], axis=0)) == len(hot)
    assert [len(h) for h in plain.hot_ids()] == [0, 0, 0]


def test_premise_clusters_puts_every_id_on_one_of_its_features_cluster_means():
    config = SyntheticConfig(
        rows={"train": 10}, cardinalities_override=(5_000, 40), premise="clusters", clusters=4, seed=1
    )
    teacher = Teacher(config)
    for vectors in teacher.vectors:
        assert len(np.unique(vectors, axis=0)) <= 4
    spread = Teacher(replace(config, premise="none"))
    assert len(np.unique(spread.vectors[0], axis=0)) == 5_000  # without the premise every id differs
    with pytest.raises(ValueError, match="premise must be one of"):
        SyntheticConfig(premise="hotter")
