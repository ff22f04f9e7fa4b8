"""CCE: "Clustering the Sketch: Dynamic Compression for Embedding Tables", Tsang & Ahle 2023 (arXiv 2210.05974).

An id's vector is ``c`` concatenated columns; column j is ``T0[h0(x), j] + T1[h1(x), j]``, two tables of ``k`` rows
x ``d/c``. Before the first clustering both pointers are seeded hashes (CE with two tables per column). ``cluster()``
runs k-means per column on the ids' current sub-vectors, points ``h0`` at each id's nearest centroid, sets ``T0`` to
the centroids, draws a fresh hash ``h1`` and resets ``T1``. Table sizes never change.

Three registered variants share this module:

- ``cce``: the paper's algorithm with honest memory (``accounting="honest"``): every id stores its c ``h0``
  pointers in the smallest integer dtype holding k (a wider one only where a budget falls between two dtypes'
  ranges), ``h1`` is hashed and not stored, and everything counts in the budget. c pointers per id cost c bytes or
  more before any float, so at d=16 and c=4 it cannot pass 16x (8x with int16 pointers): a budget out of reach
  raises BudgetError naming the ratios it reaches and the highest.
- ``cce-paper``: the same algorithm sized as the paper's figures are: the floats alone meet the budget; the
  pointers are reported by ``memory()``, not counted.
- ``cce-hybrid`` (compemb's own CCE/CAFE hybrid): only the ``m`` ids a HotSketch scores highest hold stored
  pointers (their ids in a sorted ``holder_ids`` array, 8 bytes each, counted); every other id reads hashed rows.

Deviations and choices (the class docstring says more):

- With top-m holders, each table is split in two regions: rows ``[0, holder_rows)`` hold the holders' centroids (T0)
  and residuals (T1); rows ``[holder_rows, k)`` are a hashed region that every other id reads through fixed hashes
  and that clustering never writes. Why: overwriting T0 with centroids while an id without a pointer still read
  ``T0[h0(x)]`` handed that id an unrelated centroid at every round (measured on 20k ids at 20x, 300 holders: the
  non-holders' traffic-weighted MSE went 1.15 -> 1.87 at each clustering, worse than predicting zeros). Now an id
  that holds no pointer before and after a clustering reads exactly the same vector (tested); an id that drops out
  of the top m returns to its hashed rows. The cost: before the first clustering the holder region is idle (the
  default schedule clusters within the first 1/3 of a run). The holder region has ``holder_share`` of the rows
  (default half), fewer when k-means would have under ``MIN_POINTS_PER_CENTROID`` (39, faiss's threshold) sampled
  ids per centroid; the hashed region has the rest.
- Holders are re-chosen at every clustering from the sketch's current scores; the sketch never pins them (hot slots
  that were never evicted kept stale holders after the stream shifted: 34% of the new top-500 covered vs 53% fresh).
- Clustering picks at most ``max_points_per_centroid x k`` ids (``sample``): uniform over the vocabulary (the paper's
  code), ids seen in training (a bitmap), or ids weighted by their sketch score.
- ``h1`` is never stored: it is a seeded hash whose seed advances each round (kept in the ``cluster_state`` buffer).
- On CPU a lookup is one compiled call (route, then gather T0 + T1 per column, sweeping small tables into cache
  first) and its backward another; elsewhere torch ops. The sketch counts a strided quarter of each batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

from compemb import distributed
from compemb.budget import (
    FLOAT_BYTES,
    Budget,
    MemoryReport,
    budget_tolerance,
    check_budget,
    every_budget_from,
    resolve_budget,
)
from compemb.embeddings.adaptive import AdaptiveEmbedding, memory_report
from compemb.embeddings.base import CompressedEmbedding, init_uniform_
from compemb.embeddings.cce.batch import CCETables
from compemb.embeddings.cce.clustering import ColumnClustering
from compemb.embeddings.cce.counting import insert_sample, mark_seen_ids
from compemb.embeddings.cce.plan import SKETCH_SLOTS, CCEPlan, CCEShape, plan_tables, reserved_bytes, smallest_bytes
from compemb.embeddings.cce.routing import PointerRouting
from compemb.embeddings.cce.schedule import ClusterReport, ClusterSchedule
from compemb.embeddings.id_map import NO_ID  # free holder_ids entries sort last
from compemb.hashing import UniversalHash
from compemb.registry import register
from compemb.sketch.hotsketch import HotSketch

ACCOUNTING = ("honest", "paper")
SAMPLES = ("uniform", "seen", "frequency")
RESIDUALS = ("zeros", "mean")
H0_STREAM, H1_STREAM, COLD1_STREAM = 0, 1, 2


@register("cce")
class CCEmbedding(ColumnClustering, PointerRouting, AdaptiveEmbedding):
    """Clustered Compositional Embeddings: c columns, each ``T0[h0(x)] + T1[h1(x)]``, re-clustered during training.

    ``cluster()`` (under no_grad), per column: pick the ids to cluster (``sample``), compute their current column
    vectors, run k-means (:func:`compemb.cluster.kmeans`, k centroids, ``niter``, ``max_points_per_centroid``,
    seeded), assign every pointer-holding id to its nearest centroid in batches of ``ASSIGN_BATCH`` ids, then set
    ``h0`` to the assignment, ``T0`` to the centroids, re-seed ``h1`` and set ``T1`` to zeros (``residual="zeros"``,
    the paper) or to the mean residual of the ids in each new ``h1`` bucket (``"mean"``; empty buckets get zeros).
    The optimizer state of the whole table is reset. ``on_step_end`` clusters when ``cluster_every`` says (see
    :class:`ClusterSchedule`); the Trainer calls it, and ``on_train_begin`` with the run's length for ``until``.

    With top-m holders (below) only the holder region of the tables (``holder_rows`` of each) is clustered, into
    ``holder_rows`` centroids, and only its optimizer state is reset; the hashed region is left as it is.

    Memory: the float tables are ``2 k d`` floats. Stored pointers are ``c`` ints each, in the smallest dtype that
    holds the rows they index (uint8 up to 256, int16 up to 32,768, else int32; widened per lookup batch); index
    bytes.
    With ``accounting="honest"`` (default) pointers, sketch and bitmap count in the budget: ``pointers=None``
    gives every id stored pointers when they (with any sketch and bitmap) fit in ``pointer_share`` of the budget,
    else pointers to the ``m`` ids of highest HotSketch score (frequency, or gradient ``importance``), ``m`` being
    as many as ``pointer_share`` of the budget holds at ``c`` ints, an 8-byte id and ``sketch_slots_per_pointer``
    sketch slots each. Pointer row i belongs to ``holder_ids[i]`` (sorted; a lookup binary-searches it). The floats
    take the rest. ``pointers=m`` asks for exactly ``m``.
    With ``accounting="paper"`` the floats alone are sized to the budget; the rest is reported, not counted.

    Args:
        columns: c, dividing the embedding dim (default 4, the paper's).
        accounting: ``"honest"`` (default) or ``"paper"``.
        pointers: ids holding stored pointers (None: chosen as above; ``>= num_embeddings``: every id).
        pointer_share: the most of an honest budget stored pointers, sketch and bitmap may take (default 0.25).
        holder_share: with top-m holders, the share of each table's rows for the holders' centroids and residuals;
            the rest is the hashed region of the other ids (default 0.5).
        sample: ids k-means runs on: ``"uniform"`` over the vocabulary, ``"seen"`` in training (an ``n/8``-byte
            bitmap, counted as sketch bytes) or ``"frequency"`` (sketch items, weighted by score). Default: uniform
            when every id holds pointers, else frequency (the centroids then serve the ids that get them).
        residual: ``"zeros"`` (default, the paper) or ``"mean"``.
        importance: what the sketch scores: ``"frequency"`` (default) or ``"gradient"`` (as CAFE).
        sketch_stride: the sketch counts one occurrence in ``sketch_stride`` of each training batch (a strided
            subsample, weighted ``sketch_stride``; default 4): Space-Saving finds the heavy hitters from a sample,
            and each inserted id costs ~25 ns, as much as the rest of a lookup. 1 counts every occurrence. The
            seen-bitmap always sees every id.
        cluster_every, cluster_until: the :class:`ClusterSchedule` (default: derived from the run, every epoch
            and at least every 1/3 of it, until 3/4; ``cluster_every=0``: never, cluster() by hand).
        niter, max_points_per_centroid: k-means settings (the paper's 50 and 256).

    Example::

        >>> emb = CCEmbedding(10_000, 16, compression=4, pointers=10_000, sample="uniform")
        >>> emb.rows, emb.pointer_table.dtype, emb.memory().index_bytes  # 10,000 ids x 4 int16 pointers (+ hashes)
        (624, torch.int16, 80144)
        >>> report = emb.cluster()
        >>> report.round, report.num_pointers, emb(torch.tensor([3, 9_999])).shape
        (1, 10000, torch.Size([2, 16]))
    """

    training_only_state = ("sketch.mass",)  # score inserted since the last decay (h1's seed, in cluster_state, stays)

    title = "CCE: clustered compositional"
    formula = "2 * k * d + n * c pointers"
    hybrid = False  # cce-hybrid: stored pointers for the sketch's top ids only
    per_id_bytes = 4  # every id's c pointers, one byte each at least (uint8, k <= 256; c = 4 by default)
    num_embeddings: int  # a closed vocabulary: the base class refuses None
    pointer_table: Tensor
    holder_ids: Tensor | None
    cluster_state: Tensor
    seen: Tensor | None

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        compression: float | None = None,
        num_params: int | None = None,
        columns: int = 4,
        accounting: str = "honest",
        pointers: int | None = None,
        pointer_share: float = 0.25,
        sample: str | None = None,
        residual: str = "zeros",
        importance: str = "frequency",
        sketch_slots_per_pointer: float = 2,
        holder_share: float = 0.5,
        sketch_stride: int = 4,
        decay: float = 0.99,
        cluster_every: int | None = None,
        cluster_until: float = 0.75,
        niter: int = 50,
        max_points_per_centroid: int = 256,
        seed: int = 0,
        mode: str = "sum",
        sparse: bool = False,
        name: str | None = None,
        init: str = "dlrm",
        include_last_offset: bool = False,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            num_embeddings,
            embedding_dim,
            mode=mode,
            sparse=sparse,
            name=name,
            init=init,
            include_last_offset=include_last_offset,
            padding_idx=padding_idx,
        )
        self._start_recording(importance)
        self._set_options(
            columns,
            accounting=accounting,
            residual=residual,
            sample=sample,
            pointers=pointers,
            pointer_share=pointer_share,
            sketch_slots_per_pointer=sketch_slots_per_pointer,
            holder_share=holder_share,
            sketch_stride=sketch_stride,
            niter=niter,
            max_points_per_centroid=max_points_per_centroid,
        )
        self.schedule = ClusterSchedule(cluster_every, cluster_until)
        self._total_steps: int | None = None
        self._steps_per_epoch: int | None = None
        self.last_cluster: ClusterReport | None = None
        budget = resolve_budget(num_embeddings, embedding_dim, compression=compression, num_params=num_params)
        if not self.hybrid and pointers is not None and pointers < self.num_embeddings:
            raise ValueError(
                f"{self._who()}: every id holds pointers (the paper's algorithm); pointers={pointers} "
                "for the top ids only is cce-hybrid's option"
            )
        plan = self._plan(budget, pointers, sample)
        self.sample = sample or ("uniform" if plan.all_ids else "frequency")
        self.rows, self.all_ids, self.holder_rows = plan.rows, plan.all_ids, plan.holder_rows
        self._build_tables(plan, decay, seed, device)
        self._meet_budget(budget, plan, seed)

    def _plan(self, budget: Budget, pointers: int | None, sample: str | None) -> CCEPlan:
        """The sizes ``budget`` buys with these options (:func:`~compemb.embeddings.cce.plan.plan_tables`)."""
        shape = CCEShape(
            self.num_embeddings,
            self.embedding_dim,
            self.columns,
            self.accounting == "honest",
            self.pointer_share,
            self.holder_share,
            self.sketch_slots_per_pointer,
            self.hybrid,
        )
        return plan_tables(shape, budget, pointers, sample, budget_tolerance())

    def _set_options(
        self,
        columns: int,
        *,
        accounting: str,
        residual: str,
        sample: str | None,
        pointers: int | None,
        pointer_share: float,
        sketch_slots_per_pointer: float,
        holder_share: float,
        sketch_stride: int,
        niter: int,
        max_points_per_centroid: int,
    ) -> None:
        """Check the options (a ``ValueError`` naming the first one out of range) and keep them."""
        embedding_dim = self.embedding_dim
        if columns < 1 or embedding_dim % columns:
            raise ValueError(f"cce: columns={columns} must be >= 1 and divide embedding_dim={embedding_dim}")
        for option, value, allowed in (
            ("accounting", accounting, ACCOUNTING),
            ("residual", residual, RESIDUALS),
            ("sample", sample, (None, *SAMPLES)),
        ):
            if value not in allowed:
                raise ValueError(f"{self._who()}: {option} must be one of {allowed}, got {value!r}")
        if pointers is not None and (isinstance(pointers, bool) or not isinstance(pointers, int) or pointers < 1):
            raise ValueError(f"{self._who()}: pointers must be a positive int or None, got {pointers!r}")
        if not 0 < pointer_share < 1 or not sketch_slots_per_pointer > 0:
            raise ValueError(f"{self._who()}: pointer_share must be in (0, 1) and sketch_slots_per_pointer > 0")
        if not 0 < holder_share < 1:
            raise ValueError(f"{self._who()}: holder_share must be in (0, 1), got {holder_share!r}")
        self.holder_share = float(holder_share)
        if isinstance(sketch_stride, bool) or not isinstance(sketch_stride, int) or sketch_stride < 1:
            raise ValueError(f"{self._who()}: sketch_stride must be a positive int, got {sketch_stride!r}")
        if niter < 1 or max_points_per_centroid < 1:
            raise ValueError(f"{self._who()}: niter and max_points_per_centroid must be >= 1")
        self.columns, self.accounting, self.residual = columns, accounting, residual
        self.pointer_share, self.sketch_slots_per_pointer = float(pointer_share), float(sketch_slots_per_pointer)
        self.niter, self.max_points_per_centroid = int(niter), int(max_points_per_centroid)
        self.sketch_stride = sketch_stride

    def _build_tables(self, plan: CCEPlan, decay: float, seed: int, device: torch.device | str | None) -> None:
        """The hashes, the float tables T0 and T1, the stored pointers (and who holds them), the cluster state, the
        sketch and the seen bitmap, as ``plan`` sizes them."""
        c, k = self.columns, plan.rows
        # ids without stored pointers read the hashed region: rows [cold_offset, k) of each table (all of it when
        # every id will hold pointers); holders read centroids and residuals in rows [0, holder_rows)
        self.cold_offset = 0 if plan.all_ids else plan.holder_rows
        cold_rows = k - self.cold_offset
        self.h0 = UniversalHash(cold_rows, num_functions=c, seed=seed, stream=H0_STREAM, device=device)
        self.h1 = UniversalHash(plan.holder_rows, num_functions=c, seed=seed, stream=H1_STREAM, device=device)
        # the hashed region's T1 pointer: fixed for good (every id holding pointers: round 0's h1, as the paper)
        self.cold1 = (
            None
            if plan.all_ids
            else UniversalHash(cold_rows, num_functions=c, seed=seed, stream=COLD1_STREAM, device=device)
        )
        # column j of table t (0: T0, 1: T1) is rows [(t * c + j) * k, (t * c + j + 1) * k): one gather per lookup
        self.weight = torch.nn.Parameter(torch.empty(2 * c * k, self.embedding_dim // c, device=device))
        self.register_buffer("pointer_table", torch.empty(plan.pointers, c, dtype=plan.dtype, device=device))
        # the ids holding pointers, sorted (NO_ID in free entries): pointer row i belongs to holder_ids[i]
        self.register_buffer(
            "holder_ids", None if plan.all_ids else torch.empty(plan.pointers, dtype=torch.int64, device=device)
        )
        self.register_buffer("cluster_state", torch.empty(2, dtype=torch.int64, device=device))
        self.sketch = (
            None
            if not plan.sketch_buckets
            else HotSketch(
                plan.sketch_buckets, SKETCH_SLOTS, threshold=1.0, decay_factor=decay, seed=seed, device=device
            )
        )
        self.register_buffer(
            "seen", torch.empty(plan.bitmap_bytes, dtype=torch.uint8, device=device) if plan.bitmap_bytes else None
        )

    def _meet_budget(self, budget: Budget, plan: CCEPlan, seed: int) -> None:
        """Check the budget (honest: everything counts; paper: the floats alone) and initialise the tables."""
        columns, embedding_dim = self.columns, self.embedding_dim
        smallest = math.ceil(smallest_bytes(columns, embedding_dim, plan.bitmap_bytes) / FLOAT_BYTES)
        if self.accounting == "honest":
            self._finish(budget, seed, smallest, every_budget_from(2 * embedding_dim, reserved_bytes(plan, columns)))
        else:  # the floats alone meet the budget; everything else is reported by memory(), not counted
            self.budget, self.seed = budget, int(seed)
            floats = MemoryReport(float_bytes=self.weight.numel() * FLOAT_BYTES)
            check_budget(self.method_name, floats, budget, 2 * embedding_dim, every_budget_from(2 * embedding_dim))
            self.reset_parameters()

    def budgeted_bytes(self) -> int:
        """Paper accounting counts the float tables alone against the budget; honest accounting counts everything."""
        return self.memory().float_bytes if self.accounting == "paper" else self.memory().total

    def memory(self) -> MemoryReport:
        """Tables as floats; stored pointers, hashes and the cluster state as index bytes; sketch and bitmap apart."""
        return memory_report(self, sketch=("sketch.", "seen"))

    def describe_sizes(self) -> str:
        """k, c, who holds stored pointers and the accounting, in a line (for ``compemb methods``)."""
        held = "every id holds" if self.all_ids else f"the top {self.pointer_table.shape[0]:,} ids of a HotSketch hold"
        dtype = str(self.pointer_table.dtype).removeprefix("torch.")
        split = "" if self.all_ids else f" ({self.holder_rows:,} for holders, {self.rows - self.holder_rows:,} hashed)"
        return (
            f"k={self.rows:,} rows{split} x {self.columns} columns x 2 tables; {held} {dtype} pointers; "
            f"{self.accounting}"
        )

    # --- state -------------------------------------------------------------------------------------------

    def reset_tables(self) -> None:
        # T0 + T1 should spread as one U(-b, b) table: each of the two at b / sqrt(2)
        init_uniform_(self.weight, self.init_bound / 2**0.5, self._generator())
        self.pointer_table.zero_()
        if self.holder_ids is not None:
            self.holder_ids.fill_(NO_ID)
        self.cluster_state.copy_(torch.tensor([self.seed, 0]))
        self._rounds: int | None = 0
        self.h1.reset(seed=self.seed)  # round 0's h1
        if self.sketch is not None:
            self.sketch.reset()
        if self.seen is not None:
            self.seen.zero_()
        self._pending = []
        self._records = self.sketch is not None or self.seen is not None  # ids are counted until the schedule ends

    @property
    def rounds(self) -> int:
        """How many times the tables have been clustered."""
        # a host copy, kept with the buffer: every lookup asks, and reading the buffer would make a GPU host wait
        rounds = getattr(self, "_rounds", None)
        if rounds is None:
            rounds = self._rounds = int(self.cluster_state[1])
        return rounds

    def pointer_ids(self) -> Tensor:
        """The ids holding stored pointers now (int64, CPU, in pointer-row order); none before clustering."""
        if self.rounds == 0:
            return torch.empty(0, dtype=torch.int64)
        if self.all_ids:
            return torch.arange(self.num_embeddings)
        ids = cast(Tensor, self.holder_ids).cpu()  # (not all ids: the top-m holders' ids are stored)
        return ids[ids != NO_ID]

    # --- lookup (its rows: routing.py) and what it counts (counting.py) ----------------------------------

    def lookup(self, ids: Tensor) -> Tensor:
        if not self._records:  # nothing to score: no hook, no bookkeeping
            return self._vectors(ids)
        if self.importance == "gradient":  # scores come from a hook on the output, applied later (see adaptive.py)
            return super().lookup(ids)
        vectors = self._vectors(ids)
        if self.training and vectors.requires_grad:  # frequency needs no gradient: count the ids now
            # (under torchrun every rank's ids, in rank order); inserts never move a pointer: this batch's rows stay
            self._update(distributed.gather_scored(ids, None)[0], None, None)
        return vectors

    @torch.no_grad()
    def _update(self, ids: Tensor, scores: Tensor | None, optimizer: torch.optim.Optimizer | None) -> None:
        if self.sketch is not None and ids.numel():
            insert_sample(self.sketch, ids, scores, self.sketch_stride)
        self._mark_seen(ids)

    @torch.no_grad()
    def _mark_seen(self, ids: Tensor) -> None:
        """Set ``ids``' bits in the seen bitmap (if the table keeps one: a uniform sample draws from the seen ids)."""
        if self.seen is not None:
            mark_seen_ids(self.seen, ids)

    @classmethod
    def table_batch(cls, tables: Sequence[CompressedEmbedding]) -> CCETables:
        """CCE tables routed and read together on the device code path (each its own compiled lookup on the host);
        their weights packed, so RowAdam updates them in one pass (:mod:`compemb.embeddings.cce.batch`)."""
        return CCETables(tables)

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", columns={self.columns}, rows={self.rows}"
        text += f", pointers={'all' if self.all_ids else self.pointer_table.shape[0]}, sample={self.sample!r}"
        text += f", accounting={self.accounting!r}" if self.accounting != "honest" else ""
        text += f", residual={self.residual!r}" if self.residual != "zeros" else ""
        return text + (f", cluster_every={self.schedule.every}" if self.schedule.every is not None else "")

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.last_cluster, self._rounds = None, None


@register("cce-paper")
class PaperAccountedCCEmbedding(CCEmbedding):
    """CCE sized as the paper's figures are: the float tables alone meet the budget (``accounting="paper"``).

    Stored pointers for every id come on top, reported by ``memory()`` but not counted, so the ratio it really
    reaches is far below the one asked (``compemb methods`` shows both). Registered beside ``cce`` so sweeps can
    compare the two accountings by name.
    """

    title = "CCE, paper accounting"
    formula = "2 * k * d (pointers not counted)"
    per_id_bytes = 0  # its pointers are reported, not counted

    def __init__(self, num_embeddings: int, embedding_dim: int, *, accounting: str = "paper", **options: Any) -> None:
        super().__init__(num_embeddings, embedding_dim, accounting=accounting, **options)


@register("cce-hybrid")
class HybridCCEmbedding(CCEmbedding):
    """CCE/CAFE hybrid (compemb's own): stored pointers only for the ids a HotSketch ranks highest.

    The ``m`` top ids (as many as ``pointer_share`` of the budget holds, with their 8-byte ids and
    ``sketch_slots_per_pointer`` sketch slots each) read clustered centroids and residuals in a holder region of
    each table; every other id reads a hashed region that clustering never touches. The holder region has at most
    one centroid per ``MIN_POINTS_PER_CENTROID`` (39, faiss's threshold) ids k-means samples (the sketch's slots),
    so its centroids are means of real clusters; the rest of the rows go to the hashed region. Reaches any ratio,
    since pointers are bounded by the budget rather than by the vocabulary.
    """

    title = "CCE hybrid: pointers for top ids"
    formula = "2 * k * d + m pointers + sketch"
    hybrid = True
    per_id_bytes = 0
