"""Shared pytest set-up: the `cuda` marker skips where no GPU is present; bitsandbytes' import noise is muted."""

import logging

import pytest
import torch

# bitsandbytes logs a warning about an optional `kernels` package on CPU import; it is not a test failure.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def pytest_configure(config):
    # Registered here too, so the marker is known when the tests run outside the repository (the GPU check).
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped where none is present")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
