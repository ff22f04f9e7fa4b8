"""TorchRec's managed collision handling (MCH) as a baseline: a zero-collision table with LFU eviction.

TorchRec's answer to CAFE's question (which ids deserve a row): ``MCHManagedCollisionModule`` keeps ``zch_size``
slots, each owned by one raw id; every ``eviction_interval`` training steps it counts the ids it saw and lets the
most frequent newcomers take the slots of the least frequently used residents (``LFU_EvictionPolicy``). An id
without a slot reads the table's last row, which every such id shares (TorchRec's default row). The remapping is
TorchRec's own module (``torchrec.modules.mc_modules``); compemb adds what its unsharded collection leaves as a
TODO: an evicted slot's row starts again from the table's init and its optimizer state is reset, as any row that
changes owner (:func:`~compemb.embeddings.adaptive.reset_optimizer_rows`).

Memory is honest: the rows, and per slot TorchRec's three int64 buffers (the sorted raw ids, their slots, the LFU
counts), plus its iteration counter. Its output segments (1,025 int64 bounds for up to 1,024 row-wise shards) follow
from the table's size: they are rebuilt, not saved, and not counted. Needs TorchRec (``make torchrec``; CI has it).

On a device a step waits for the host (TorchRec's remap indexes with boolean masks, its eviction counts with
``unique``): a baseline, not held to compemb's no-wait rule. TorchRec sizes its history buffer from the first batch
it profiles (1.25 batches an eviction interval) and drops what does not fit. Deviation: ids are profiled after the
optimizer step (the ids the backward saw, as compemb's other adaptive methods), where TorchRec's
``ManagedCollisionEmbeddingBagCollection`` profiles in its forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from compemb.budget import FLOAT_BYTES, every_budget_from, resolve_budget
from compemb.embeddings.adaptive import AdaptiveEmbedding, reset_optimizer_rows
from compemb.embeddings.base import init_uniform_
from compemb.registry import register

SLOT_BYTES = 3 * 8  # per slot: TorchRec's sorted raw id, its remapped slot and its LFU count (int64 each)


def _torchrec_mch():
    try:
        from torchrec.modules.mc_modules import LFU_EvictionPolicy, MCHManagedCollisionModule
        from torchrec.sparse.jagged_tensor import JaggedTensor
    except ImportError as error:  # an optional extra: say how to get it
        raise ValueError(f"mch needs TorchRec (pip install '.[torchrec]' and `make torchrec`): {error}") from None
    return MCHManagedCollisionModule, LFU_EvictionPolicy, JaggedTensor


@register("mch")
class ManagedCollisionEmbedding(AdaptiveEmbedding):
    """TorchRec's MCH: ``zch_size`` rows, one per resident id, LFU eviction; non-residents share the last row.

    Args:
        eviction_interval: training steps between TorchRec's evictions (default 1: every step).

    Example::

        >>> emb = ManagedCollisionEmbedding(100_000, 16, compression=100)
        >>> emb.zch_size, emb(torch.tensor([3, 99_999])).shape  # 64,000 bytes: 727 rows of 16 floats and their slots
        (727, torch.Size([2, 16]))
    """

    title = "TorchRec MCH: LFU-owned rows"
    formula = "zch_size * (d + 6)"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        compression: float | None = None,
        num_params: int | None = None,
        eviction_interval: int = 1,
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
        self._start_recording("frequency")
        if isinstance(eviction_interval, bool) or not isinstance(eviction_interval, int) or eviction_interval < 1:
            raise ValueError(f"{self._who()}: eviction_interval must be a positive int, got {eviction_interval!r}")
        module, policy, self._jagged = _torchrec_mch()
        budget = resolve_budget(num_embeddings, embedding_dim, compression=compression, num_params=num_params)
        d = self.embedding_dim
        per_row = d * FLOAT_BYTES + SLOT_BYTES
        # what TorchRec's state holds besides the slots, measured on a two-slot module (less the segments' padding)
        probe = module(zch_size=2, device=torch.device("cpu"), eviction_policy=policy(), eviction_interval=1)
        fixed = sum(t.numel() * t.element_size() for t in probe.state_dict().values()) - 2 * SLOT_BYTES
        fixed -= probe._output_segments_tensor.numel() * 8  # derived from zch_size: not saved (below)
        self.zch_size = max(2, round((budget.num_bytes - fixed) / per_row))
        self.eviction_interval = eviction_interval
        self.mch = module(
            zch_size=self.zch_size,
            device=torch.device(device or "cpu"),
            eviction_policy=policy(),
            eviction_interval=eviction_interval,
            name=name or "mch",
        )
        # TorchRec's output segments (1,025 int64 bounds for up to 1,024 row-wise shards, [0, zch_size] and -1
        # padding here) follow from zch_size: rebuilt by the constructor, so not saved and not counted
        self.mch._non_persistent_buffers_set.add("_output_segments_tensor")
        self.weight = torch.nn.Parameter(torch.empty(self.zch_size, d, device=device))
        self._slots_assigned = 0
        smallest = 2 * per_row + fixed
        self._finish(budget, seed, -(-smallest // FLOAT_BYTES), every_budget_from(per_row // FLOAT_BYTES, fixed))

    def reset_tables(self) -> None:
        with torch.no_grad():  # TorchRec's buffers as it starts them: no id resident, counts zero
            self.mch._mch_sorted_raw_ids.fill_(torch.iinfo(torch.int64).max)
            self.mch._mch_remapped_ids_mapping.copy_(torch.arange(self.zch_size, device=self.weight.device))
            for buffer in self.mch._mch_metadata.values():
                buffer.zero_()
            self.mch._current_iter_tensor.zero_()
        self.mch._current_iter, self.mch._current_history_buffer_offset = -1, 0
        init_uniform_(self.weight, self.init_bound, self._generator())

    def rows_of(self, ids: Tensor) -> Tensor:
        """The row each id reads: its slot when resident, else the shared last row (TorchRec's remap)."""
        features = {"ids": self._jagged(values=ids, lengths=torch.ones_like(ids))}
        return self.mch.remap(features)["ids"].values()

    def _vectors(self, ids: Tensor) -> Tensor:
        return F.embedding(self.rows_of(ids), self.weight, sparse=self.sparse)

    def capture_refusal(self) -> str | None:
        return "evicts through TorchRec's managed-collision module, which replaces its tensors every step"

    def _update(self, ids: Tensor, scores: Tensor | None, optimizer: torch.optim.Optimizer | None) -> None:
        # one step's ids profiled by TorchRec, which evicts every eviction_interval steps; a padding id takes no slot
        if self.padding_idx is not None:
            ids = ids[ids != self.padding_idx]
        self.mch.train()
        self.mch.profile({"ids": self._jagged(values=ids, lengths=torch.ones_like(ids))})
        evicted = self.mch.evict()
        if evicted is None or evicted.numel() == 0:
            return
        rows = evicted.to(torch.long).unique()
        self._slots_assigned += int(rows.numel())
        fresh = torch.empty(rows.numel(), self.embedding_dim, dtype=self.weight.dtype)
        init_uniform_(fresh, self.init_bound, self._generator(1 + self._slots_assigned))
        self.weight.data[rows] = fresh.to(self.weight.device)  # a new owner starts as a new row
        reset_optimizer_rows(optimizer, self.weight, rows)

    def describe_sizes(self) -> str:
        """The slots the budget bought, in a line (for ``compemb methods``)."""
        return f"{self.zch_size:,} slots (the last shared by every id without one), LFU eviction"

    def extra_repr(self) -> str:
        return super().extra_repr() + f", zch_size={self.zch_size}, eviction_interval={self.eviction_interval}"
