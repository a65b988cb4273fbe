"""Shared fixtures: traced tiny models of every family, cached for the session."""
import functools
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import model_zoo  # noqa: E402

# `make test` runs two pytest-xdist workers on this 2-core machine: one torch thread each, so
# they do not oversubscribe the cores (a single process keeps two).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU (skipped without one)")


@functools.lru_cache(maxsize=None)
def traced(family: str):
    from vitopt.frontend.trace import trace
    model, example = model_zoo.FAMILIES[family]()
    return model, example, trace(model, example)


@pytest.fixture
def traced_family():
    return traced
