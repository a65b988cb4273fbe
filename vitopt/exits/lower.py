"""Lower each segment of an IR with exits to ONNX (or, on AOTInductor, compile its torch
module) and build it as its own engine.

Segment 0: input "images" [B, C, H, W]; later segments: "tokens_in" [B, N, D] (+ "size_in"
[B, N, 1] after token merging). Exit segments return "logits" [B, classes], "tokens" (+ "size"); the
last returns "output". Every input has the same dynamic batch axis. The export is the same
`torch.onnx.export(dynamo=True)` at opset >= 18 as vitopt.lower.onnx_export (LayerNorm as one
node, checked), with several named inputs and outputs.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import List, Tuple

import torch
from torch import nn

from vitopt.errors import ConfigError, LoweringError
from vitopt.exits.segments import SegmentPlan, build_segments
from vitopt.lower.onnx_export import MIN_OPSET, _export_failure, _save


def segment_io(plan: SegmentPlan, k: int) -> Tuple[List[str], List[str]]:
    """Input and output names of segment k."""
    inputs = ["images"] if k == 0 else ["tokens_in"] + (["size_in"] if plan.size_in[k] else [])
    last = k == len(plan.bounds) - 1
    outputs = ["output"] if last else ["logits", "tokens"] + (["size"] if plan.size_out[k] else [])
    return inputs, outputs


def segment_examples(segments, images: torch.Tensor) -> List[tuple]:
    """The inputs each segment gets when the whole batch runs through (for export)."""
    examples, inputs = [], (images,)
    with torch.no_grad():
        for segment in segments:
            examples.append(inputs)
            if segment.exit is not None:
                _, *state = segment(*inputs)
                inputs = tuple(state)
    return examples


def export_segment(module: nn.Module, example: tuple, names: Tuple[List[str], List[str]],
                   path: Path) -> Path:
    input_names, output_names = names
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1))
             for m in module.modules() if isinstance(m, nn.LayerNorm)]
    try:
        with torch.no_grad():
            module(*example)
    finally:
        for hook in hooks:
            hook.remove()
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch} for _ in example)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
                warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, example, dynamo=True, opset_version=MIN_OPSET,
                                        input_names=input_names, output_names=output_names,
                                        dynamic_shapes=dynamic, external_data=False,
                                        verbose=False, report=False)
    except Exception as exc:  # the exporter raises many types
        raise LoweringError(_export_failure(module, exc, True)) from exc
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _save(program, tmp)
        _check(tmp, len(calls), output_names)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check(path: Path, layer_norms: int, output_names: List[str]) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = [o.name for o in model.graph.output]
    if names != output_names:
        raise LoweringError(f"the exported segment has outputs {names}, expected {output_names}")
    found = sum(node.op_type == "LayerNormalization" for node in model.graph.node)
    if found < layer_norms:
        raise LoweringError(f"{layer_norms - found} of {layer_norms} LayerNorms of a segment were "
                            f"decomposed in the exported graph; export with opset >= {MIN_OPSET}")


def export_segments(ir, example: torch.Tensor, onnx_dir: Path) -> Tuple[list, SegmentPlan]:
    """Export every segment to onnx_dir/segment{k}.onnx; returns ([(path, (inputs, outputs))], plan)."""
    segments, plan = build_segments(ir)
    examples = segment_examples(segments, example)
    onnx_dir.mkdir(parents=True, exist_ok=True)
    exported = []
    for k, (segment, inputs) in enumerate(zip(segments, examples)):
        names = segment_io(plan, k)
        exported.append((export_segment(segment, inputs, names, onnx_dir / f"segment{k}.onnx"), names))
    return exported, plan


def build_exported(exported: list, plan: SegmentPlan, backend, build_dir: Path, *, precision: str,
                   max_batch: int, threads=None, log=None) -> list:
    """Build each exported segment with `backend`; returns [{"files", "inputs", "outputs", ...}]."""
    if getattr(backend, "input_format", "onnx") != "onnx":
        raise ConfigError(f"build_exported builds ONNX segments; the {backend.name} backend "
                          f"builds from torch modules: use build_segment_engines")
    built = []
    for k, (path, names) in enumerate(exported):
        files = backend.build(path, build_dir, precision=precision, max_batch=max_batch,
                              threads=threads)
        built.append({"files": files, "inputs": names[0], "outputs": names[1],
                      "stages": list(plan.bounds[k]), "tokens_in": plan.tokens_in[k]})
        if log:
            log(f"segment {k}: stages {plan.bounds[k][0]}..{plan.bounds[k][1] - 1}, inputs "
                f"{', '.join(names[0])} -> {', '.join(names[1])}: built")
    return built


#: Backends that build from torch modules and can build a segment (several batch-first inputs
#: and outputs): AOTInductor. TVM imports whole encoder IRs only; TensorRT has never run here.
TORCH_SEGMENT_BACKENDS = ("aotinductor",)


def build_torch_segments(ir, backend, example: torch.Tensor, build_dir: Path, *, precision: str,
                         max_batch: int, threads=None, log=None) -> Tuple[list, SegmentPlan]:
    """Build each segment module with backend.build_module (files named segment{k}.*)."""
    if backend.name not in TORCH_SEGMENT_BACKENDS:
        raise ConfigError(f"early exits are deployed as one engine per segment on "
                          f"{', '.join(('openvino', 'onnxruntime') + TORCH_SEGMENT_BACKENDS)}; the "
                          f"{backend.name} backend cannot build segments yet. Use --backend openvino, "
                          f"onnxruntime or aotinductor")
    segments, plan = build_segments(ir)
    built = []
    for k, (segment, inputs) in enumerate(zip(segments, segment_examples(segments, example))):
        files = backend.build_module(segment, inputs[0] if k == 0 else tuple(inputs), build_dir,
                                     precision=precision, max_batch=max_batch, threads=threads,
                                     name=f"segment{k}.")
        names = segment_io(plan, k)
        built.append({"files": files, "inputs": names[0],
                      "outputs": names[1], "stages": list(plan.bounds[k]),
                      "tokens_in": plan.tokens_in[k]})
        if log:
            log(f"segment {k}: stages {plan.bounds[k][0]}..{plan.bounds[k][1] - 1}, inputs "
                f"{', '.join(names[0])} -> {', '.join(names[1])}: built ({backend.name})")
    return built, plan


def build_segment_engines(ir, backend, example: torch.Tensor, build_dir: Path, *, precision: str,
                          max_batch: int, threads=None, log=None) -> Tuple[list, SegmentPlan]:
    """Export and build every segment; returns ([{"files", "inputs", "outputs"}], plan)."""
    if getattr(backend, "input_format", "onnx") != "onnx":
        return build_torch_segments(ir, backend, example, build_dir, precision=precision,
                                    max_batch=max_batch, threads=threads, log=log)
    exported, plan = export_segments(ir, example, build_dir.parent / "segments-onnx")
    return build_exported(exported, plan, backend, build_dir, precision=precision,
                          max_batch=max_batch, threads=threads, log=log), plan
