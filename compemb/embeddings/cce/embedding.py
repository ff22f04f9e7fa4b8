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

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from compemb import distributed
from compemb.budget import FLOAT_BYTES, MemoryReport, budget_tolerance, check_budget, every_budget_from, resolve_budget
from compemb.embeddings.adaptive import AdaptiveEmbedding, memory_report, reset_optimizer_rows
from compemb.embeddings.base import CompressedEmbedding, init_uniform_
from compemb.embeddings.cce.batch import CCETables
from compemb.embeddings.cce.kernels import NO_HOLDERS, PairGather, mark_seen, route_rows
from compemb.embeddings.cce.plan import SKETCH_SLOTS, CCEShape, plan_tables, reserved_bytes, smallest_bytes
from compemb.embeddings.cce.schedule import ClusterReport, ClusterSchedule, cluster_sample, top_holders
from compemb.embeddings.id_map import NO_ID  # free holder_ids entries sort last
from compemb.hashing import UniversalHash, hash_coefficients, hash_ids
from compemb.kernels import device_path, on_host
from compemb.registry import register
from compemb.sketch.hotsketch import HotSketch

log = logging.getLogger(__name__)

ACCOUNTING = ("honest", "paper")
SAMPLES = ("uniform", "seen", "frequency")
RESIDUALS = ("zeros", "mean")
ASSIGN_BATCH = 1 << 18  # ids whose vectors are computed and assigned at once: bounds cluster()'s memory
H0_STREAM, H1_STREAM, COLD1_STREAM = 0, 1, 2
_GOLDEN = 0x9E3779B97F4A7C15


@register("cce")
class CCEmbedding(AdaptiveEmbedding):
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
    pointer_table: Tensor
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
        shape = CCEShape(
            self.num_embeddings,
            self.embedding_dim,
            columns,
            accounting == "honest",
            self.pointer_share,
            self.holder_share,
            self.sketch_slots_per_pointer,
            self.hybrid,
        )
        plan = plan_tables(shape, budget, pointers, sample, budget_tolerance())
        self.sample = sample or ("uniform" if plan.all_ids else "frequency")
        self.rows, self.all_ids, self.holder_rows = plan.rows, plan.all_ids, plan.holder_rows
        c, k = columns, plan.rows
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
        self.weight = torch.nn.Parameter(torch.empty(2 * c * k, embedding_dim // c, device=device))
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
        smallest = math.ceil(smallest_bytes(columns, embedding_dim, plan.bitmap_bytes) / FLOAT_BYTES)
        if accounting == "honest":
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
        if getattr(self, "_rounds", None) is None:
            self._rounds = int(self.cluster_state[1])
        return self._rounds

    def pointer_ids(self) -> Tensor:
        """The ids holding stored pointers now (int64, CPU, in pointer-row order); none before clustering."""
        if self.rounds == 0:
            return torch.empty(0, dtype=torch.int64)
        if self.all_ids:
            return torch.arange(self.num_embeddings)
        ids = self.holder_ids.cpu()  # type: ignore[union-attr]
        return ids[ids != NO_ID]

    # --- lookup ------------------------------------------------------------------------------------------

    def _mode(self) -> int:
        """0: every pointer hashed (not clustered yet); 1: every id's pointers stored; 2: the sketch's top ids'."""
        return 0 if self.rounds == 0 else (1 if self.all_ids else 2)

    def _routing(self) -> tuple:
        """The compiled kernels' routing arguments (CPU numpy): mode, pointers, holders, hashes, k, the regions."""
        cold1 = self.h1 if self.cold1 is None else self.cold1
        return (
            self._mode(),
            self.pointer_table.numpy(),
            NO_HOLDERS if self.holder_ids is None else self.holder_ids.numpy(),
            self.h0.coefficients.numpy(),
            self.h1.coefficients.numpy(),
            cold1.coefficients.numpy(),
            self.rows,
            self.cold_offset,
            self.rows - self.cold_offset,
            self.holder_rows,
        )

    def _route(self, ids: Tensor) -> Tensor:
        """Rows ``(N, c, 2)`` of ``weight`` each id reads: T0's and T1's, per column."""
        if on_host(ids, self.pointer_table):  # one compiled pass (the torch ops below give the same)
            out = torch.empty(ids.numel(), self.columns, 2, dtype=torch.int64)
            route_rows(ids.numpy(), *self._routing(), out.numpy())
            return out
        return self._route_torch(ids, self._mode())

    def _route_torch(self, ids: Tensor, mode: int) -> Tensor:
        """:meth:`_route` in torch ops, for any device."""
        c, k = self.columns, self.rows
        first = self.h0(ids) + self.cold_offset
        second = (self.h1 if self.cold1 is None else self.cold1)(ids) + self.cold_offset
        if mode == 1:
            first, second = self.pointer_table[ids].long(), self.h1(ids)
        elif mode == 2:
            holders = self.holder_ids
            position = torch.searchsorted(holders, ids.contiguous()).clamp_max_(holders.numel() - 1)  # type: ignore[union-attr]
            found = (holders[position] == ids).unsqueeze(-1)  # type: ignore[index]
            first = torch.where(found, self.pointer_table[position].long(), first)
            second = torch.where(found, self.h1(ids), second)
        offsets = torch.arange(c, device=ids.device) * k
        return torch.stack([first + offsets, second + offsets + c * k], dim=-1)

    def _vectors(self, ids: Tensor) -> Tensor:
        # the compiled kernel reads float32/float64 tables (numba has no float16 or bfloat16): others take torch ops
        if on_host(ids, self.weight, self.pointer_table) and self.weight.dtype in (torch.float32, torch.float64):
            return PairGather.apply(self.weight, ids, self._routing(), self.sparse)
        # elsewhere each (id, column) is a bag of two rows, T0's and T1's: one fused gather
        rows = self._route(ids).to(self.weight.device)
        out = F.embedding_bag(rows.view(-1, 2), self.weight, mode="sum", sparse=self.sparse)
        return out.view(ids.numel(), self.embedding_dim)

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
            stride = self.sketch_stride
            if stride > 1 and self.sketch.mass_on_device:  # the same sample, its start read on the device
                self._insert_strided_on_device(ids, scores, stride)
            elif stride > 1:  # a strided sample, starting where the sketch's saved mass says: it moves every batch
                start = int(self.sketch.mass_since_decay()) % stride  # a host float: no read from the device
                sample = ids[start::stride]
                scores = (
                    torch.full(sample.shape, float(stride), device=ids.device)
                    if scores is None
                    else scores[start::stride] * stride
                )
                # (scores of mean 1 per batch: the decay counts occurrences, exactly; see HotSketch.insert's mass)
                self.sketch.insert(sample, scores, mass=float(sample.numel() * stride))
            else:
                self.sketch.insert(ids, scores, mass=float(ids.numel()))
        self._mark_seen(ids)

    @torch.no_grad()
    def _mark_seen(self, ids: Tensor) -> None:
        """Set ``ids``' bits in the seen bitmap (if the table keeps one: a uniform sample draws from the seen ids)."""
        if self.seen is not None and on_host(self.seen):
            mark_seen(ids.cpu().numpy(), self.seen.numpy())
        elif self.seen is not None:
            ids = ids.to(self.seen.device)
            byte, bit = ids >> 3, ids & 7
            for b in range(8):  # one bit plane at a time: writes to one byte then all write the same value
                at = byte[bit == b]
                self.seen[at] = self.seen[at] | (1 << b)

    def _insert_strided_on_device(self, ids: Tensor, scores: Tensor | None, stride: int) -> None:
        """:meth:`_update`'s strided sample with its start (the sketch's mass mod ``stride``) on the device: the
        same entries, in fixed shapes (positions past the batch kept out of the insert, not cut off)."""
        sketch, flat = self.sketch, ids.reshape(-1)
        positions = (sketch.mass.long() % stride) + torch.arange(-(-flat.numel() // stride), device=ids.device) * stride
        keep = positions < flat.numel()
        positions = positions.clamp_max(flat.numel() - 1)
        weights = (
            torch.full(positions.shape, float(stride), device=ids.device)
            if scores is None
            else scores.reshape(-1)[positions] * stride
        )
        sketch.insert(flat[positions], weights, mass=keep.sum(dtype=torch.float64) * stride, keep=keep)

    # --- clustering --------------------------------------------------------------------------------------

    def on_train_begin(self, total_steps: int, steps_per_epoch: int | None = None) -> None:
        """Remember the run's length: the schedule's interval and ``cluster_until`` are derived from it."""
        self._total_steps = int(total_steps)
        self._steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)

    def progress(self) -> dict[str, int]:
        """How many clusterings have run (every evaluation line of a CCE run carries it)."""
        return {"clusterings": self.rounds}

    def on_step_end(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Apply recorded scores; cluster when the schedule says (its optimizer state is reset then)."""
        super().on_step_end(step, optimizer)
        if self.schedule.due(step, self._total_steps, self._steps_per_epoch):
            self.cluster(optimizer)
        if self.schedule.over(
            step, self._total_steps, self._steps_per_epoch
        ):  # no clustering left to choose ids for: stop counting
            self._records = False

    def steady_step(self, step: int) -> bool:
        """Not a step that clusters, nor the one where scoring stops (its lookups record no more)."""
        over = self._records and self.schedule.over(step, self._total_steps, self._steps_per_epoch)
        return not over and not self.schedule.due(step, self._total_steps, self._steps_per_epoch)

    def _column(self, ids: Tensor, column: int) -> Tensor:
        """Current sub-vectors ``(N, d/c)`` of column ``column`` of ``ids``."""
        rows = self._route(ids.to(self.pointer_table.device))[:, column].to(self.weight.device)
        return self.weight[rows[:, 0]] + self.weight[rows[:, 1]]

    def _columns(self, ids: Tensor) -> Tensor:
        """Current sub-vectors ``(c, N, d/c)`` of every column of ``ids`` (one routing for all)."""
        rows = self._route(ids.to(self.pointer_table.device)).to(self.weight.device).permute(1, 0, 2)
        return self.weight[rows[..., 0]] + self.weight[rows[..., 1]]

    def _fit_columns_on_host(
        self, sample: Tensor, holders: Tensor, h1: Tensor, seeds: list[int], weight: Tensor, pointers: Tensor
    ) -> list[float]:
        """:meth:`cluster`'s k-means of each column (faiss, the k-NN-graph Lloyd steps), the holders' pointers and
        the residual means written into ``weight`` and ``pointers``; each column's inertia."""
        from compemb.cluster import assign, kmeans

        c, k, kh = self.columns, self.rows, self.holder_rows
        inertia = []
        for j in range(c):
            points = self._column(sample, j).float().cpu()
            if not bool(torch.isfinite(points).all()):  # k-means would abort the process on them
                raise ValueError(f"{self._who()}: column {j} holds non-finite values (training diverged?)")
            # with no more points than rows, the points themselves, cycled
            centroids = kmeans(
                points, kh, niter=self.niter, max_points_per_centroid=self.max_points_per_centroid, seed=seeds[j]
            ).centroids
            # the report's inertia is exact: each sampled id's squared distance to its nearest centroid
            inertia.append(float(assign(points, centroids, batch_size=ASSIGN_BATCH)[1].double().sum()))
            sums = torch.zeros(kh, centroids.shape[1], dtype=torch.float64)
            counts = torch.zeros(kh, dtype=torch.float64)
            for start in range(0, holders.numel(), ASSIGN_BATCH):  # memory-bounded: ASSIGN_BATCH ids at a time
                chunk = holders[start : start + ASSIGN_BATCH]
                vectors = self._column(chunk, j).float().cpu()
                labels = assign(vectors, centroids, batch_size=ASSIGN_BATCH)[0]
                pointers[start : start + chunk.numel(), j] = labels.to(pointers.dtype)
                if self.residual == "mean":
                    bucket = hash_ids(chunk, h1[j : j + 1], kh).squeeze(-1)
                    sums.index_add_(0, bucket, (vectors - centroids[labels]).double())
                    counts.index_add_(0, bucket, torch.ones(chunk.numel(), dtype=torch.float64))
            weight[j * k : j * k + kh] = centroids
            weight[(c + j) * k : (c + j) * k + kh] = (sums / counts.clamp_min(1).unsqueeze(-1)).float()
        return inertia

    def _fit_columns_on_device(
        self, sample: Tensor, holders: Tensor, h1: Tensor, seeds: list[int], weight: Tensor, pointers: Tensor
    ) -> list[float]:
        """:meth:`_fit_columns_on_host` in torch ops where the tables are, every column at once: one batched k-means
        (:func:`~compemb.cluster.kmeans_torch_batched`), one search of every column per chunk of holders, and a
        few host reads per clustering instead of a few per column."""
        from compemb.cluster import kmeans_torch_batched, nearest_torch

        c, k, kh, work = self.columns, self.rows, self.holder_rows, weight.device
        points = self._columns(sample).float().to(work)  # (c, n, d/c)
        finite = torch.isfinite(points).flatten(1).all(1).tolist()
        if not all(finite):  # k-means would only produce garbage from them
            raise ValueError(
                f"{self._who()}: column {finite.index(False)} holds non-finite values (training diverged?)"
            )
        results = kmeans_torch_batched(
            points, kh, niter=self.niter, max_points_per_centroid=self.max_points_per_centroid, seeds=seeds
        )
        centroids = torch.stack([result.centroids for result in results])  # (c, kh, d/c)
        width = centroids.shape[2]
        inertia = nearest_torch(points, centroids)[1].double().sum(1).tolist()
        sums = torch.zeros(c * kh, width, dtype=torch.float64, device=work)
        counts = torch.zeros(c * kh, dtype=torch.float64, device=work)
        offsets = torch.arange(c, device=work).unsqueeze(0) * kh  # column j's residual buckets in the flat sums
        for start in range(0, holders.numel(), ASSIGN_BATCH):  # memory-bounded: ASSIGN_BATCH ids at a time
            chunk = holders[start : start + ASSIGN_BATCH].to(work)
            vectors = self._columns(chunk).float().to(work)  # (c, N, d/c)
            labels = nearest_torch(vectors, centroids)[0]
            pointers[start : start + chunk.numel()] = labels.t().to(pointers.dtype)
            if self.residual == "mean":
                bucket = (hash_ids(chunk, h1, kh) + offsets).t().reshape(-1)
                nearest = centroids.gather(1, labels.unsqueeze(-1).expand(-1, -1, width))
                sums.index_add_(0, bucket, (vectors - nearest).double().reshape(-1, width))
                counts.index_add_(0, bucket, torch.ones(bucket.numel(), dtype=torch.float64, device=work))
        blocks = weight[: 2 * c * k].view(2 * c, k, width)  # T0's columns, then T1's
        blocks[:c, :kh] = centroids
        blocks[c:, :kh] = (sums / counts.clamp_min(1).unsqueeze(-1)).float().view(c, kh, width)
        return inertia

    @torch.no_grad()
    def cluster(self, optimizer: torch.optim.Optimizer | None = None) -> ClusterReport:
        """Re-cluster every column now (see the class docstring); returns a :class:`ClusterReport`."""
        started = time.perf_counter()
        self._flush(optimizer)  # scores recorded so far choose the ids
        seed, rounds = (int(v) for v in self.cluster_state.tolist())
        c, k, kh, device = self.columns, self.rows, self.holder_rows, self.weight.device
        generator = torch.Generator().manual_seed((seed * 1_000_003 + rounds) % 2**63)
        sample = cluster_sample(
            self.sample,
            self.num_embeddings,
            self.max_points_per_centroid * self.holder_rows,
            generator,
            seen=self.seen,
            sketch=self.sketch,
        )
        holders = (
            torch.arange(self.num_embeddings) if self.all_ids else top_holders(self.sketch, self.pointer_table.shape[0])
        )
        # everything is computed from the old state and installed at the end; the hashed region is kept as it is
        h1 = hash_coefficients(seed + (rounds + 1) * _GOLDEN, c, H1_STREAM)
        # on the device code path the k-means runs where the tables are (torch ops; a GPU's clustering), else on
        # the host with the k-NN-graph Lloyd steps and faiss's exact search
        on_device = device_path(self.weight)
        work = device if on_device else torch.device("cpu")

        weight = self.weight.detach().float().to(work).clone()
        pointers = torch.empty(holders.numel(), c, dtype=self.pointer_table.dtype, device=work)
        seeds = [(seed * 7919 + rounds * 131 + j) % 2**31 for j in range(c)]
        fit = self._fit_columns_on_device if on_device else self._fit_columns_on_host
        inertia = fit(sample, holders, h1.to(work), seeds, weight, pointers)
        # install: the holder region of the tables, pointers and who holds them, h1, the round
        self.weight.copy_(weight.to(device, self.weight.dtype))
        self.pointer_table[: holders.numel()] = pointers.to(self.pointer_table.device)
        if self.holder_ids is not None:
            self.holder_ids.fill_(NO_ID)
            self.holder_ids[: holders.numel()] = holders.to(self.holder_ids.device)
        self.h1.coefficients.copy_(h1.to(self.h1.coefficients.device))
        self.cluster_state[1] += 1
        self._rounds = rounds + 1
        # the holder region changed owner (all of each table when every id holds pointers); the hashed region did not
        region = torch.arange(kh)
        rows = torch.cat([region + block * k for block in range(2 * c)])
        reset_optimizer_rows(optimizer, self.weight, rows)
        # every rank clustered the same state with the same seeds; rank 0's result wins, so no difference in
        # floating-point order between processes can grow into different pointers
        distributed.broadcast_state(self)
        report = ClusterReport(rounds + 1, sample, tuple(inertia), holders.numel(), time.perf_counter() - started)
        log.info(
            "%s: clustered round %d, %d ids sampled, %d pointers, %.2fs",
            self._who(),
            report.round,
            sample.numel(),
            report.num_pointers,
            report.seconds,
        )
        self.last_cluster = report
        return report

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
