"""The multilayer perceptron both models use."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch


def mlp(in_features: int, widths: Sequence[int], final_activation: bool = True) -> torch.nn.Sequential:
    """Linear layers of ``widths`` with ReLU between them (and after the last when ``final_activation``)."""
    layers: list[torch.nn.Module] = []
    for index, width in enumerate(widths):
        with warnings.catch_warnings():
            # no dense features (Avazu): the first layer is its bias alone, a learned vector; torch warns that
            # initialising its empty weight does nothing, which is what is meant
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
            layers.append(torch.nn.Linear(in_features, width))
        if final_activation or index < len(widths) - 1:
            layers.append(torch.nn.ReLU())
        in_features = width
    return torch.nn.Sequential(*layers)
