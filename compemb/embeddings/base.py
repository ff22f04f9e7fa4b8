"""CompressedEmbedding: the one interface every compemb method implements.

A method subclasses :class:`CompressedEmbedding`, builds its tables from a budget in ``__init__``,
implements :meth:`~CompressedEmbedding.lookup` (1-D int64 ids -> ``(N, dim)`` vectors) and
:meth:`~CompressedEmbedding.reset_tables`, and registers itself with ``@register("name")``. Its hash
functions are :class:`~compemb.hashing.UniversalHash` submodules, which ``reset_parameters`` redraws.
The base class does the rest the same way for all of them: checking ids, offsets and weights,
nn.Embedding-style lookups of any shape, nn.EmbeddingBag-style bags, and the memory report.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from compemb.budget import Budget, MemoryReport, check_budget
from compemb.checks import assert_ids_in_range, id_range, scan_bags
from compemb.hashing import UniversalHash
from compemb.kernels import device_path

if TYPE_CHECKING:
    from compemb.table_batch import TableBatch

MODES = ("sum", "mean", "max")
# "dlrm": the DLRM reference, U(-sqrt(1/n), sqrt(1/n)) for a table of n ids; "uniform_dim": U(-1/sqrt(d), 1/sqrt(d))
INITS = ("dlrm", "uniform_dim")


class CompressedEmbedding(torch.nn.Module, ABC):
    """An embedding table stored in less memory than ``num_embeddings x embedding_dim`` floats.

    Args:
        num_embeddings: vocabulary size; ``None`` for an open vocabulary (hash-based methods only,
            which then accept any int64 id, negative included).
        embedding_dim: size of each output vector.
        mode: how bags are reduced when ``offsets`` is given: ``"sum"``, ``"mean"`` or ``"max"`` (per coordinate;
            no per-sample weights).
        sparse: produce sparse gradients for the tables (as nn.Embedding); use an optimizer that
            accepts them (SGD, Adagrad, SparseAdam). A method without table rows (dhe, tt:
            :attr:`sparse_gradients` False) refuses it.
        name: the feature's name, used in error messages.
        init: the scale an id's untrained vector starts at (see :attr:`init_bound`): ``"dlrm"`` (default) the
            DLRM reference's U(-sqrt(1/n), sqrt(1/n)) for n ids, ``"uniform_dim"`` U(-1/sqrt(d), 1/sqrt(d)).
        include_last_offset: as nn.EmbeddingBag's: ``offsets`` has one entry more than there are bags, the last
            being ``len(ids)`` (the KeyedJaggedTensor layout); one that is not is an error, not an empty bag.
        padding_idx: as nn.Embedding's: this id reads a vector of zeros and sends no gradient to the tables (in
            bags it is left out, of the mean's count too), whatever rows the method would share with it.

    Shape:
        - ``forward(ids)``: ids ``(*)`` -> ``(*, embedding_dim)``, like nn.Embedding.
        - ``forward(ids, offsets)``: ids ``(N,)``, offsets ``(B,)`` (``(B + 1,)`` with ``include_last_offset``)
          -> ``(B, embedding_dim)``, like nn.EmbeddingBag: bag b holds ``ids[offsets[b]:offsets[b+1]]``; an
          empty bag gives zeros;
          ``per_sample_weights`` ``(N,)`` scales each id's vector (mode ``"sum"`` only).
    """

    method_name: ClassVar[str] = ""
    # True: may be built with num_embeddings=None and then hashes any int64 id; built with a vocabulary, every
    # method refuses ids outside [0, num_embeddings)
    open_vocabulary: ClassVar[bool] = False
    compresses: ClassVar[bool] = True  # False only for the full table
    stores_rows: ClassVar[bool] = True  # False: no table (DHE), every parameter serves every id
    title: ClassVar[str] = ""  # a few words, for `compemb methods`
    formula: ClassVar[str] = ""  # the parameter count as a formula, for `compemb methods`
    # True: built from per-id counts of the training split, given as ``frequencies=`` (EmbeddingCollection and
    # the Trainer pass them; see compemb.embeddings.offline.OfflineFrequencyEmbedding)
    needs_frequencies: ClassVar[bool] = False
    # whether ``sparse=True`` gives sparse gradients: False where the parameters are no table of rows (an MLP, cores)
    sparse_gradients: ClassVar[bool] = True
    # bytes stored for every id of the vocabulary (AdaEmbed's importance scores): budgets under
    # num_embeddings * per_id_bytes cannot be met and are refused with a BudgetError
    per_id_bytes: ClassVar[int] = 0
    # state_dict entries only training reads (decayed sketch mass, importance scores): an exported model leaves them
    # out and its lookups do not need them (compemb.export)
    training_only_state: ClassVar[tuple[str, ...]] = ()
    # True: a shared EmbeddingCollection passes its features' sizes as ``blocks=`` (MDE gives each its own dim)
    takes_feature_blocks: ClassVar[bool] = False

    def __init__(
        self,
        num_embeddings: int | None,
        embedding_dim: int,
        *,
        mode: str = "sum",
        sparse: bool = False,
        name: str | None = None,
        init: str = "dlrm",
        include_last_offset: bool = False,
        padding_idx: int | None = None,
    ) -> None:
        super().__init__()
        if num_embeddings is None:
            if not self.open_vocabulary:
                raise ValueError(f"{self.method_name} has a closed vocabulary: num_embeddings is required")
        elif not _is_positive_int(num_embeddings):
            raise ValueError(f"num_embeddings must be a positive int or None, got {num_embeddings!r}")
        if not _is_positive_int(embedding_dim):
            raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.init = init
        self.num_embeddings = None if num_embeddings is None else int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.mode = mode
        if sparse and not self.sparse_gradients:
            raise ValueError(
                f"{self.method_name} has no table rows to give sparse gradients (its parameters are "
                f"dense): build it with sparse=False and train it with a dense optimizer"
            )
        self.sparse = bool(sparse)
        self.include_last_offset = bool(include_last_offset)
        if padding_idx is not None:  # as nn.Embedding's: a negative index counts from the end of the vocabulary
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
                raise ValueError(f"padding_idx must be an int or None, got {padding_idx!r}")
            if num_embeddings is not None:
                if not -num_embeddings <= padding_idx < num_embeddings:
                    raise ValueError(
                        f"padding_idx must be within [-{num_embeddings}, {num_embeddings}), got {padding_idx}"
                    )
                padding_idx %= num_embeddings
        self.padding_idx = padding_idx
        self.name = name

    @classmethod
    def split_budget(
        cls, sizes: Sequence[int], embedding_dim: int, budget_bytes: int, **options: object
    ) -> list[float]:
        """How an EmbeddingCollection of one table per feature shares ``budget_bytes`` among features of ``sizes``
        ids: in proportion to their full tables (the collection then keeps small ones full and absorbs rounding).
        A method that allocates across features (MDE's power rule) overrides it."""
        total = sum(sizes)
        return [budget_bytes * n / total for n in sizes]

    @classmethod
    def table_batch(cls, tables: Sequence[CompressedEmbedding]) -> TableBatch | None:
        """A lookup of one id per table for all of ``tables`` (this class, one ``sparse``) in one pass, or ``None``:
        an EmbeddingCollection then looks each table up on its own. Methods whose lookup is a gather override it
        (see :mod:`compemb.table_batch`); the batch must give exactly the vectors and gradients of the tables'
        own lookups."""
        return None

    # --- what each method implements -------------------------------------------------------

    @abstractmethod
    def lookup(self, ids: Tensor) -> Tensor:
        """Vectors of valid 1-D int64 ``ids``: ``(N,)`` -> ``(N, embedding_dim)``."""

    @abstractmethod
    def reset_tables(self) -> None:
        """Re-initialise every trainable table in place from the module's seed."""

    def reset_parameters(self) -> None:
        """Re-initialise in place from the module's seed: every hash function, then every table."""
        for module in self.modules():
            if isinstance(module, UniversalHash):
                module.reset()
        self.reset_tables()

    def lookup_bags(
        self, ids: Tensor, offsets: Tensor, per_sample_weights: Tensor | None, one_id_per_bag: bool = False
    ) -> Tensor:
        """Reduce the vectors of checked bags; methods with a fused kernel override this.

        ``one_id_per_bag`` says every bag holds exactly one id (one-hot features, as Criteo's).
        """
        vectors = self.lookup(ids)
        if one_id_per_bag:  # each bag is its one id: sum and mean alike
            return vectors if per_sample_weights is None else vectors * per_sample_weights.unsqueeze(-1)
        # embedding_bag over the looked-up vectors reduces exactly as nn.EmbeddingBag does
        positions = torch.arange(ids.numel(), device=ids.device)
        return F.embedding_bag(positions, vectors, offsets, mode=self.mode, per_sample_weights=per_sample_weights)

    def on_train_begin(self, total_steps: int, steps_per_epoch: int | None = None) -> None:
        """Called by the trainer once before training, with the run's total steps and its epochs' length
        (schedules derived from the run use them: CCE's clusterings)."""

    def progress(self) -> dict[str, int]:
        """Counters of the method's own training events the trainer logs at every evaluation (CCE: clusterings)."""
        return {}

    def on_step_end(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Called by the trainer after every optimizer step; adaptive methods (clustering, sketches) override it.

        ``optimizer`` (optional) is the one that just stepped: a method that gives a row to a new owner resets
        that row's optimizer state through it (:func:`compemb.embeddings.adaptive.reset_optimizer_rows`).
        """

    def steady_step(self, step: int) -> bool:
        """Whether step ``step`` (0-based) is this table's every-step work: the same ops on the same tensors as
        any other steady step, so a CUDA graph of one replays it (``--cuda-graph``). A step that does more (a
        clustering, a schedule's end) returns False: it runs eagerly."""
        return True

    def capture_refusal(self) -> str | None:
        """Why no CUDA graph can replay this table's steps (a decision taken on the host every step), or None."""
        return None

    # --- shared behaviour --------------------------------------------------------------------

    def forward(self, ids: Tensor, offsets: Tensor | None = None, per_sample_weights: Tensor | None = None) -> Tensor:
        """Embed ``ids`` (any shape), or bags of them when ``offsets`` is given; see the class docstring."""
        if offsets is None:
            if per_sample_weights is not None:
                raise ValueError("per_sample_weights needs offsets (it weighs ids inside bags)")
            ids = self.check_ids(ids)
            flat = ids.reshape(-1)
            vectors = self.lookup(flat)
            if self.padding_idx is not None:  # zeros, and (multiplied by 0) no gradient to the rows it shares
                vectors = vectors * (flat != self.padding_idx).unsqueeze(-1).to(vectors.dtype)
            return vectors.view(*ids.shape, self.embedding_dim)
        if self.include_last_offset:  # B + 1 offsets, the last one len(ids): it closes bag B - 1, it opens none
            offsets = self._as_int64(offsets, "offsets")
            if offsets.dim() != 1 or offsets.numel() == 0:
                raise ValueError(
                    f"{self._who()}: with include_last_offset, offsets must be 1-D with batch + 1 >= 1 "
                    f"entries, got shape {tuple(offsets.shape)}"
                )
            if not device_path(offsets) and int(offsets[-1]) != ids.numel():
                raise ValueError(
                    f"{self._who()}: with include_last_offset, offsets[-1] must be the number of ids "
                    f"{ids.numel()}, got {int(offsets[-1])}"
                )
            offsets = offsets[:-1]
        ids, offsets, per_sample_weights, one_id_per_bag = self._check_bags(ids, offsets, per_sample_weights)
        if self.mode == "max" or self.padding_idx is not None:  # the methods' fused bag kernels sum or average
            return self._reduce_bags(ids, offsets, per_sample_weights)
        return self.lookup_bags(ids, offsets, per_sample_weights, one_id_per_bag)

    def _reduce_bags(self, ids: Tensor, offsets: Tensor, per_sample_weights: Tensor | None) -> Tensor:
        """Bags reduced as nn.EmbeddingBag reduces them (any mode, ``padding_idx`` left out), over the looked-up
        vectors."""
        vectors = self.lookup(ids)
        positions, padding = torch.arange(ids.numel(), device=ids.device), None
        if self.padding_idx is not None:  # padded ids point at an extra row that embedding_bag leaves out
            vectors = torch.cat([vectors, vectors.new_zeros(1, vectors.shape[1])])
            padding = ids.numel()
            positions = torch.where(ids == self.padding_idx, padding, positions)
        return F.embedding_bag(
            positions, vectors, offsets, mode=self.mode, per_sample_weights=per_sample_weights, padding_idx=padding
        )

    def check_ids(self, ids: Tensor) -> Tensor:
        """Return ``ids`` as int64, or raise TypeError (not integers) / ValueError (out of range)."""
        ids = self._as_int64(ids, "ids")
        if self.num_embeddings is not None and ids.numel() > 0:  # one rule for every method built with a vocabulary
            if device_path(ids):  # no host round trip per lookup: a device-side assert
                assert_ids_in_range(ids, self.num_embeddings, self._who())
            else:
                self._check_range(ids, *id_range(ids))
        return ids

    def _as_int64(self, tensor: Tensor, what: str) -> Tensor:
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{self._who()}: {what} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise TypeError(f"{self._who()}: {what} must be an integer tensor, got dtype {tensor.dtype}")
        if tensor.dtype == torch.uint64:  # values past 2^63 would wrap in int64
            raise TypeError(f"{self._who()}: {what} must be int64 or a narrower integer dtype, got uint64")
        return tensor.long()

    def _check_range(self, ids: Tensor, low: int, high: int) -> None:
        assert self.num_embeddings is not None  # called for a closed vocabulary only
        if low < 0 or high >= self.num_embeddings:
            bad = ids[(ids < 0) | (ids >= self.num_embeddings)].reshape(-1)[0].item()
            raise ValueError(f"{self._who()}: id {bad} is outside [0, {self.num_embeddings})")

    def _check_bags(
        self, ids: Tensor, offsets: Tensor, per_sample_weights: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None, bool]:
        """Check bag inputs; return int64 ids and offsets, the weights, and whether every bag holds one id."""
        ids = self._as_int64(ids, "ids")
        if ids.dim() != 1:
            raise ValueError(f"{self._who()}: with offsets, ids must be 1-D, got shape {tuple(ids.shape)}")
        offsets = self._as_int64(offsets, "offsets")
        if offsets.dim() != 1:
            raise ValueError(f"{self._who()}: offsets must be 1-D, got shape {tuple(offsets.shape)}")
        if per_sample_weights is not None:
            if self.mode != "sum":
                raise ValueError(f"{self._who()}: per_sample_weights needs mode 'sum', not {self.mode!r}")
            if not per_sample_weights.is_floating_point() or per_sample_weights.shape != ids.shape:
                raise ValueError(
                    f"{self._who()}: per_sample_weights must be floating point with the shape of ids "
                    f"{tuple(ids.shape)}, got {per_sample_weights.dtype} {tuple(per_sample_weights.shape)}"
                )
            # the tables' dtype, as nn.EmbeddingBag requires, whichever path the bags take
            per_sample_weights = per_sample_weights.to(self._tables_dtype())
        closed = self.num_embeddings is not None and ids.numel() > 0
        if offsets.numel() == 0:
            if closed:
                self._check_range(ids, *id_range(ids))
            return ids, offsets, per_sample_weights, False
        # every value the checks need in one pass: offsets[0], the smallest bag size (negative when offsets
        # decrease or run past the ids) and, for a closed vocabulary, the id range
        first, smallest, low, high = scan_bags(ids, offsets, want_range=closed)
        if first != 0:
            raise ValueError(f"{self._who()}: offsets[0] must be 0, got {first}")
        if smallest < 0:
            if offsets[-1] > ids.numel():
                raise ValueError(f"{self._who()}: offsets[-1] = {offsets[-1].item()} is beyond the {ids.numel()} ids")
            raise ValueError(f"{self._who()}: offsets must be non-decreasing")
        if closed:
            self._check_range(ids, low, high)
        # n bags over n ids with none empty: every bag holds exactly one id
        return ids, offsets, per_sample_weights, offsets.numel() == ids.numel() and smallest >= 1

    def _tables_dtype(self) -> torch.dtype:
        """The floating dtype the tables compute in (per-sample weights are cast to it)."""
        return next(self.parameters()).dtype

    def memory(self) -> MemoryReport:
        """What the module stores: parameters as float bytes, persistent buffers (hashes, pointers) as index bytes."""
        float_bytes = index_bytes = 0
        # the state dict is what the module stores; non-persistent buffers are derived caches
        for tensor in self.state_dict(keep_vars=True).values():
            size = tensor.numel() * tensor.element_size()
            if isinstance(tensor, torch.nn.Parameter):
                float_bytes += size
            else:
                index_bytes += size
        return MemoryReport(float_bytes=float_bytes, index_bytes=index_bytes)

    def budgeted_bytes(self) -> int:
        """The bytes counted against the budget: ``memory().total``, unless a method's accounting says otherwise."""
        return self.memory().total

    def _finish(
        self,
        budget: Budget,
        seed: int,
        smallest_params: int,
        every_budget_from: int | None = None,
        largest_params: int | None = None,
    ) -> None:
        """Check the built sizes against the budget, then initialise from ``seed``. Call last in __init__.

        The three sizes (fp32 values) are what the budget error names; see :func:`compemb.budget.check_budget`.
        """
        self.budget = budget
        self.seed = int(seed)
        check_budget(self.method_name, self.memory(), budget, smallest_params, every_budget_from, largest_params)
        self.reset_parameters()

    def describe_sizes(self) -> str:
        """A line on the sizes the budget chose, for ``compemb methods``; empty when the formula says it all."""
        return ""

    @property
    def init_bound(self) -> float:
        """Untrained output coordinates are about U(-b, b), whatever the method; each method's tables meet it.

        ``init="dlrm"`` (default): b = sqrt(1/n), the DLRM reference init of a full table of the n ids (measured
        on a Criteo-format set: test BCE 0.4752 against 0.4814 for 1/sqrt(d)); an open vocabulary (no n) falls
        back to 1/sqrt(d). ``init="uniform_dim"``: b = 1/sqrt(d). A method whose vector is a sum of c rows
        starts each at b/sqrt(c), a mean of c rows at b*sqrt(c), a product with a table of ones at b.
        """
        if self.init == "dlrm" and self.num_embeddings is not None:
            return self.num_embeddings**-0.5
        return self.embedding_dim**-0.5

    def _generator(self, stream: int = 0) -> torch.Generator:
        # a CPU generator of the module's own: initialisation never touches the global RNG
        return torch.Generator().manual_seed(self.seed * 1_000_003 + stream)

    def _who(self) -> str:
        return f"{self.method_name} embedding {self.name!r}" if self.name else f"{self.method_name} embedding"

    def extra_repr(self) -> str:
        size = f"{self.num_embeddings}, {self.embedding_dim}"
        report = self.memory()
        params = f"stored={report.total:,} bytes"
        if self.num_embeddings is not None:
            params += f", compression={report.compression(self.num_embeddings, self.embedding_dim):.1f}x"
        extras = [f"mode={self.mode!r}"] if self.mode != "sum" else []
        extras += ["sparse=True"] if self.sparse else []
        return ", ".join([size, params, *extras])


def _is_positive_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) > 0


@torch.no_grad()
def init_uniform_(tensor: Tensor, bound: float, generator: torch.Generator) -> None:
    """Fill ``tensor`` with U(-bound, bound) from a CPU ``generator``: the same values on every device."""
    if tensor.is_meta:
        return
    if tensor.device.type == "cpu":
        # in place: no full-size temporary (a 10M x 16 table would need another 640 MB)
        tensor.uniform_(-bound, bound, generator=generator)
    else:
        tensor.copy_(torch.empty(tensor.shape, dtype=tensor.dtype).uniform_(-bound, bound, generator=generator))


@torch.no_grad()
def init_normal_(tensor: Tensor, std: float, generator: torch.Generator) -> None:
    """Fill ``tensor`` with N(0, std^2) from a CPU ``generator``: the same values on every device."""
    if tensor.is_meta:
        return
    if tensor.device.type == "cpu":
        tensor.normal_(0.0, std, generator=generator)
    else:
        tensor.copy_(torch.empty(tensor.shape, dtype=tensor.dtype).normal_(0.0, std, generator=generator))


class _GatherScalars(torch.autograd.Function):
    """Read single floats of an ``(size, 1)`` array; the gradient is sparse (COO) or dense, as asked.

    F.embedding on width-1 rows copies row by row (4x slower than a flat index_select here), so flat-array
    methods read through this instead.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, index: Tensor, sparse: bool) -> Tensor:
        ctx.save_for_backward(index)
        ctx.sparse, ctx.size = sparse, weight.shape[0]
        return weight.view(-1).index_select(0, index.reshape(-1)).view(index.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (index,) = ctx.saved_tensors
        flat_index, flat_grad = index.reshape(1, -1), grad.reshape(-1, 1)
        if ctx.sparse:
            return torch.sparse_coo_tensor(flat_index, flat_grad, (ctx.size, 1), check_invariants=False), None, None
        dense = flat_grad.new_zeros(ctx.size, 1).index_add_(0, flat_index[0], flat_grad)
        return dense, None, None


def gather_scalars(weight: Tensor, index: Tensor, sparse: bool = False) -> Tensor:
    """``weight[index, 0]`` for an ``(size, 1)`` weight, with sparse gradients when ``sparse``; shape of ``index``."""
    return _GatherScalars.apply(weight, index, sparse)
