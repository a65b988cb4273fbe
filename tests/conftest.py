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
if os.environ.get("PYTEST_XDIST_WORKER"):  # TVM's pool too (vitopt defaults it to every core)
    os.environ.setdefault("TVM_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU (skipped without one)")


@functools.lru_cache(maxsize=None)
def traced(family: str):
    """The family's tiny model (random init, seeded: the same weights whichever test builds it
    first and however xdist splits the tests), its example input and its traced IR."""
    from vitopt.frontend.trace import trace
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, example = model_zoo.FAMILIES[family]()
    return model, example, trace(model, example)


@pytest.fixture
def traced_family():
    return traced


@pytest.fixture(scope="session")
def digits_proxy():
    """The accuracy proxy (builtin:digits-vit) traced, with its held-out `test` split: an object
    with .ir, .images, .labels, .top1(model) and .base (the traced model's own top-1)."""
    from types import SimpleNamespace

    from vitopt.data.digits import load_digits_split
    from vitopt.data.proxy import evaluate_top1, trace_digits_vit

    images, labels = load_digits_split("test")
    ir = trace_digits_vit(images[:2])  # with the digits normalisation in its meta

    def top1(model):
        return evaluate_top1(model, images, labels, batch_size=120)
    return SimpleNamespace(ir=ir, images=images, labels=labels, top1=top1, base=top1(ir))
