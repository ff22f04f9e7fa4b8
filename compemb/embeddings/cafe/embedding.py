"""Hot rows for important ids, hashed rows for the rest: CAFE and CAFE-ML.

- ``cafe``: "CAFE: Towards Compact, Adaptive, and Fast Embedding for Large-scale Recommendation Models", Zhang et
  al., SIGMOD 2024 (arXiv 2312.03256). A HotSketch scores ids during training; an id whose score reaches the
  threshold gets a row of its own in a hot table while one is free, the rest share a hashed table.
- ``cafe-ml``: CAFE's multi-level hash embedding: medium ids (score >= 0.2 x threshold) read the sum of one row
  from each of two hashed tables, cold ids one row.

CAFE's two baselines live beside it: ``offline`` (:mod:`compemb.embeddings.offline`) and ``adaembed``
(:mod:`compemb.embeddings.adaembed`).

Across fields (``blocks``: an ``EmbeddingCollection`` with ``sharing="shared"`` passes its features' sizes) the
layout is the authors' (HugoZHL/CAFE, ``embeddings/init_embed.py``, ``sk_embedding_bag.py``): one HotSketch and one
hot table shared by every field (the sketch keys ids by their offset in the collection), a hashed table per field
whose rows are the field's share of the hashed budget in proportion to its ids (the authors: ``ceil(rate x
hash_rate x n_f)``), importance normalised per field per batch (``grad_norm x N / sum(grad_norm)`` over the field's
N occurrences), and a field of n ids with ``n <= 400 / (1 + log2(ratio))`` left uncompressed (rows of its own; its
ids never enter the sketch). Remaining deviations: the budget is honest (full fields, sketch, owners, hashes and the
field table all count; the authors size the hot table as ``rate x (1 - hash_rate) x sum n x 4d / (4d + 48)`` and the
full fields come on top); full fields are kept smallest first while they take at most half the budget; the
hashed row is a seeded universal hash of the id (the authors: ``id mod rows``); every table starts at the shared
full table's scale (the authors: per field, ``sqrt(1/n_f)``, and ``sqrt(1/max n)`` for the hot table).
A table of one vocabulary (a per-feature collection, or a standalone table) is one field.

Choices where the papers leave room (each class's docstring says more):

- Importance is recorded by a hook on the module's own output and applied after the optimizer step
  (:class:`~compemb.embeddings.adaptive.AdaptiveEmbedding`): an occurrence scores the L2 norm of its output
  gradient, normalised to mean 1 over its field's occurrences in the batch (or 1, with ``importance="frequency"``).
- Thresholds are in the authors' units, which are compemb's: an occurrence at its field's mean gradient norm in
  the batch scores 1, so ``threshold`` is "this many average occurrences of evidence". The sketch decays once the
  score inserted since its last decay passes ``P = 10 x threshold x buckets``, at most once per batch (as the
  authors' ``batch_insert``), so once per ``max(P, a batch's score)``: an id with a share p of the score settles near
  ``100 p max(P, batch)`` and stays hot while that is >= threshold. (Until 2026-12 compemb decayed once per whole P
  in a batch: ~4 times a batch of 2,048 for a 16-bucket sketch at threshold 3.) The defaults per budget are in
  :mod:`compemb.embeddings.cafe.settings`.
- Hot, hashed and fallback rows are one stored table (hot rows first): one gather per lookup, one gradient.
- The HotSketch holds ``sketch_slots_per_row`` = 4 slots per hot row (H buckets of 4 slots), room for the hot ids
  and three candidates per hot row; its bytes count in the budget as sketch bytes.
- A small table is not starved of its sketch: with the default ``hash_rate`` it keeps at least
  ``min(MIN_HOT_ROWS, as many as a quarter of its budget holds)`` hot rows with their slots (a 4,278-id feature at
  100x: 4 rather than 1); ``hash_rate`` then reports the share the hashed rows are left.
- Where compemb differs from the authors' code and keeps its own way (not measured against theirs): importance is
  inserted after the optimizer step (the authors': before it, ``main.py``), so a promoted id's row starts from its
  shared row as this step left it; a newcomer to a full bucket takes the lowest-scoring slot unless a hot id holds
  it, and is then dropped (Space-Saving, as the paper's text; the authors' code replaces slot 3); CAFE-ML's second
  hashed level is a table per field, as its first level (a design choice of compemb's, so that the levels share one
  layout).
- ``hot_policy="top"`` (compemb's, off by default): on the planted hot set (``benchmarks/premise.sh``) the paper's
  rule hands the hot rows out first come and never takes them back, since an owner's score settles far above the
  threshold, and drops a sketch newcomer whose bucket's lowest slot is hot (15 of 72 planted hot ids never entered
  the sketch). With "top" the rows go to the highest scores above the threshold: a candidate scoring
  :data:`~compemb.embeddings.cafe.hot_rows.SWAP_GAIN` times the lowest owner's score takes that owner's row (the
  owner demoted as by a decay), and a newcomer takes its bucket's lowest slot without a hot id. Measured in
  ``benchmarks/results/premise.md``.
- A row that changes owner has its optimizer state reset (:func:`~compemb.embeddings.adaptive.reset_optimizer_rows`)
  when ``on_step_end`` is given the optimizer; updates applied at the next forward have no optimizer to reset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from compemb.budget import FLOAT_BYTES, Budget, MemoryReport, every_budget_from, resolve_budget
from compemb.embeddings.adaptive import AdaptiveEmbedding, memory_report
from compemb.embeddings.base import CompressedEmbedding, init_uniform_
from compemb.embeddings.cafe.batch import CAFETables
from compemb.embeddings.cafe.hot_rows import HotRowUpdates
from compemb.embeddings.cafe.layout import FieldRouting
from compemb.embeddings.cafe.plan import SKETCH_SLOTS, CAFEPlan, plan_tables, table_fields
from compemb.embeddings.cafe.settings import budget_ratio, table_settings
from compemb.hashing import UniversalHash
from compemb.registry import register
from compemb.sketch.hotsketch import HotSketch


class _CAFE(FieldRouting, HotRowUpdates, AdaptiveEmbedding):
    """The CAFE family: ``H`` hot rows owned through a HotSketch, then one or two hashed tables (per field, with
    ``blocks``). Where ids read: :class:`~compemb.embeddings.cafe.layout.FieldRouting`; how hot rows change hands:
    :class:`~compemb.embeddings.cafe.hot_rows.HotRowUpdates`."""

    open_vocabulary = True
    takes_feature_blocks = True  # a shared collection passes its features' sizes: the authors' per-field layout
    training_only_state = ("sketch.mass",)  # how much score was inserted since the last decay

    owner: Tensor  # the hot rows' buffers, registered by _build_tables (start: with merge_on_demote only)
    owned: Tensor
    start: Tensor

    def __init__(
        self,
        num_embeddings: int | None,
        embedding_dim: int,
        *,
        levels: int,
        compression: float | None,
        num_params: int | None,
        hash_rate: float | None,
        threshold: float | None,
        tuning: str,
        importance: str,
        decay: float,
        sketch_slots_per_row: float,
        merge_on_demote: bool,
        hot_policy: str = "threshold",
        medium_fraction: float = 0.2,
        hash_split: float = 0.7,
        blocks: Sequence[int] | None = None,
        field_tables: bool = True,
        seed: int,
        mode: str,
        sparse: bool,
        name: str | None,
        init: str,
        include_last_offset: bool,
        padding_idx: int | None,
        device: torch.device | str | None,
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
        budget = resolve_budget(num_embeddings, embedding_dim, compression=compression, num_params=num_params)
        ratio = budget_ratio(budget, self.num_embeddings, self.embedding_dim)
        if not isinstance(field_tables, bool):
            raise ValueError(f"{self.method_name}: field_tables must be True or False, got {field_tables!r}")
        self.hash_rate, self.threshold = table_settings(
            ratio,
            tuning,
            rows=budget.num_bytes / (self.embedding_dim * FLOAT_BYTES),
            per_field=blocks is not None and field_tables,
            hash_rate=hash_rate,
            threshold=threshold,
            hash_split=hash_split,
            medium_fraction=medium_fraction,
            hot_policy=hot_policy,
            sketch_slots_per_row=sketch_slots_per_row,
            who=self.method_name,
        )
        self.tuning, self.hot_policy = tuning, hot_policy
        self.levels, self.merge_on_demote = levels, bool(merge_on_demote)
        self.medium_fraction, self.hash_split = float(medium_fraction), float(hash_split)
        self.sketch_slots_per_row, self.decay = float(sketch_slots_per_row), float(decay)
        self.field_tables = field_tables
        fields, plan = self._plan(budget, ratio, blocks, default_rate=hash_rate is None)
        self.blocks = None if blocks is None else [int(n) for n in blocks]
        self.hash_rate, self.hot_rows, self.hashed_rows = plan.hash_rate, plan.hot_rows, plan.hashed_rows
        self._build_tables(plan, fields, seed, device)
        smallest = plan.smallest_bytes
        self._finish(budget, seed, math.ceil(smallest / FLOAT_BYTES), every_budget_from(self.embedding_dim, smallest))

    def _plan(
        self, budget: Budget, ratio: float | None, blocks: Sequence[int] | None, default_rate: bool
    ) -> tuple[list[tuple[int, bool]], CAFEPlan]:
        """The fields, ``(ids, kept full)`` each, and the sizes that ``budget`` buys
        (:mod:`compemb.embeddings.cafe.plan`; ``default_rate``: ``hash_rate`` was not given)."""
        fields = table_fields(
            blocks,
            self.num_embeddings,
            self.embedding_dim,
            ratio,
            budget.num_bytes,
            self.field_tables,
            self.method_name,
        )
        plan = plan_tables(
            budget,
            self.embedding_dim,
            fields,
            levels=self.levels,
            hash_rate=self.hash_rate,
            default_rate=default_rate,
            sketch_slots_per_row=self.sketch_slots_per_row,
            merge_on_demote=self.merge_on_demote,
            hash_split=self.hash_split,
            field_tables=self.field_tables,
            one_vocabulary=blocks is None,
        )
        return fields, plan

    def _build_tables(
        self, plan: CAFEPlan, fields: list[tuple[int, bool]], seed: int, device: torch.device | str | None
    ) -> None:
        """The hashes, the sketch, the field tables, ``weight`` (hot rows, then the fields' rows) and the hot rows'
        owners (and start values with ``merge_on_demote``), as ``plan`` sizes them."""
        self.hashes = torch.nn.ModuleList(
            UniversalHash(rows, seed=seed, stream=level, device=device) for level, rows in enumerate(self.hashed_rows)
        )
        self.sketch = HotSketch(
            plan.sketch_buckets,
            SKETCH_SLOTS,
            threshold=self.threshold,
            decay_factor=self.decay,
            seed=seed,
            device=device,
            skip_hot=self.hot_policy == "top",
        )
        total_rows = self._lay_out_fields(fields, device)
        self.weight = torch.nn.Parameter(torch.empty(total_rows, self.embedding_dim, device=device))
        self.register_buffer("owner", torch.empty(self.hot_rows, dtype=torch.int64, device=device))
        self.register_buffer("owned", torch.empty(self.hot_rows, dtype=torch.bool, device=device))
        if self.merge_on_demote:
            self.register_buffer("start", torch.empty(self.hot_rows, self.embedding_dim, device=device))
        self._mass_seen: float | None = None  # the sketch's decay mass after the last update

    def reset_tables(self) -> None:
        for name, value in self._field_layout.items():  # (materialised from meta: written afresh)
            getattr(self, name).copy_(value)
        init_uniform_(self.weight, self.init_bound, self._generator())
        if self.levels == 2:  # only medium ids add a second-level row: from zero, so becoming medium is no jump
            with torch.no_grad():
                self.weight[self._offsets[1] :].zero_()
        self.sketch.reset()
        self.owner.zero_()
        self.owned.zero_()
        if self.merge_on_demote:
            self.start.zero_()
        self._pending, self._mass_seen = [], None

    def memory(self) -> MemoryReport:
        """Hot and hashed rows (and start values) as floats, owners, hashes and field tables as index bytes, the
        sketch apart. One vocabulary's field table only restates the sizes (as Python ints do): not counted."""
        report = memory_report(self, sketch=("sketch.",), floats=("start",))
        if self.blocks is None:
            metadata = sum(
                t.numel() * t.element_size() for name, t in self.named_buffers() if name.startswith("field_")
            )
            report = MemoryReport(report.float_bytes, report.index_bytes - metadata, report.sketch_bytes)
        return report

    def _vectors(self, ids: Tensor) -> Tensor:
        rows, weights = self._route(ids)
        if weights is None:
            return F.embedding(rows.squeeze(-1), self.weight, sparse=self.sparse)
        # a bag of two rows per id, the second weighted 1 for medium ids and 0 otherwise: one fused gather
        return F.embedding_bag(
            rows, self.weight, mode="sum", per_sample_weights=weights.to(self.weight.dtype), sparse=self.sparse
        )

    @classmethod
    def table_batch(cls, tables: Sequence[CompressedEmbedding]) -> CAFETables:
        """On the device code path one flat sketch and one packed table for all of ``tables``
        (:mod:`compemb.embeddings.cafe.batch`); on a CPU with the compiled kernels each table's own lookup, their
        weights packed, so RowAdam updates them in one pass."""
        return CAFETables(tables)

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", hot_rows={self.hot_rows}, hashed_rows={self.hashed_rows}"
        text += f", sketch_buckets={self.sketch.num_buckets}, threshold={self.threshold:g}"
        text += f", importance={self.importance!r}" if self.importance != "gradient" else ""
        text += f", hot_policy={self.hot_policy!r}" if self.hot_policy != "threshold" else ""
        return text + (", merge_on_demote=True" if self.merge_on_demote else "")


@register("cafe")
class CAFEEmbedding(_CAFE):
    """CAFE: ids scored by a HotSketch; hot ids read a row of their own, the rest a shared hashed row.

    Importance is each occurrence's output-gradient norm, normalised to mean 1 per batch (or 1 per occurrence),
    recorded by a hook on the output and applied after the optimizer step (see the module docstring). Then:
    an id whose score reaches ``threshold`` takes a free hot row, which starts as a copy of the hashed row it was
    reading, so its output does not move; a hot id whose decayed score falls below ``threshold`` gives its row
    back (and with ``merge_on_demote``, what it learned while hot, its row minus its start value, is added to its
    hashed row; the start values cost ``d`` floats per hot row, counted). The highest scores are served first
    when rows run short. The sketch (``H`` buckets of 4 slots for ``H`` hot rows: room for every hot id and three
    times as many candidates) never evicts a hot id, so no id holds two rows; its map id -> row and the table's
    ``owner`` map row -> id always agree. All of it (sketch, owners, tables) is buffers: ``state_dict`` holds it.

    Training: after ``optimizer.step()`` call ``module.on_step_end(step, optimizer)`` (the Trainer does): the
    updates run then, and a row given to a new owner has its optimizer state zeroed (Adam's moments, Adagrad's
    sum back to its initial value; dense or sparse state). A plain loop may skip the call: the updates then run at
    the start of the next forward, with no optimizer to reset. The sketch lives with the weights: on CUDA its
    inserts, queries and promotions run in torch ops on the device (:mod:`compemb.sketch.torch_ops`), reading back
    a few counts per step and no ids.

    Args:
        hash_rate: the share of the budget for hashed rows; the rest holds the hot rows and the sketch.
        threshold: the score that makes an id hot, in average occurrences (see the module docstring).
        tuning: where the defaults of the two come from, per compression ratio: ``"compemb"`` (re-derived in
            compemb's units on synthetic Criteo-like data) or ``"paper"`` (the paper's Criteo table); see
            :func:`~compemb.embeddings.cafe.settings.default_settings`.
        importance: ``"gradient"`` (default) or ``"frequency"``.
        decay: the sketch's decay factor (scores x0.99 once per ``10 x threshold x buckets`` of score inserted).
        sketch_slots_per_row: sketch slots per hot row (default 4: the hot ids and three times as many candidates).
        merge_on_demote: fold a demoted id's learned change back into its hashed row (default False: dropped).
        hot_policy: ``"threshold"`` (default, the paper's: a free row goes to an id that reaches the threshold and
            stays with it until its score decays below) or ``"top"``: the rows go to the highest scores above the
            threshold; when none is free, a candidate scoring ``SWAP_GAIN`` (1.5) times the lowest owner's score
            takes that owner's row, and a newcomer to a sketch bucket takes its lowest slot without a hot id (the
            paper's drops it when that slot is hot).
        blocks: the sizes of the fields whose ids lie one after another in the vocabulary (the authors' layout
            across fields, see the module docstring); None: one field.
        field_tables: with ``blocks``, a hashed table per field (True, the authors') or one hashed table shared by
            every field (False; importance is still normalised per field, no field is kept full).

    Example::

        >>> emb = CAFEEmbedding(100_000, 16, compression=10, tuning="paper")  # hash_rate 0.5, threshold 20 at 10x
        >>> emb.hot_rows, emb.hashed_rows, emb.sketch.num_buckets * emb.sketch.slots, emb.memory().sketch_bytes
        (2269, (5000,), 9076, 154316)
        >>> emb(torch.tensor([5, 99_999])).shape
        torch.Size([2, 16])
    """

    title = "CAFE: sketch hot rows + hashed"
    formula = "H * d + rows * d + sketch(4H slots)"

    def __init__(
        self,
        num_embeddings: int | None,
        embedding_dim: int,
        *,
        compression: float | None = None,
        num_params: int | None = None,
        hash_rate: float | None = None,
        threshold: float | None = None,
        tuning: str = "compemb",
        importance: str = "gradient",
        decay: float = 0.99,
        sketch_slots_per_row: float = 4,
        merge_on_demote: bool = False,
        hot_policy: str = "threshold",
        blocks: Sequence[int] | None = None,
        field_tables: bool = True,
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
            levels=1,
            compression=compression,
            num_params=num_params,
            hash_rate=hash_rate,
            threshold=threshold,
            tuning=tuning,
            importance=importance,
            decay=decay,
            sketch_slots_per_row=sketch_slots_per_row,
            merge_on_demote=merge_on_demote,
            hot_policy=hot_policy,
            blocks=blocks,
            field_tables=field_tables,
            seed=seed,
            mode=mode,
            sparse=sparse,
            name=name,
            init=init,
            include_last_offset=include_last_offset,
            padding_idx=padding_idx,
            device=device,
        )


@register("cafe-ml")
class MultiLevelCAFEEmbedding(_CAFE):
    """CAFE-ML: CAFE whose shared rows come in two levels: medium ids read two hashed rows, cold ids one.

    An id not hot is medium while its sketch score is at least ``medium_fraction x threshold`` and reads the sum
    of its row in each hashed table; a cold id reads its row of the first table only. A promoted id's hot row
    starts as the vector it was reading (one or two rows). Otherwise as :class:`CAFEEmbedding`.

    Args:
        medium_fraction: the medium level starts at this fraction of the threshold (default 0.2, the paper's).
        hash_split: the first hashed table's share of the hashed rows (default 0.7; the second gets the rest).
        Others: as :class:`CAFEEmbedding`.

    Example::

        >>> emb = MultiLevelCAFEEmbedding(100_000, 16, compression=10)
        >>> emb.hashed_rows
        (3500, 1500)
    """

    title = "CAFE-ML: hot + 1 or 2 hashed"
    formula = "H * d + (rows1 + rows2) * d + sketch"

    def __init__(
        self,
        num_embeddings: int | None,
        embedding_dim: int,
        *,
        compression: float | None = None,
        num_params: int | None = None,
        hash_rate: float | None = None,
        threshold: float | None = None,
        tuning: str = "compemb",
        medium_fraction: float = 0.2,
        hash_split: float = 0.7,
        importance: str = "gradient",
        decay: float = 0.99,
        sketch_slots_per_row: float = 4,
        merge_on_demote: bool = False,
        hot_policy: str = "threshold",
        blocks: Sequence[int] | None = None,
        field_tables: bool = True,
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
            levels=2,
            compression=compression,
            num_params=num_params,
            hash_rate=hash_rate,
            threshold=threshold,
            tuning=tuning,
            importance=importance,
            decay=decay,
            sketch_slots_per_row=sketch_slots_per_row,
            merge_on_demote=merge_on_demote,
            hot_policy=hot_policy,
            medium_fraction=medium_fraction,
            hash_split=hash_split,
            blocks=blocks,
            field_tables=field_tables,
            seed=seed,
            mode=mode,
            sparse=sparse,
            name=name,
            init=init,
            include_last_offset=include_last_offset,
            padding_idx=padding_idx,
            device=device,
        )
