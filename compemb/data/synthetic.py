"""Synthetic Criteo-like data from a planted teacher, with the best loss any model can reach.

Each of the 26 sparse features draws ids from a Zipf law (exponent 1.1 by default) over a cardinality taken
from Criteo Kaggle's and scaled; the popularity order is a random permutation of the ids. Every id has a
teacher vector drawn from a mixture of Gaussians (ids in one component behave alike, as real ones do).
Thirteen dense features are log(1 + Gamma) counts. The teacher is DLRM-like: a dense vector (a fixed random
projection of the dense features) and the 26 teacher vectors interact by pairwise dot products (plus a
dense effect), and every id also has a first-order effect (its vector's projection on a random direction
of its feature), as real click data does. The two parts are normalised and mixed, ``first_order`` being
the first-order part's share of the variance; ``scale`` sets the logit's spread to ``signal`` and ``bias``
the click rate to ``click_rate``. Labels are Bernoulli(sigmoid(logit)).

``bag_features=B`` adds B multi-hot features ``B1..BB`` (a user's last k items, say): each row holds 0 to
``bag_size`` ids drawn from the same kind of Zipf law over ``bag_cardinality`` ids (default: the largest one-hot
feature's), and the teacher sees the mean of their teacher vectors as one more vector (interactions and a
first-order effect alike), so a model must pool the bag to reach the Bayes BCE. They are written as jagged arrays
(values + offsets) and pooled by mean.

``drift=F`` and ``new_ids=N`` make the stream non-stationary (:mod:`compemb.data.drift`): the splits are one
stream in time (train, then val, then test), every one-hot feature's popularity moves gradually from a start order
to an end order in which at least a share F of its start's top 1% has left the top 1%, and a share N of its ids
arrive along the stream (never drawn before their arrival; those arriving after the train split are never seen in
training). The teacher does not change, so each row's true probability and every split's Bayes limits are as exact
as without drift. The manifest records per feature the share of the top 1% replaced and the ids arriving, and per
split the share of rows (one-hot occurrences) whose id training never saw. Bag features do not drift.

``premise`` plants what one founding method exploits, so that it can be shown working where its premise holds:

- ``"hot"`` (CAFE's): per feature the ``hot_ids`` most popular ids carry strong, distinct vectors (independent
  standard normals, no shared component), and every other id a weak one (the mixture's vector x ``tail_scale``). A
  hashed table that puts two hot ids in one row cannot tell them apart; a row of its own for each hot id can.
- ``"clusters"`` (CCE's): every id sits exactly on one of its feature's ``clusters`` component means (no spread),
  so ids of one cluster behave identically; a table with a row per cluster and the right pointers is exact.

Because the true click probabilities are known, every split reports its **Bayes-optimal BCE and AUC**: no
model can do better than scoring with the truth. Rows are generated in chunks, each from its own seeded
stream, so any size streams to disk deterministically.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

from compemb.data.criteo.transforms import transform_dense
from compemb.data.dataset.writer import DatasetWriter, check_output
from compemb.data.drift import FeatureDrift
from compemb.io import atomic_binary_writer
from compemb.metrics import auc
from compemb.outputs import check_output_file
from compemb.progress import bar_disabled

# Criteo Kaggle's 26 categorical cardinalities (33.8M ids in all), as DLRM counts them
CRITEO_KAGGLE_CARDINALITIES = (
    1460,
    583,
    10131227,
    2202608,
    305,
    24,
    12517,
    633,
    3,
    93145,
    5683,
    8351593,
    3194,
    27,
    14992,
    5461306,
    10,
    5652,
    2173,
    4,
    7046547,
    18,
    15,
    286181,
    105,
    142572,
)
NUM_DENSE = 13
PREMISES = ("none", "hot", "clusters")


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that determines a synthetic data set (with the seed, it is reproducible)."""

    rows: dict[str, int] = field(default_factory=lambda: {"train": 2_000_000, "val": 100_000, "test": 100_000})
    scale: float = 1e-3  # cardinalities = Criteo Kaggle's x scale (at least min(original, 10))
    cardinalities_override: tuple[int, ...] | None = None  # explicit cardinalities (any number of features)
    zipf: float = 1.1
    teacher_dim: int = 8
    clusters: int = 16  # mixture components per feature
    cluster_spread: float = 0.5  # sd of an id around its component's mean (means have sd 1)
    signal: float = 2.0  # sd of the teacher's logit
    first_order: float = 0.5  # share of the logit's variance from per-id first-order effects
    click_rate: float = 0.25
    chunk_rows: int = 100_000
    seed: int = 0
    bag_features: int = 0  # multi-hot features B1.. (0: none, the Criteo-like set alone)
    bag_size: int = 5  # each row's bag holds 0..bag_size ids, uniformly
    bag_cardinality: int = 0  # ids of each bag feature (0: the largest one-hot feature's cardinality)
    drift: float = 0.0  # the least share of each feature's top-1% ids replaced by the end of the stream
    new_ids: float = 0.0  # the share of each feature's ids that arrive along the stream (compemb.data.drift)
    premise: str = "none"  # "hot" (CAFE's) or "clusters" (CCE's): what the teacher plants (see the module)
    hot_ids: int = 8  # premise "hot": the most popular ids of each feature with strong, distinct vectors
    tail_scale: float = 0.1  # premise "hot": the other ids' vectors, as a share of their usual size

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and 0 < self.scale <= 1):
            raise ValueError(f"scale must be in (0, 1] (a share of Criteo Kaggle's cardinalities), got {self.scale}")
        if any(not (isinstance(n, int) and n >= 1) for n in self.rows.values()) or "train" not in self.rows:
            raise ValueError(
                f"rows must give a positive number of rows for train (and each other split), got {self.rows}"
            )
        for name in ("zipf", "signal", "cluster_spread", "first_order", "click_rate"):  # nan passes no comparison
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if (
            self.zipf < 0
            or self.signal < 0
            or self.cluster_spread < 0
            or not 0 <= self.first_order <= 1
            or not 0 < self.click_rate < 1
        ):
            raise ValueError(
                f"need zipf, signal, cluster_spread >= 0, first_order in [0, 1] and click_rate in (0, 1), "
                f"got {self.zipf}, {self.signal}, {self.cluster_spread}, {self.first_order}, "
                f"{self.click_rate}"
            )
        if not 0 <= self.drift <= 1:
            raise ValueError(f"drift must be in [0, 1] (the share of the top-1% ids that changes), got {self.drift}")
        if not 0 <= self.new_ids < 1:
            raise ValueError(
                f"new_ids must be in [0, 1) (the share of each feature's ids that arrive along the "
                f"stream), got {self.new_ids}"
            )
        if self.premise not in PREMISES:
            raise ValueError(f"premise must be one of {', '.join(PREMISES)}, got {self.premise!r}")
        if self.hot_ids < 1 or not 0 <= self.tail_scale <= 1 or self.clusters < 1:
            raise ValueError(
                f"premise settings need hot_ids >= 1, tail_scale in [0, 1] and clusters >= 1, got "
                f"{self.hot_ids}, {self.tail_scale}, {self.clusters}"
            )
        if self.bag_features < 0 or self.bag_size < 1 or self.bag_cardinality < 0:
            raise ValueError(
                f"bag features need bag_features >= 0, bag_size >= 1 and bag_cardinality >= 0 (0: the "
                f"largest one-hot feature's), got {self.bag_features}, {self.bag_size}, "
                f"{self.bag_cardinality}"
            )

    def bags(self) -> list[dict]:
        """The multi-hot features as the data set's manifest lists them."""
        size = self.bag_cardinality or max(self.cardinalities())
        return [{"name": f"B{i + 1}", "cardinality": size, "pooling": "mean"} for i in range(self.bag_features)]

    def cardinalities(self) -> list[int]:
        """The sparse features' cardinalities: the override, else Criteo Kaggle's 26 scaled."""
        if self.cardinalities_override is not None:
            if not self.cardinalities_override or min(self.cardinalities_override) < 1:
                raise ValueError(f"cardinalities_override must be positive, got {self.cardinalities_override}")
            return list(self.cardinalities_override)
        return [max(math.ceil(n * self.scale), min(n, 10)) for n in CRITEO_KAGGLE_CARDINALITIES]


class Teacher:
    """The planted model: teacher vectors, id popularity, the dense projection, and the calibrated logit."""

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        generator = np.random.default_rng([config.seed, 0])
        self.cardinalities = config.cardinalities()
        k = config.teacher_dim
        self.vectors, self.cumulative, self.popular_ids = [], [], []
        for n in self.cardinalities:
            means = generator.normal(size=(config.clusters, k))
            component = generator.integers(0, config.clusters, n)
            spread = 0.0 if config.premise == "clusters" else config.cluster_spread
            vectors = means[component] + spread * generator.normal(size=(n, k))
            weights = 1.0 / np.arange(1, n + 1) ** config.zipf
            self.cumulative.append(np.cumsum(weights) / weights.sum())
            self.popular_ids.append(generator.permutation(n))  # popularity rank -> id
            if config.premise == "hot":  # drawn after the rest: the popularity is that of the plain set
                hot = self.popular_ids[-1][: config.hot_ids]
                vectors *= config.tail_scale
                vectors[hot] = generator.normal(size=(len(hot), k))
            self.vectors.append(vectors)
        self.dense_projection = generator.normal(size=(NUM_DENSE, k)) / math.sqrt(NUM_DENSE)
        self.dense_weights = generator.normal(size=NUM_DENSE) / math.sqrt(NUM_DENSE)
        self.gamma_shape = generator.uniform(0.3, 2.0, NUM_DENSE)
        self.first_order_directions = generator.normal(size=(len(self.cardinalities), k)) / math.sqrt(k)
        # bag features from a stream of their own: a set without them is the same as before they existed
        bag_generator = np.random.default_rng([config.seed, 3])
        self.bag_vectors, self.bag_cumulative, self.bag_popular_ids, bag_directions = [], [], [], []
        for bag in config.bags():
            n = bag["cardinality"]
            means = bag_generator.normal(size=(config.clusters, k))
            component = bag_generator.integers(0, config.clusters, n)
            self.bag_vectors.append(means[component] + config.cluster_spread * bag_generator.normal(size=(n, k)))
            weights = 1.0 / np.arange(1, n + 1) ** config.zipf
            self.bag_cumulative.append(np.cumsum(weights) / weights.sum())
            self.bag_popular_ids.append(bag_generator.permutation(n))
            bag_directions.append(bag_generator.normal(size=k) / math.sqrt(k))
        if bag_directions:
            self.first_order_directions = np.vstack([self.first_order_directions, bag_directions])
        # drift from a stream of its own: a set without it draws the same teacher
        drift_generator = np.random.default_rng([config.seed, 4])
        self.drifts = (
            [
                FeatureDrift(n, config.zipf, config.drift, config.new_ids, ids, drift_generator)
                for n, ids in zip(self.cardinalities, self.popular_ids)
            ]
            if self.drifting
            else []
        )
        self.interaction_sd = self.first_order_sd = 1.0
        self.scale, self.bias = 1.0, 0.0
        self._calibrate(np.random.default_rng([config.seed, 1]))

    def _calibrate(self, generator: np.random.Generator) -> None:
        # a sample fixes the logit's spread, then bisection fixes the bias for the click rate
        dense, sparse = self.sample_features(generator, 50_000)
        bags = self.sample_bags(generator, 50_000)
        interactions, first_order = self._parts(dense, sparse, bags)
        self.interaction_sd, self.first_order_sd = interactions.std(), first_order.std()
        raw = self.raw_logits(dense, sparse, bags)
        self.scale = self.config.signal / raw.std()
        logits = raw * self.scale
        low, high = -20.0, 20.0
        for _ in range(60):
            middle = (low + high) / 2
            if _sigmoid(logits + middle).mean() < self.config.click_rate:
                low = middle
            else:
                high = middle
        self.bias = (low + high) / 2

    def sample_features(self, generator: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Dense features (already log(1 + x)) and Zipf-distributed sparse ids for ``rows`` samples."""
        counts, sparse = self.sample_raw(generator, rows)
        return transform_dense(counts), sparse

    def hot_ids(self) -> list[np.ndarray]:
        """Per feature, the ids premise ``"hot"`` made strong (its ``hot_ids`` most popular; none otherwise)."""
        if self.config.premise != "hot":
            return [np.empty(0, dtype=np.int64) for _ in self.cardinalities]
        return [ids[: self.config.hot_ids].copy() for ids in self.popular_ids]

    @property
    def drifting(self) -> bool:
        """Whether the stream is non-stationary (drift or arriving ids)."""
        return self.config.drift > 0 or self.config.new_ids > 0

    def sample_raw(
        self, generator: np.random.Generator, rows: int, positions: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw integer dense counts (as Criteo's TSV holds them) and Zipf-distributed sparse ids; ``positions``
        (each row's place in the stream, 0 to 1) say where the popularity has drifted to, when the config drifts."""
        counts = np.floor(generator.gamma(self.gamma_shape, 10.0, size=(rows, NUM_DENSE))).astype(np.int64)
        sparse = np.empty((rows, len(self.cardinalities)), dtype=np.int64)
        for column, (cumulative, ids) in enumerate(zip(self.cumulative, self.popular_ids)):
            if positions is not None and self.drifts:
                sparse[:, column] = self.drifts[column].sample(generator, positions)
            else:
                ranks = np.minimum(np.searchsorted(cumulative, generator.random(rows), side="right"), len(ids) - 1)
                sparse[:, column] = ids[ranks]
        return counts, sparse

    def sample_bags(self, generator: np.random.Generator, rows: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every bag feature's ``(values, lengths)`` for ``rows`` rows: 0..bag_size Zipf-distributed ids a row."""
        bags = []
        for cumulative, ids in zip(self.bag_cumulative, self.bag_popular_ids):
            lengths = generator.integers(0, self.config.bag_size + 1, rows)
            ranks = np.searchsorted(cumulative, generator.random(int(lengths.sum())), side="right")
            bags.append((ids[np.minimum(ranks, len(ids) - 1)], lengths))
        return bags

    def _bag_means(self, bags: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """Each row's mean teacher vector of its bag (zeros for an empty bag), per bag feature."""
        means = []
        for (values, lengths), table in zip(bags, self.bag_vectors):
            total = np.zeros((len(lengths), table.shape[1]))
            np.add.at(total, np.repeat(np.arange(len(lengths)), lengths), table[values])
            means.append(total / np.maximum(lengths, 1)[:, None])
        return means

    def _parts(
        self, dense: np.ndarray, sparse: np.ndarray, bags: list[tuple[np.ndarray, np.ndarray]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        # pairwise interactions (with the dense effect), and the ids' first-order effects
        centred = dense - 2.0
        vectors = [centred @ self.dense_projection]
        vectors += [table[sparse[:, column]] for column, table in enumerate(self.vectors)]
        vectors += self._bag_means(bags or [])
        total = np.sum(vectors, axis=0)
        # sum over pairs i < j of <v_i, v_j> = (|sum v|^2 - sum |v|^2) / 2
        pairs = ((total**2).sum(1) - sum((v**2).sum(1) for v in vectors)) / 2
        interactions = pairs + centred @ self.dense_weights * math.sqrt(len(vectors))
        first_order = sum(v @ u for v, u in zip(vectors[1:], self.first_order_directions))
        return interactions, first_order

    def raw_logits(
        self, dense: np.ndarray, sparse: np.ndarray, bags: list[tuple[np.ndarray, np.ndarray]] | None = None
    ) -> np.ndarray:
        """The unscaled logit: normalised interactions and first-order effects, mixed by ``first_order``."""
        interactions, first_order = self._parts(dense, sparse, bags)
        share = self.config.first_order
        return (
            math.sqrt(1 - share) * interactions / self.interaction_sd
            + math.sqrt(share) * first_order / self.first_order_sd
        )

    def probabilities(
        self, dense: np.ndarray, sparse: np.ndarray, bags: list[tuple[np.ndarray, np.ndarray]] | None = None
    ) -> np.ndarray:
        """The true click probability of every row (``bags``: the bag features' ``(values, lengths)``)."""
        if len(bags or []) != len(self.bag_vectors):
            raise ValueError(f"the teacher has {len(self.bag_vectors)} bag features, {len(bags or [])} were given")
        return _sigmoid(self.raw_logits(dense, sparse, bags) * self.scale + self.bias)


def criteo_lines(labels: np.ndarray, counts: np.ndarray, ids: np.ndarray) -> bytes:
    """Rows as Criteo TSV: label, 13 integer counts, 26 ids as 8-digit hex, one line each."""
    if ids.min(initial=0) < 0 or ids.max(initial=0) > 0xFFFFFFFF:
        raise ValueError("ids must fit in 32 bits to be written as Criteo hex")
    columns = [labels.astype(str), *counts.T.astype(str), *np.char.mod("%08x", ids.T)]
    lines = columns[0]
    for column in columns[1:]:
        lines = np.char.add(np.char.add(lines, "\t"), column)
    return ("\n".join(lines.tolist()) + "\n").encode()


def _count_unseen(seen: list[np.ndarray], sparse: np.ndarray, train: bool) -> int:
    """Occurrences in ``sparse`` of ids not in ``seen``; for the train split (``train``), mark its ids seen instead."""
    total = 0
    for column, marks in enumerate(seen):
        if train:
            marks[sparse[:, column]] = True
        else:
            total += int((~marks[sparse[:, column]]).sum())
    return total


def _open_tsv(path: str | os.PathLike):
    # written under a temporary name and renamed when complete, like every output
    return atomic_binary_writer(path, gzipped=str(path).endswith(".gz"))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def generate_synthetic(
    path: str | os.PathLike,
    config: SyntheticConfig = SyntheticConfig(),
    progress: bool = True,
    tsv: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict:
    """Write a synthetic data set to ``path`` in the preprocessed format; return its manifest facts.

    The manifest records the config and, per split, the Bayes-optimal BCE and AUC and the click rate. With
    ``tsv``, the same rows are also written as Criteo TSV (gzip when the name ends in ``.gz``), splits one
    after another in the order of ``config.rows``, ids as 8-digit hex: with rows ordered train, test, val in
    DLRM's Kaggle proportions, ``preprocess_criteo(tsv, hash_mod=M)`` (M at least every cardinality) gives
    back identical arrays.
    """
    if tsv is not None and config.bag_features:
        raise ValueError("bag features cannot be written as Criteo TSV (it has one id per feature): drop tsv")
    check_output(
        path, () if tsv is None else (tsv,), overwrite=overwrite
    )  # the TSV beside the set must not be inside it
    if tsv is not None:  # nor inside another data set or run, nor a user's file (unless overwrite)
        check_output_file(tsv, "tsv", flag="--tsv", overwrite=overwrite)
    teacher = Teacher(config)
    facts: dict = {"source": "synthetic", "config": asdict(config), "bayes": {}}
    if teacher.drifting:
        facts["drift"] = {
            "top_replaced_share": [d.replaced_share() for d in teacher.drifts],
            "arriving_ids": [int((d.arrival > 0).sum()) for d in teacher.drifts],
        }
    seen = [np.zeros(n, dtype=bool) for n in teacher.cardinalities]  # ids the train split holds
    chunk_index, streamed, stream_rows, seen_train = 0, 0, sum(config.rows.values()), False
    text = _open_tsv(tsv) if tsv is not None else contextlib.nullcontext()
    with (
        DatasetWriter(
            path, config.rows, NUM_DENSE, teacher.cardinalities, bags=config.bags(), overwrite=overwrite
        ) as writer,
        text as tsv_file,
    ):
        for split, rows in config.rows.items():
            probabilities, labels_seen, unseen = [], [], 0
            bar = tqdm(total=rows, desc=f"synth {split}", unit="rows", unit_scale=True, disable=bar_disabled(progress))
            for start in range(0, rows, config.chunk_rows):
                count = min(config.chunk_rows, rows - start)
                # every chunk has a stream of its own: chunks can be made in any order, with the same result
                generator = np.random.default_rng([config.seed, 2, chunk_index])
                # the bags' own stream: the one-hot rows and labels' draws are those of a set without bags
                bags = teacher.sample_bags(np.random.default_rng([config.seed, 3, chunk_index]), count)
                chunk_index += 1
                # each row's place in the stream (splits in time order): where the popularity has drifted to
                positions = (streamed + np.arange(count)) / stream_rows if teacher.drifting else None
                streamed += count
                counts, sparse = teacher.sample_raw(generator, count, positions)
                dense = transform_dense(counts)
                probability = teacher.probabilities(dense, sparse, bags)
                labels = (generator.random(count) < probability).astype(np.uint8)
                writer.write(
                    split, dense, sparse, labels, {bag["name"]: part for bag, part in zip(config.bags(), bags)}
                )
                if tsv_file is not None:
                    tsv_file.write(criteo_lines(labels, counts, sparse))
                probabilities.append(probability)
                labels_seen.append(labels)
                unseen += _count_unseen(seen, sparse, train=split == "train")
                bar.update(count)
            bar.close()
            p, y = np.concatenate(probabilities), np.concatenate(labels_seen)
            clipped = np.clip(p, 1e-12, 1 - 1e-12)
            facts["bayes"][split] = {
                "bce": float(-(y * np.log(clipped) + (1 - y) * np.log(1 - clipped)).mean()),
                "auc": auc(p, y),
                "click_rate": float(y.mean()),
            }
            if seen_train:  # one-hot occurrences whose id the train split does not hold (splits after train)
                facts.setdefault("unseen_share", {})[split] = unseen / (rows * len(teacher.cardinalities))
            seen_train = seen_train or split == "train"
        writer.facts.update(facts)
    return facts
