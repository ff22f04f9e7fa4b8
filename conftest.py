"""Root conftest: names the docstring examples may use without importing them."""

import importlib.util

import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace["torch"] = torch

# the TorchRec adapter needs the optional extra; without it its module is not collected for doctests
# (tests/test_torchrec.py skips with the reason)
collect_ignore = [] if importlib.util.find_spec("torchrec") else ["compemb/integrations/torchrec.py"]
