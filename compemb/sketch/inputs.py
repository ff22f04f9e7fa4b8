"""The HotSketch's arguments checked and converted: IDs as numpy views for the compiled kernels or as tensors on
the sketch's device, and an insert's scores, mass and keep mask (errors name the offending value)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor


def id_array(ids: Any, what: str = "ids") -> tuple[Tensor, np.ndarray]:
    """``ids`` on CPU as a 1-D int32/int64 numpy view (the tensor is returned to keep the memory alive)."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(ids).__name__}")
    dtype = ids.dtype
    if dtype is not torch.int64 and dtype is not torch.int32:
        if dtype.is_floating_point or dtype.is_complex or dtype is torch.bool:
            raise TypeError(f"{what} must be an integer tensor (int64 or int32), got {dtype}")
        ids = ids.long()
    if not ids.is_cpu:
        ids = ids.cpu()
    flat = ids.reshape(-1)
    return flat, flat.numpy()


def id_tensor(ids: Any, device: torch.device, what: str = "ids") -> Tensor:
    """``ids`` as a flat int64 tensor on ``device`` (the torch path)."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype is torch.bool:
        raise TypeError(f"{what} must be an integer tensor (int64 or int32), got {ids.dtype}")
    return ids.reshape(-1).to(device, torch.int64)


def checked_scores(scores: Any, ids: Tensor, device: torch.device) -> Tensor:
    """An insert's ``scores`` (a float tensor of ``ids``' shape) as a flat float32 tensor on ``device``."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a torch.Tensor or None, got {type(scores).__name__}")
    if scores.shape != ids.shape:
        raise ValueError(f"scores must have the shape of ids {tuple(ids.shape)}, got {tuple(scores.shape)}")
    if not scores.dtype.is_floating_point:
        raise TypeError(f"scores must be a floating-point tensor, got {scores.dtype}")
    return scores.detach().reshape(-1).to(device, torch.float32)


def checked_mass(mass: float | Tensor | None, keep_tensor: bool) -> float | Tensor | None:
    """An insert's ``mass``: None, or finite and >= 0; a tensor stays one only where ``keep_tensor`` (the
    vectorised merge decides the decay on the device), else it is read as a float."""
    if isinstance(mass, Tensor) and not keep_tensor:
        mass = float(mass)
    if mass is not None and not isinstance(mass, Tensor) and not (math.isfinite(mass) and mass >= 0):
        raise ValueError(f"mass must be finite and >= 0, got {mass!r}")
    return mass


def checked_keep(keep: Any, ids: Tensor, device: torch.device) -> Tensor:
    """An insert's ``keep`` mask (bools of ``ids``' shape) flat on ``device``."""
    if not isinstance(keep, Tensor) or keep.shape != ids.shape or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool tensor of the shape of ids {tuple(ids.shape)}")
    return keep.reshape(-1).to(device)
