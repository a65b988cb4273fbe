"""Shared fixtures: traced tiny models of every family, cached for the session."""
import functools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import model_zoo  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


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
