"""One shared helper for pass tests: structure, numerics, declining and idempotence."""
from typing import Callable, Optional

import torch

from vitopt.pipeline import PassSpec, Pipeline, get_pass


def openvino_fuses_attention() -> bool:
    """Whether OpenVINO's CPU plugin runs attention as one fused kernel ("Subgraph") on this CPU.
    Seen with OpenVINO 2026.4: yes with AVX-512 (AMD EPYC Zen 4); no on an AVX2-only EPYC,
    where q.K^T, softmax and P.V run as separate MatMul / Softmax nodes (q.K^T still int8)."""
    from vitopt.artifact import hardware_info
    return "avx512f" in hardware_info()["flags"]


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


# --- lossy passes --------------------------------------------------------------------------
def check_lossy_pass(ir, name: str, structure: Callable, images: torch.Tensor, **options):
    """A lossy pass changes the IR as `structure` says, keeps the output shape (unless
    `structure` returns False), leaves its input alone, and a second run declines."""
    assert not get_pass(name).exact
    with torch.no_grad():
        before = ir(images)
    first = run_pass(ir, name, **options)
    record = first.records[0]
    assert record.modified, record.notes
    assert record.notes, "a lossy pass must say what it did"
    keeps_shape = structure(first.ir) is not False
    with torch.no_grad():
        after = first.ir(images)
        assert torch.equal(ir(images), before), "the pass must not modify its input IR"
    if keeps_shape:
        assert after.shape == before.shape
    assert torch.isfinite(after).all()
    second = run_pass(first.ir, name, **options)
    assert not second.records[0].modified, "running a token pass twice must be the same as once"
    return first


def check_identity(ir, name: str, images: torch.Tensor, note: Optional[str] = None, **options):
    """The identity setting of a lossy pass declines and gives exactly the unchanged output."""
    check_declines(ir, name, note, **options)
    result = run_pass(ir, name, **options)
    with torch.no_grad():
        assert torch.equal(result.ir(images), ir(images))


def check_engines_match(ir, images: torch.Tensor, tmp_path, backends=("onnxruntime", "openvino"),
                        batches=(1, 3), precision: str = "fp32") -> dict:
    """Lower `ir` to ONNX once, build engines in `precision`, compare with the reference
    executor (for int8: the IR's fake quantization) within vitopt.tolerances at every batch
    size. Returns the loaded engines by backend name."""
    from vitopt.backends import get_backend
    from vitopt.lower.onnx_export import export_onnx
    from vitopt.tolerances import compare

    onnx_path = export_onnx(ir, images, tmp_path / "model.onnx")
    engines = {}
    for backend_name in backends:
        backend = get_backend(backend_name)
        files = backend.build(onnx_path, tmp_path / backend_name, precision=precision,
                              max_batch=max(batches))
        engine = backend.load(tmp_path / backend_name, files, precision=precision)
        engines[backend_name] = (engine, tmp_path / backend_name / files[0])
        for batch in batches:
            x = images[:batch] if batch <= images.shape[0] else images.repeat(batch, 1, 1, 1)[:batch]
            with torch.no_grad():
                expected = ir(x)
            result = compare(engine.run(x.numpy()), expected, precision, backend_name)
            assert result.ok, f"{backend_name} batch {batch}: {result}"
    return engines


def check_runs_or_declines(ir, name: str, images, tmp_path, declines: dict, family: str, **options):
    """The pass either declines with the expected note for `family`, or its engines match the IR."""
    result = run_pass(ir, name, **options)
    record = result.records[0]
    if family in declines:
        assert not record.modified and declines[family] in record.notes[0], record.notes
        return
    assert record.modified, record.notes
    check_engines_match(result.ir, images, tmp_path)
