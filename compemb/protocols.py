"""The founding papers' training settings as presets (``--protocol``): what a run needs to be compared with a paper.

A protocol sets defaults of a training command; a flag given beside it still wins. Each names the baseline its
paper measured against, which ``bench quality`` compares every method with unless ``--baseline`` says otherwise.

- ``dlrm``: the DLRM reference's recipe as compemb's defaults had it until 2026-12-06 (SGD at lr 0.1 for the MLPs and
  the tables, batch 2048, DLRM's MLPs at dim 16, one evaluation at the end of the run): what reproduces results
  recorded with those defaults.
- ``cafe-paper``: CAFE (Zhang et al., SIGMOD 2024) on Criteo: SGD at lr 0.1, batch 128, one epoch, one table over
  every feature (the authors' layout: shared sketch and hot table, a hashed table per field, small fields full),
  the test metrics at the end of the epoch; its baseline is the hashed table per field with small fields full
  (``hash-fields``, the authors' ``init_embed.py``).
- ``cce-paper``: CCE (Tsang & Ahle, NeurIPS 2023) on Criteo Kaggle with DLRM's reference script: SGD at lr 0.1,
  batch 128, DLRM's MLPs (bottom 512-256-64, top 512-256) at dim 16, one epoch, validation every 1/6 of it, the
  test metrics of the best; its baseline is the compositional table (``ce``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Protocol:
    """A paper's training settings (TrainConfig field -> value) and the baseline it compares with."""

    name: str
    paper: str
    settings: dict[str, Any] = field(default_factory=dict)
    baseline: str = "hash"


_DLRM_SGD = {
    "optimizer": "sgd",
    "lr": 0.1,
    "table_optimizer": "sgd",
    "table_lr": 0.1,
    "embedding_dim": 16,
    "bottom": (512, 256, 64),
    "top": (512, 256),
}
_DLRM_KAGGLE = {**_DLRM_SGD, "batch_size": 128, "epochs": 1}

PROTOCOLS = {
    "dlrm": Protocol(
        "dlrm",
        "Naumov et al. 2019 (arXiv 1906.00091), compemb's defaults before 2026-12-06",
        {**_DLRM_SGD, "batch_size": 2048, "evals_per_epoch": 0},
        baseline="hash",
    ),
    "cafe-paper": Protocol(
        "cafe-paper",
        "Zhang et al., SIGMOD 2024 (arXiv 2312.03256)",
        {**_DLRM_KAGGLE, "evals_per_epoch": 1, "sharing": "shared"},
        baseline="hash-fields",
    ),
    "cce-paper": Protocol(
        "cce-paper",
        "Tsang & Ahle, NeurIPS 2023 (arXiv 2210.05974)",
        {**_DLRM_KAGGLE, "evals_per_epoch": 6},
        baseline="ce",
    ),
}


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``; a ValueError naming the ones there are otherwise."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; available: {', '.join(PROTOCOLS)}") from None


def cli_defaults(name: str) -> dict[str, Any]:
    """The protocol's settings as defaults of the training commands' arguments (widths as "512,256,64")."""
    from compemb.run_config import cli_defaults as as_cli_defaults

    return as_cli_defaults(get_protocol(name).settings)
