"""Writing a data set: the output directory's check, and :class:`DatasetWriter`, which fills the arrays chunk by
chunk through memory maps in a temporary directory and renames it into place when complete."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from compemb.data.dataset.format import MANIFEST, SPLIT_ENTRIES, VALIDATED_FILE, VOCABULARY_FILE, sparse_dtype
from compemb.io import atomic_write_text, exchange_paths, remove_dead_temporaries, temporary_prefix
from compemb.outputs import check_output_directory


def _is_dataset(path: Path) -> bool:
    """Whether ``path`` holds a compemb data set and nothing else (so replacing it loses nothing of the user's)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        splits = set(manifest["rows"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for entry in path.iterdir():
        if entry.name in (MANIFEST, VOCABULARY_FILE, VALIDATED_FILE):
            continue
        if entry.name not in splits or not entry.is_dir() or not {e.name for e in entry.iterdir()} <= SPLIT_ENTRIES:
            return False
    return True


def check_output(path: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = (), overwrite: bool = False) -> None:
    """Refuse an output directory whose replacement would delete what compemb did not write, or a data set.

    ``path`` may be missing, an empty directory, or (with ``overwrite``) a compemb data set, which the new one
    replaces when complete; anything else, or a directory holding one of ``inputs``, raises ``ValueError`` naming it.
    """
    path = Path(path)
    check_output_directory(path)  # not a dangling link, not inside another data set or run
    resolved = path.resolve()
    for given in inputs:
        if resolved in Path(given).resolve().parents:
            raise ValueError(f"output {path} would hold the input {given}: choose another --out")
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"output {path} exists and is not a directory: choose another --out")
    if any(path.iterdir()) and not _is_dataset(path):
        raise ValueError(
            f"output {path} exists and is not a compemb data set (it would be replaced): "
            "choose a new or empty directory, or remove it yourself"
        )
    if _is_dataset(path) and not overwrite:
        raise ValueError(f"output {path} holds a compemb data set: --overwrite replaces it (or choose another --out)")


class DatasetWriter:
    """Writes splits of known sizes chunk by chunk, then publishes the directory atomically.

    Example::

        >>> import tempfile
        >>> from compemb.data.dataset import open_dataset
        >>> out = tempfile.mkdtemp() + "/data"
        >>> with DatasetWriter(out, {"train": 2}, num_dense=1, cardinalities=[5]) as writer:
        ...     writer.write("train", np.zeros((2, 1), np.float32), np.array([[1], [4]]), np.array([0, 1]))
        >>> open_dataset(out)[1]["train"].sparse.tolist()
        [[1], [4]]
    """

    def __init__(
        self,
        path: str | os.PathLike,
        rows: dict[str, int],
        num_dense: int,
        cardinalities: list[int],
        unlabeled: tuple[str, ...] = (),
        bags: Sequence[dict[str, Any]] = (),
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        self.overwrite = overwrite  # an existing compemb data set at path may be replaced
        # multi-hot features: {"name", "cardinality", "pooling"} each; their ids are kept per chunk and written whole
        # at close (a split's number of ids is not known before its rows are)
        self.bags = [dict(bag) for bag in bags]
        for bag in self.bags:
            if bag.get("pooling") not in ("sum", "mean") or int(bag.get("cardinality", 0)) < 1 or not bag.get("name"):
                raise ValueError(f"a bag feature needs a name, a cardinality >= 1 and pooling sum or mean, got {bag}")
        self._bag_chunks: dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]] = {
            split: {bag["name"]: [] for bag in self.bags} for split in rows
        }
        self.unlabeled = tuple(unlabeled)
        check_output(self.path, overwrite=overwrite)
        # a name of its own: two writers of the same output never share (or delete) each other's files
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(self.path)  # what a killed writer of this output left
        dtypes: dict[str, npt.DTypeLike] = {
            "dense": np.float32,
            "sparse": sparse_dtype(cardinalities),
            "labels": np.uint8,
        }
        need = sum(
            count
            * (num_dense * 4 + len(cardinalities) * np.dtype(dtypes["sparse"]).itemsize + (split not in self.unlabeled))
            for split, count in rows.items()
        )
        free = shutil.disk_usage(self.path.parent).free
        if need > free:  # before anything is written (an absurd --train-rows, a full disk)
            raise OSError(
                f"no room for the data set {self.path}: its arrays need {need:,} bytes, {free:,} are free on that disk"
            )
        self.temporary = Path(
            tempfile.mkdtemp(prefix=temporary_prefix(self.path), suffix=".partial", dir=self.path.parent)
        )
        self.rows = dict(rows)
        self.cardinalities = list(cardinalities)
        self.filled = {split: 0 for split in rows}
        self.facts: dict[str, Any] = {}  # written into the manifest beside the row counts and cardinalities
        self.arrays: dict[str, dict[str, np.memmap]] = {}
        shapes: dict[str, tuple[tuple[int, ...], npt.DTypeLike]] = {
            "dense": ((num_dense,), np.float32),
            "sparse": ((len(cardinalities),), sparse_dtype(cardinalities)),
            "labels": ((), np.uint8),
        }
        try:
            for split, count in rows.items():
                (self.temporary / split).mkdir()
                self.arrays[split] = {
                    name: np.lib.format.open_memmap(
                        self.temporary / split / f"{name}.npy", mode="w+", dtype=dtype, shape=(count, *width)
                    )
                    for name, (width, dtype) in shapes.items()
                    if not (name == "labels" and split in self.unlabeled)
                }
                for name in self.arrays[split]:
                    _reserve(self.temporary / split / f"{name}.npy")
        except OSError as error:  # no room for the arrays: nothing half-made is left beside the data set
            shutil.rmtree(self.temporary, ignore_errors=True)
            raise OSError(
                f"no room for the data set {self.path} ({error.strerror}): its arrays need {need:,} bytes"
            ) from None
        except BaseException:
            shutil.rmtree(self.temporary, ignore_errors=True)
            raise

    def write(
        self,
        split: str,
        dense: np.ndarray,
        sparse: np.ndarray,
        labels: np.ndarray | None,
        bags: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        """Append a chunk of rows to ``split`` (ids are checked against the cardinalities).

        ``bags``: each multi-hot feature's ``(values, lengths)`` for these rows (required when the writer has bags).
        """
        if (labels is None) != (split in self.unlabeled):
            raise ValueError(
                f"split {split!r} is {'un' if split in self.unlabeled else ''}labeled; "
                f"labels {'were' if labels is not None else 'were not'} given"
            )
        start, count = self.filled[split], len(sparse)
        if start + count > self.rows[split]:
            raise ValueError(f"split {split!r} holds {self.rows[split]} rows; this chunk would make {start + count}")
        if sparse.size and (sparse.min() < 0 or (sparse >= np.array(self.cardinalities)).any()):
            raise ValueError(f"split {split!r}: an id is outside its feature's cardinality {self.cardinalities}")
        given = set(bags or {})
        if given != {bag["name"] for bag in self.bags}:
            raise ValueError(
                f"split {split!r}: bags given for {sorted(given)}, the data set has "
                f"{[bag['name'] for bag in self.bags]}"
            )
        for bag in self.bags:
            assert bags is not None  # given names every bag (the check above)
            values, lengths = (np.asarray(a) for a in bags[bag["name"]])
            if lengths.shape != (count,) or lengths.dtype.kind not in "iu" or (lengths < 0).any():
                raise ValueError(f"split {split!r}, bag {bag['name']!r}: lengths must be {count} non-negative integers")
            if values.ndim != 1 or len(values) != int(lengths.sum()) or values.dtype.kind not in "iu":
                raise ValueError(
                    f"split {split!r}, bag {bag['name']!r}: {len(values)} values for lengths summing to "
                    f"{int(lengths.sum())}"
                )
            if values.size and (values.min() < 0 or values.max() >= bag["cardinality"]):
                raise ValueError(f"split {split!r}, bag {bag['name']!r}: an id is outside [0, {bag['cardinality']})")
            self._bag_chunks[split][bag["name"]].append((values, lengths))
        arrays = self.arrays[split]
        arrays["dense"][start : start + count] = dense
        arrays["sparse"][start : start + count] = sparse
        if labels is not None:
            arrays["labels"][start : start + count] = labels
        self.filled[split] = start + count

    def mark_written(self, split: str, count: int) -> None:
        """Record that ``count`` rows of ``split`` were written into its arrays (``temporary/split/*.npy``) by other
        processes (parallel preprocessing), so :meth:`close` accepts the split as filled."""
        if not 0 <= count <= self.rows[split]:
            raise ValueError(f"split {split!r} holds {self.rows[split]} rows, not {count}")
        for array in self.arrays[split].values():  # the other processes' writes reach the files through this map too
            array.flush()
        self.filled[split] = count

    def append(self, dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray | None) -> None:
        """Append rows in file order: they fill the splits one after another, in the order ``rows`` lists them."""
        done = 0
        for split, count in self.rows.items():
            room = count - self.filled[split]
            if room <= 0 or done == len(sparse):
                continue
            take = min(room, len(sparse) - done)
            part = slice(done, done + take)
            self.write(split, dense[part], sparse[part], None if labels is None else labels[part])
            done += take
        if done < len(sparse):
            raise ValueError(f"{len(sparse) - done} rows more than the splits hold ({self.rows})")

    def close(self) -> None:
        """Flush, write the manifest (with ``self.facts``), and rename the directory into place; on any failure
        the temporary directory is removed and the output left as it was."""
        try:
            self._publish()
        except BaseException:
            shutil.rmtree(self.temporary, ignore_errors=True)
            raise

    def _publish(self) -> None:
        missing = {
            split: (self.filled[split], count) for split, count in self.rows.items() if self.filled[split] != count
        }
        if missing:
            raise ValueError(f"splits not filled (written, expected): {missing}")
        for arrays in self.arrays.values():
            for array in arrays.values():
                array.flush()
        for split, chunks in self._bag_chunks.items():
            for bag in self.bags:
                parts = chunks[bag["name"]]
                values = np.concatenate([v for v, _ in parts]) if parts else np.zeros(0, np.int64)
                lengths = np.concatenate([n for _, n in parts]) if parts else np.zeros(0, np.int64)
                offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
                np.cumsum(lengths, out=offsets[1:])
                folder = self.temporary / split / "bags"
                folder.mkdir(exist_ok=True)
                np.save(folder / f"{bag['name']}.values.npy", values.astype(sparse_dtype([bag["cardinality"]])))
                np.save(folder / f"{bag['name']}.offsets.npy", offsets)
        manifest = {"rows": self.rows, "cardinalities": self.cardinalities, **self.facts}
        if self.bags:
            manifest["bags"] = self.bags
        if self.unlabeled:
            manifest["unlabeled"] = list(self.unlabeled)
        atomic_write_text(self.temporary / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        # again: something may have been put there while the set was written (another writer's set, say)
        check_output(self.path, overwrite=self.overwrite)  # (close removes this set: nothing of it stays)
        try:
            if self.path.exists() and exchange_paths(self.temporary, self.path):
                # the old set and the new one swapped in one step: --out is never without a whole data set
                shutil.rmtree(self.temporary)
            elif self.path.exists():  # (no atomic exchange here) moved aside, replaced, then removed
                previous = Path(
                    tempfile.mkdtemp(prefix=temporary_prefix(self.path), suffix=".old", dir=self.path.parent)
                )
                os.replace(self.path, previous / "set")
                os.replace(self.temporary, self.path)
                shutil.rmtree(previous)
            else:
                os.replace(self.temporary, self.path)
        except OSError as error:  # another writer published there between the check and the rename
            raise ValueError(
                f"output {self.path} was written by another process meanwhile: this data set was not "
                f"published ({error.strerror})"
            ) from None

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, error_type: type | None, *rest: object) -> None:
        if error_type is None:
            self.close()
        else:
            shutil.rmtree(self.temporary, ignore_errors=True)


def _reserve(path: Path) -> None:
    """Allocate a memory-mapped array file's blocks now: a full disk is an OSError here, not a SIGBUS (a crash
    with no message) at the first write into the map. Filesystems that cannot reserve are left to the space check."""
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(descriptor, 0, os.fstat(descriptor).st_size)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(descriptor)
