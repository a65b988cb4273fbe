"""One shared helper for pass tests: structure, numerics, declining and idempotence."""
from typing import Callable, Optional

import torch

from vitopt.pipeline import PassSpec, Pipeline, get_pass


def run_pass(ir, name: str, **options):
    return Pipeline([PassSpec(name, options)]).run(ir)


def check_exact_pass(ir, name: str, structure: Callable, images: torch.Tensor,
                     atol: float = 1e-5, **options) -> None:
    """The pass changes the IR as `structure` says, keeps outputs, and running it twice = once."""
    assert get_pass(name).exact
    first = run_pass(ir, name, **options)
    assert first.records[0].modified, first.records[0].notes
    structure(first.ir)
    with torch.no_grad():
        diff = (first.ir(images) - ir(images)).abs().max().item()
    assert diff <= atol, f"{name} changed the output by {diff}"
    second = run_pass(first.ir, name, **options)
    assert not second.records[0].modified, "running the pass twice must be the same as once"
    with torch.no_grad():
        assert torch.equal(second.ir(images), first.ir(images))


def check_declines(ir, name: str, note: Optional[str] = None, **options) -> None:
    result = run_pass(ir, name, **options)
    record = result.records[0]
    assert not record.modified
    assert record.notes, "a pass that declines must say why"
    if note:
        assert any(note in n for n in record.notes), record.notes
