"""Lower a torch module (the encoder IR, or any images -> tensor module) to one ONNX file.

The single ONNX lowering that ONNX Runtime, OpenVINO and TensorRT all read (design §4):
`torch.onnx.export(dynamo=True)`, opset >= 18, one input "images" [batch, C, H, W] with a
dynamic batch, one output "output", weights inside the file (no external data). At opset >= 17
the dynamo exporter emits each LayerNorm as one LayerNormalization node and attention as
MatMul/Softmax/MatMul, which OpenVINO fuses into its attention kernels; export_onnx checks the
LayerNorm part on the produced graph and refuses a graph where LayerNorms were decomposed.
The exporter's progress prints and warnings are kept out of the user's terminal; on failure
the cause goes into the LoweringError.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Union

import torch
from torch import nn

from vitopt.errors import ConfigError, LoweringError

MIN_OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAME = "output"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def export_onnx(module: nn.Module, example: torch.Tensor, path: Union[str, Path],
                opset: int = MIN_OPSET, dynamic_batch: bool = True) -> Path:
    """Export `module` (images [B,C,H,W] float32 -> one tensor) to `path`; returns the path."""
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ConfigError(f"ONNX opset {opset!r} is too old; use {MIN_OPSET} or newer "
                          f"(LayerNormalization needs 17, vitopt's lowering assumes {MIN_OPSET})")
    if not isinstance(example, torch.Tensor) or example.ndim != 4 or not example.is_floating_point():
        got = (f"{type(example).__name__} of shape {list(example.shape)} and dtype {example.dtype}"
               if isinstance(example, torch.Tensor) else type(example).__name__)
        raise LoweringError(f"the example input must be a float tensor [B, C, H, W]; got {got}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    modes = {sub: sub.training for sub in module.modules()}
    module.eval()
    try:
        layer_norm_calls = _count_layer_norm_calls(module, example)
        program = _run_exporter(module, example, opset, dynamic_batch)
    finally:
        for sub, training in modes.items():
            sub.training = training
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _save(program, tmp)
        _check_graph(tmp, layer_norm_calls, dynamic_batch)
        os.replace(tmp, path)  # only a checked model ever appears at `path`
    finally:
        tmp.unlink(missing_ok=True)
    return path


def onnx_op_counts(path: Union[str, Path]) -> Counter:
    """How many nodes of each op type the ONNX file's main graph has (for tests and reports)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return Counter(node.op_type for node in model.graph.node)


def _run_exporter(module: nn.Module, example: torch.Tensor, opset: int, dynamic_batch: bool):
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
                warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            return torch.onnx.export(module, (example,), dynamo=True, opset_version=opset,
                                     input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                     dynamic_shapes=dynamic_shapes, external_data=False,
                                     verbose=False, report=False,
                                     custom_translation_table=_custom_translations())
    except Exception as exc:  # the exporter raises many types; all mean the same to the user
        raise LoweringError(_export_failure(module, exc, dynamic_batch)) from exc


def _custom_translations() -> dict:
    """ONNX translations of vitopt's own torch ops (the shift-add linear: vitopt.lower.shift_onnx)."""
    from vitopt.lower.shift_onnx import translation_table
    return translation_table()


def _export_failure(module: nn.Module, exc: Exception, dynamic_batch: bool) -> str:
    text = _ANSI.sub("", str(exc))
    summary = text.split("## Exception summary", 1)[-1].strip()
    cause = next((line.strip() for line in summary.splitlines() if line.strip()), type(exc).__name__)
    step = "torch.export" if "torch.export" in text.split("\n", 1)[0] else "ONNX translation"
    hint = ("make the forward traceable by torch.export (no data-dependent Python control flow, "
            "no .item()/.tolist() on tensors)")
    if dynamic_batch and re.search(r"batch|Constraints violated|specializ", summary):
        hint = ("the model fixes its batch size (e.g. a reshape with a constant batch); use "
                "x.shape[0] or -1 in reshapes, or export with dynamic_batch=False")
    return (f"ONNX export of {type(module).__name__} failed in {step}: {cause[:500]}. "
            f"To fix: {hint}.")


def _save(program, path: Path) -> None:
    try:
        program.save(str(path), external_data=False)
    except Exception as exc:
        raise LoweringError(f"could not write the ONNX model in {path.parent}: {exc}. Models over 2 GB "
                            f"do not fit one ONNX file; check free disk space otherwise.") from exc


def _count_layer_norm_calls(module: nn.Module, example: torch.Tensor) -> int:
    """How many times nn.LayerNorm modules run in one forward (each must become one node)."""
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1))
             for m in module.modules() if isinstance(m, nn.LayerNorm)]
    if not hooks:
        return 0
    try:
        with torch.no_grad():
            module(example)
    except Exception as exc:
        raise LoweringError(f"{type(module).__name__} fails on the example input of shape "
                            f"{list(example.shape)}: {type(exc).__name__}: {exc}. Pass an "
                            f"example the model accepts.") from exc
    finally:
        for hook in hooks:
            hook.remove()
    return len(calls)


def _check_graph(path: Path, layer_norm_calls: int, dynamic_batch: bool) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    outputs = model.graph.output
    if [o.name for o in outputs] != [OUTPUT_NAME]:
        raise LoweringError(f"the exported graph has outputs {[o.name for o in outputs]}; "
                            f"vitopt lowers modules that return exactly one tensor")
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?"
            for d in outputs[0].type.tensor_type.shape.dim]
    # A static or derived first axis means the batch was folded; an unnamed one is unknown.
    if dynamic_batch and dims and (isinstance(dims[0], int) or
                                   ("batch" in dims[0] and dims[0] != "batch")):
        raise LoweringError(f"the output's first axis is not the batch (output shape {dims}); "
                            f"the model mixes images across the batch. Keep the batch as the "
                            f"first axis (reshape with x.shape[0] or -1), or export with "
                            f"dynamic_batch=False")
    found = sum(node.op_type == "LayerNormalization" for node in model.graph.node)
    if found < layer_norm_calls:
        raise LoweringError(f"{layer_norm_calls - found} of {layer_norm_calls} LayerNorms were "
                            f"decomposed into elementwise ops in the exported graph; engines run "
                            f"those slowly. Export with opset >= {MIN_OPSET} and a current torch.")
