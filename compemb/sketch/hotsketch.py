"""HotSketch, from "CAFE: Towards Compact, Adaptive, and Fast Embedding for Large-scale Recommendation Models",
Zhang et al., SIGMOD 2024 (arXiv 2312.03256), Section 4.

``w`` buckets of ``c`` slots; a slot holds an ID (int64), its score (float32) and its hot-row index (int32,
-1 when the ID has no row of its own). An ID lives in bucket ``h(id)``, one multiply-add-shift function of
:mod:`compemb.hashing`. Inside a bucket the update is Space-Saving's: a present ID adds its score; a new ID
takes an empty slot, else takes over the lowest-scoring slot and adds its score to the one it found there;
a lowest slot that holds a hot ID is never taken over, and the new ID is dropped instead (the paper's rule; with
``skip_hot`` it takes over the lowest-scoring slot that holds no hot ID, and is dropped only when every slot does).

Deviations from the paper, all for batches:

- ``insert`` takes a whole batch: duplicate IDs are summed first, then applied in order of first occurrence.
- Decay (all scores times ``decay_factor``) is checked once per ``insert`` call, after the batch is applied, and
  happens at most once a call however much score mass the batch brought, as the authors' ``batch_insert`` does
  (until 2026-12: once per whole period of mass, ~4 decays a batch of 2,048 for a 16-bucket sketch at threshold 3).
- An occupancy flag per slot (1 byte) marks empty slots, since every int64 is a valid ID; it counts in the bytes.

On CPU the state is read and written by compiled numba kernels through numpy views (which share memory with
the tensors), so a whole batch costs one call into compiled code. A sketch whose parent moved it to an
accelerator keeps its state there and runs the same operations in torch ops (:mod:`compemb.sketch.torch_ops`),
so training on a GPU copies no IDs to the host and uploads no sketch. The buffers themselves (device moves, loads,
numpy views) are :class:`compemb.sketch.state.SketchState`'s; argument checks are in :mod:`compemb.sketch.inputs`.
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import torch
from torch import Tensor

from compemb.budget import MemoryReport
from compemb.hashing import MAX_BUCKETS, coefficient_bytes
from compemb.kernels import on_host
from compemb.sketch import torch_ops
from compemb.sketch.inputs import checked_keep, checked_mass, checked_scores, id_array, id_tensor
from compemb.sketch.kernels import (
    MAX_ROW,
    clear_hot_kernel,
    hot_below_kernel,
    hot_count_kernel,
    insert_kernel,
    query_kernel,
    scale_scores,
    set_hot_kernel,
)
from compemb.sketch.state import SketchState

SKETCH_STREAM = 0x48534B  # "HSK": a stream of its own, independent of a parent's hashes of the same seed
DECAY_PERIOD = 10  # decay once per DECAY_PERIOD * threshold * num_buckets of inserted score mass (the paper's rule)
SLOT_BYTES = 8 + 4 + 4 + 1  # id, score, hot row, occupancy flag
STATE_BYTES = 8  # the float64 mass inserted since the last decay

_NO_SCORES = np.empty(0, dtype=np.float32)  # the kernel's scores argument in frequency mode
# auto: compiled kernels on the host, the vectorised merge on the device path (compemb.kernels); torch: the sequential
# algorithm in torch ops anywhere (the compiled kernels' reference on a device); merge: the vectorised merge anywhere
BACKENDS = ("auto", "torch", "merge")


# --- the module ------------------------------------------------------------------------------------------


class HotSketch(SketchState):
    """CAFE's HotSketch: ``num_buckets x slots`` (id, score, hot row) slots, Space-Saving inside each bucket.

    An ID's score estimates the total score inserted for it (frequency, or gradient norms in CAFE). An ID
    entering a full bucket inherits the score of the one it displaces (Space-Saving), so scores tend to
    overestimate. Hot IDs (those given a row with :meth:`set_hot`) are never displaced.

    Args:
        num_buckets: ``w``, at most 2^31.
        slots: ``c``, slots per bucket (the paper uses 4).
        threshold: the hot threshold of the embedding that owns the sketch; it sets the decay period and is
            :meth:`hot_below`'s default.
        decay_factor: all scores are multiplied by it once the score mass inserted since the last decay passes
            ``10 * threshold * num_buckets`` (checked once per :meth:`insert` call, after the batch: at most one
            decay a call), or on :meth:`decay`.
            In ``(0, 1]``; 1 never decays.
        seed: seeds the bucket hash; ``stream`` separates it from other functions of the same seed.
        device: where the state lives (default CPU); ``"meta"`` plans a sketch without allocating it (a parent
            built on the meta device), which ``to_empty`` later materialises, uninitialised until :meth:`reset`.
        backend: ``"auto"`` (compiled kernels on CPU, torch ops elsewhere) or ``"torch"`` (torch ops everywhere;
            the same results, for checking one against the other).
        skip_hot: a newcomer to a full bucket whose lowest slot is hot takes over the lowest slot that is not hot
            (False, the paper's rule: it is dropped). With a hot table whose rows are taken by the highest scores
            (CAFE's ``hot_policy="top"``) a bucket of hot IDs then still counts its candidates.

    The state (``keys``, ``scores``, ``hot_rows``, ``occupied``, ``mass``, ``coefficients``) is made of
    buffers, so ``state_dict`` saves and restores it exactly. Change it only through the methods. The
    buffers follow a parent module to another device but keep their dtypes (``.half()`` on the parent leaves
    them alone: half-precision scores would stop counting past 2048). IDs on another device than the sketch are
    copied to it, and results return on the IDs' device.

    Shape:
        ``insert(ids (*), scores (*))``; ``query(ids (*))`` -> ``(*)`` float32 scores, ``(*)`` int32 rows.

    Example::

        >>> sketch = HotSketch(1000, threshold=5.0)
        >>> sketch.insert(torch.tensor([7, 7, 42]), torch.tensor([1.0, 2.0, 0.5]))
        0
        >>> sketch.query(torch.tensor([7, 42, 99]))
        (tensor([3.0000, 0.5000, 0.0000]), tensor([-1, -1, -1], dtype=torch.int32))
        >>> sketch.set_hot(torch.tensor([7]), torch.tensor([0]))
        >>> sketch.hot_count(), sketch.memory().sketch_bytes
        (1, 68024)
    """

    def __init__(
        self,
        num_buckets: int,
        slots: int = 4,
        *,
        threshold: float = 1.0,
        decay_factor: float = 0.99,
        seed: int = 0,
        stream: int = SKETCH_STREAM,
        device: torch.device | str | None = None,
        backend: str = "auto",
        skip_hot: bool = False,
    ) -> None:
        if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or not 1 <= num_buckets <= MAX_BUCKETS:
            raise ValueError(f"num_buckets must be an int in [1, {MAX_BUCKETS}], got {num_buckets!r}")
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be a positive int, got {slots!r}")
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"threshold must be a positive finite number, got {threshold!r}")
        if not 0 < decay_factor <= 1:
            raise ValueError(f"decay_factor must be in (0, 1], got {decay_factor!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        super().__init__(num_buckets, slots, seed=seed, stream=stream, device=device)
        self.threshold, self.decay_factor = float(threshold), float(decay_factor)
        self.backend, self.skip_hot = backend, bool(skip_hot)
        # the decay decided on the device at every insert, never from a host float (a CUDA graph replays no host
        # value; compemb.cuda_graph.prepare sets it)
        self.mass_on_device = False

    # --- sizes ---------------------------------------------------------------------------------------

    @staticmethod
    def bytes_for(num_buckets: int, slots: int = 4) -> int:
        """Bytes a sketch of ``num_buckets x slots`` stores, before building it."""
        return num_buckets * slots * SLOT_BYTES + coefficient_bytes(1) + STATE_BYTES

    @staticmethod
    def buckets_for(num_bytes: int, slots: int = 4) -> int:
        """The most buckets of ``slots`` slots that fit in ``num_bytes``; ValueError when not even one does."""
        buckets = (num_bytes - coefficient_bytes(1) - STATE_BYTES) // (slots * SLOT_BYTES)
        if buckets < 1:
            smallest = HotSketch.bytes_for(1, slots)
            raise ValueError(
                f"{num_bytes} bytes cannot hold a HotSketch of {slots} slots; it needs at least {smallest}"
            )
        return min(int(buckets), MAX_BUCKETS)

    @property
    def decay_period(self) -> float:
        """The score mass inserted between two decays: ``10 * threshold * num_buckets``."""
        return DECAY_PERIOD * self.threshold * self.num_buckets

    def memory(self) -> MemoryReport:
        """Its bytes, all counted as sketch bytes."""
        return MemoryReport(float_bytes=0, sketch_bytes=self.bytes_for(self.num_buckets, self.slots))

    # --- state ----------------------------------------------------------------------------------------

    @property
    def _compiled(self) -> bool:
        """Whether the compiled CPU kernels run this sketch (else torch ops)."""
        return self.backend == "auto" and on_host(self.keys)

    @property
    def _merges(self) -> bool:
        """Whether inserts are the vectorised merge (:func:`compemb.sketch.torch_ops.merge_insert`)."""
        return self.backend == "merge" or (self.backend == "auto" and not on_host(self.keys))

    def __setstate__(self, state: dict) -> None:
        state.setdefault("backend", "auto")  # sketches pickled before there was a choice
        state.setdefault("skip_hot", False)
        super().__setstate__(state)

    # --- scores --------------------------------------------------------------------------------------

    @torch.no_grad()
    def insert(
        self, ids: Tensor, scores: Tensor | None = None, mass: float | Tensor | None = None, keep: Tensor | None = None
    ) -> int:
        """Add ``scores`` to ``ids`` (frequency mode when ``scores`` is None: 1 per occurrence); returns how many
        decays the batch set off (0 almost always), or -1 where the host does not know (see below).

        The batch is applied as a whole: the scores of a repeated ID are summed (in float32, in batch order),
        then the distinct IDs are applied one after another in order of their first occurrence. Afterwards,
        if the score mass inserted since the last decay exceeds :attr:`decay_period`, every score is multiplied
        by ``decay_factor`` once (at most once a call, as the authors' ``batch_insert``; one float32 rounding)
        and the mass starts again from 0.

        Args:
            ids: int64 (or int32) IDs, any shape, any device.
            scores: finite, non-negative floats of the same shape (cast to float32), or None.
            mass: what the batch counts towards the decay (default: the sum of its scores). Scores normalised to
                mean 1 (CAFE's) pass the number of occurrences, which they sum to: a float sum lands on either
                side of a period's end by rounding, and the decay would then depend on the order of additions
                (one process or several, CPU or GPU). A 0-dim tensor (a count that stays on the device) is
                allowed with the vectorised merge: the decay is then decided on the device and -1 returned.
            keep: optional bools of ``ids``' shape; entries where it is False are left out (a kept id must be
                kept in all its occurrences).

        With the vectorised merge (an accelerator, ``kernels="torch"``, ``backend="merge"``) the batch is merged
        into each bucket at once (:func:`compemb.sketch.torch_ops.merge_insert`, which says how that differs
        from applying the IDs one by one); bad scores fail a device-side assert (a RuntimeError when the device
        next synchronises), and with ``mass`` given as a float, or frequency scores, nothing is read back.

        Raises:
            ValueError: shapes differ, or a score is negative, NaN or infinite (the sketch is left unchanged).
            TypeError: ids that are not integers, or scores that are not floats.
        """
        device = self.keys.device
        # the IDs are checked first, then the scores, the mass and the mask
        flat_ids = id_array(ids)[1] if self._compiled else id_tensor(ids, device)
        scores = None if scores is None else checked_scores(scores, ids, device)
        mass = checked_mass(mass, keep_tensor=self._merges)
        if keep is not None:
            keep = checked_keep(keep, ids, device)
            if not self._merges:  # the exact paths take the kept entries only
                kept = ids.reshape(-1)[keep.to(ids.device)]
                flat_ids = id_array(kept)[1] if self._compiled else id_tensor(kept, device)
                scores = None if scores is None else scores[keep]
                keep = None
        if self._merges:  # (never compiled: the ids are a tensor)
            return self._insert_merge(cast(Tensor, flat_ids), scores, mass, keep)
        exact_mass = cast("float | None", mass)  # off the merge checked_mass read a tensor mass as a float
        if not self._compiled:
            return self._insert_torch(cast(Tensor, flat_ids), scores, exact_mass)
        return self._insert_compiled(cast(np.ndarray, flat_ids), scores, exact_mass)

    def _insert_compiled(self, ids: np.ndarray, scores: Tensor | None, mass: float | None) -> int:
        """:meth:`insert` by the compiled kernel, on the host."""
        score_array, unit = (_NO_SCORES, True) if scores is None else (scores.numpy(), False)
        keys, table, rows, occupied, mass_array, coefficients = self._arrays()
        bad, periods = insert_kernel(
            ids,
            score_array,
            unit,
            keys,
            table,
            rows,
            occupied,
            mass_array,
            coefficients,
            self.decay_period,
            self.decay_factor,
            -1.0 if mass is None else float(mass),
            self.skip_hot,
        )
        if bad >= 0:
            raise ValueError(f"scores must be finite and >= 0, got {float(score_array[bad])} at flat index {bad}")
        self._known_mass = float(mass_array[0])
        return int(periods)

    def _insert_merge(
        self, ids: Tensor, scores: Tensor | None, counted: float | Tensor | None, keep: Tensor | None
    ) -> int:
        """:meth:`insert` as one vectorised merge; the decay mass is followed on the host while it is known."""
        if scores is None:
            values = torch.ones(ids.numel(), dtype=torch.float32, device=ids.device)
            total: float | Tensor = float(ids.numel()) if keep is None else keep.sum(dtype=torch.float64)
        else:
            good = ((scores >= 0) & (scores < math.inf)).all()  # NaN fails both
            torch._assert_async(good, "compemb: HotSketch.insert: a score is negative, NaN or infinite")
            values = scores if keep is None else torch.where(keep, scores, 0.0)
            total = values.double().sum()
        torch_ops.merge_insert(
            ids,
            values,
            keep,
            self.keys,
            self.scores,
            self.hot_rows,
            self.occupied,
            self.coefficients,
            skip_hot=self.skip_hot,
        )
        counted = total if counted is None else counted
        if self.mass_on_device and not isinstance(counted, Tensor):  # (a CUDA graph replays no host value)
            counted = torch.full((), float(counted), dtype=torch.float64, device=self.mass.device)
        if isinstance(counted, Tensor):
            return self._decay_on_device(counted)
        before = self.mass_since_decay()  # read from the device only after a load
        return self._decay_by(before + float(counted))

    def _decay_on_device(self, counted: Tensor) -> int:
        """The decay rule with the mass on the device (nothing read back); -1: the host does not know."""
        limit, factor = self.decay_period, self.decay_factor
        mass = self.mass[0] + counted.to(self.mass.dtype)
        over = mass > limit
        if factor < 1.0:
            scale = torch.where(over, factor, 1.0).to(torch.float64)
            self.scores.copy_((self.scores.double() * scale).float())
        mass = torch.where(over, 0.0, mass)
        self.mass.copy_(mass.reshape(1))
        self._known_mass = None
        return -1

    def _decay_by(self, mass: float) -> int:
        """The decay rule on the host, given the mass inserted since the last decay: past a period, scale the
        scores once and count afresh (exactly as the compiled kernel); returns the decays (0 or 1)."""
        periods = 0
        if mass > self.decay_period:
            mass = 0.0
            if self.decay_factor < 1.0:
                periods = 1
                self.scores.copy_((self.scores.double() * self.decay_factor).float())
        self.mass.fill_(mass)
        self._known_mass = mass
        return periods

    def _insert_torch(self, ids: Tensor, scores: Tensor | None, counted: float | None = None) -> int:
        """:meth:`insert` in torch ops: one small read back to the host, then one set of ops per round."""
        unique_ids, unique_scores, buckets, by_round, readback = torch_ops.plan_insert(
            ids, scores, self.num_buckets, self.coefficients, self.mass
        )
        bad, before, mass, *per_round = readback.tolist()
        mass = mass if counted is None else before + float(counted)
        if bad >= 0:
            value = float(scores[int(bad)])  # type: ignore[index]
            raise ValueError(f"scores must be finite and >= 0, got {value} at flat index {int(bad)}")
        torch_ops.apply_rounds(
            unique_ids,
            unique_scores,
            buckets,
            by_round,
            [int(count) for count in per_round],
            self.keys,
            self.scores,
            self.hot_rows,
            self.occupied,
            skip_hot=self.skip_hot,
        )
        return self._decay_by(mass)  # exactly as the compiled kernel decays

    @torch.no_grad()
    def query(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Scores (float32) and hot rows (int32) of ``ids``, with their shape and device; 0 and -1 when absent."""
        if not self._compiled:
            flat = id_tensor(ids, self.keys.device)
            score_tensor, row_tensor = torch_ops.query(
                flat, self.keys, self.scores, self.hot_rows, self.occupied, self.coefficients
            )
        else:
            _, flat_ids = id_array(ids)
            keys, table, rows, occupied, _, coefficients = self._arrays()
            scores = np.empty(flat_ids.shape[0], dtype=np.float32)
            hot = np.empty(flat_ids.shape[0], dtype=np.int32)
            query_kernel(flat_ids, keys, table, rows, occupied, coefficients, scores, hot)
            score_tensor, row_tensor = torch.from_numpy(scores), torch.from_numpy(hot)
        score_tensor, row_tensor = score_tensor.view(ids.shape), row_tensor.view(ids.shape)
        return score_tensor.to(ids.device), row_tensor.to(ids.device)

    @torch.no_grad()
    def decay(self) -> None:
        """Multiply every score by ``decay_factor`` now, and restart the count of mass towards the next decay."""
        if not self._compiled:
            self.scores.copy_((self.scores.double() * self.decay_factor).float())
            self.mass.zero_()
        else:
            _, table, _, _, mass, _ = self._arrays()
            scale_scores(table, self.decay_factor)
            mass[0] = 0.0
        self._known_mass = 0.0

    # --- hot rows ------------------------------------------------------------------------------------

    @torch.no_grad()
    def set_hot(self, ids: Tensor, rows: Tensor) -> None:
        """Give each of ``ids`` (present in the sketch) its hot row from ``rows`` (same shape, in [0, 2^31)).

        A repeated ID keeps its last row (on CPU; pass distinct IDs on an accelerator).

        Raises:
            ValueError: shapes differ, a row is out of range, or an ID is not in the sketch (nothing changes then).
        """
        if isinstance(ids, Tensor) and isinstance(rows, Tensor) and rows.shape != ids.shape:
            raise ValueError(f"rows must have the shape of ids {tuple(ids.shape)}, got {tuple(rows.shape)}")
        if not self._compiled:
            device = self.keys.device
            flat_ids, flat_rows = id_tensor(ids, device), id_tensor(rows, device, "rows")
            torch_ops.set_hot(flat_ids, flat_rows, self.keys, self.hot_rows, self.occupied, self.coefficients)
            return
        _, id_values = id_array(ids)
        _, row_values = id_array(rows, "rows")
        keys, _, hot, occupied, _, coefficients = self._arrays()
        problem, index = set_hot_kernel(id_values, row_values, keys, hot, occupied, coefficients)
        if problem == 1:
            raise ValueError(f"rows must be in [0, {MAX_ROW}], got {int(row_values[index])}")
        if problem == 2:
            raise ValueError(f"id {int(id_values[index])} is not in the sketch: only present IDs can be made hot")

    @torch.no_grad()
    def set_hot_where(self, ids: Tensor, rows: Tensor, where: Tensor) -> None:
        """:meth:`set_hot` for the ``where`` entries only, in fixed shapes (nothing read back): those ids must be
        present, distinct and not hot; the others are left alone."""
        flat_ids = id_tensor(ids, self.keys.device)
        torch_ops.set_hot_where(flat_ids, rows, where, self.keys, self.hot_rows, self.occupied, self.coefficients)

    @torch.no_grad()
    def clear_hot(self, ids: Tensor) -> Tensor:
        """Take their rows from ``ids``; returns the rows taken (int32, ids' shape, -1 where there was none)."""
        if not self._compiled:
            flat_ids = id_tensor(ids, self.keys.device)
            released = torch_ops.clear_hot(flat_ids, self.keys, self.hot_rows, self.occupied, self.coefficients)
        else:
            _, id_values = id_array(ids)
            keys, _, hot, occupied, _, coefficients = self._arrays()
            released = torch.from_numpy(clear_hot_kernel(id_values, keys, hot, occupied, coefficients))
        return released.view(ids.shape).to(ids.device)

    def hot_below(self, threshold: float | None = None) -> tuple[Tensor, Tensor]:
        """IDs (int64) and rows (int32), on the sketch's device, of hot slots scoring below ``threshold``
        (default: the sketch's), in slot order."""
        threshold = self.threshold if threshold is None else float(threshold)
        if not self._compiled:
            return torch_ops.hot_below(self.keys, self.scores, self.hot_rows, self.occupied, threshold)
        keys, table, hot, occupied, _, _ = self._arrays()
        found_ids, found_rows = hot_below_kernel(keys, table, hot, occupied, threshold)
        return torch.from_numpy(found_ids), torch.from_numpy(found_rows)

    def hot_count(self) -> int:
        """How many slots hold a hot ID."""
        if not self._compiled:
            return int((self.occupied & (self.hot_rows >= 0)).sum())
        _, _, hot, occupied, _, _ = self._arrays()
        return int(hot_count_kernel(hot, occupied))

    def items(self) -> tuple[Tensor, Tensor, Tensor]:
        """IDs (int64), scores (float32) and hot rows (int32) of every occupied slot, in slot order."""
        used = self.occupied
        return self.keys[used], self.scores[used], self.hot_rows[used]

    def extra_repr(self) -> str:
        text = f"num_buckets={self.num_buckets}, slots={self.slots}, threshold={self.threshold:g}"
        if self.decay_factor != 0.99:
            text += f", decay_factor={self.decay_factor:g}"
        text += f", seed={self.seed}"
        text += ", skip_hot=True" if self.skip_hot else ""
        return text + (f", backend={self.backend!r}" if self.backend != "auto" else "")
