"""CCE's clustering step (:class:`ColumnClustering`, a mixin of :class:`~compemb.embeddings.cce.embedding.CCEmbedding`):
when it runs (the trainer's hooks and the table's :class:`~compemb.embeddings.cce.schedule.ClusterSchedule`), the
k-means of every column on the host (faiss) or where the tables are (torch ops), and the new pointers, centroids,
residuals and ``h1`` installed. The class docstring there states the algorithm.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from compemb import distributed
from compemb.embeddings.adaptive import reset_optimizer_rows
from compemb.embeddings.cce.schedule import ClusterReport, ClusterSchedule, cluster_sample, top_holders
from compemb.embeddings.id_map import NO_ID  # free holder_ids entries sort last
from compemb.hashing import hash_coefficients, hash_ids
from compemb.kernels import device_path

if TYPE_CHECKING:
    from compemb.hashing import UniversalHash
    from compemb.sketch.hotsketch import HotSketch

log = logging.getLogger(__name__)

ASSIGN_BATCH = 1 << 18  # ids whose vectors are computed and assigned at once: bounds cluster()'s memory
_GOLDEN = 0x9E3779B97F4A7C15


class ColumnClustering:
    """Re-clustering a CCE table's columns: :meth:`cluster`, and the hooks that run it on schedule
    (``on_train_begin``, ``on_step_end``, ``steady_step``, ``progress``). The table provides its routing
    (``_route``), tables, pointers, hashes, sketch and settings."""

    # what the host table (CCEmbedding) provides: its sizes and settings, tables, buffers, hashes and sketch
    num_embeddings: int
    columns: int
    rows: int
    holder_rows: int
    all_ids: bool
    sample: str
    residual: str
    niter: int
    max_points_per_centroid: int
    schedule: ClusterSchedule
    weight: torch.nn.Parameter
    pointer_table: Tensor
    holder_ids: Tensor | None
    cluster_state: Tensor
    seen: Tensor | None
    sketch: HotSketch | None
    h1: UniversalHash
    # this class's own state, kept on the host
    _total_steps: int | None
    _steps_per_epoch: int | None
    _records: bool
    _rounds: int | None
    last_cluster: ClusterReport | None

    if TYPE_CHECKING:  # the host's methods (a definition here would shadow them at run time)

        @property
        def rounds(self) -> int: ...

        def _route(self, ids: Tensor) -> Tensor: ...

        def _flush(self, optimizer: torch.optim.Optimizer | None = None) -> None: ...

        def _who(self) -> str: ...

    def on_train_begin(self, total_steps: int, steps_per_epoch: int | None = None) -> None:
        """Remember the run's length: the schedule's interval and ``cluster_until`` are derived from it."""
        self._total_steps = int(total_steps)
        self._steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)

    def progress(self) -> dict[str, int]:
        """How many clusterings have run (every evaluation line of a CCE run carries it)."""
        return {"clusterings": self.rounds}

    def on_step_end(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Apply recorded scores; cluster when the schedule says (its optimizer state is reset then)."""
        super().on_step_end(step, optimizer)  # type: ignore[misc]  # the host's next base (AdaptiveEmbedding) has it
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
        """Re-cluster every column now (see :class:`~compemb.embeddings.cce.embedding.CCEmbedding`'s docstring);
        returns a :class:`ClusterReport`."""
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
        if self.all_ids:
            holders = torch.arange(self.num_embeddings)
        else:
            assert self.sketch is not None  # top-m holders: the plan always gives them a sketch
            holders = top_holders(self.sketch, self.pointer_table.shape[0])
        # everything is computed from the old state and installed at the end; the hashed region is kept as it is
        h1 = hash_coefficients(seed + (rounds + 1) * _GOLDEN, c, self.h1.stream)  # a fresh seed in h1's stream
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
        distributed.broadcast_state(cast(torch.nn.Module, self))  # the host is an nn.Module
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
