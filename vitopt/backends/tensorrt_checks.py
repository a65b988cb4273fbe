"""What TensorRT needs, checked without TensorRT: the build plan per version, the ONNX it is
given, the optimisation-profile shapes, and what the engine inspector says was built.

Pure functions (onnx only), so CI tests all of it on machines that have no TensorRT.

Build plan (`plan_build`), from NVIDIA's "Migrating from TensorRT 10.x to 11.x" guide:
  * TensorRT 11: networks are always strongly typed; BuilderFlag.FP16/BF16/INT8/FP8 and the int8
    calibrator are removed. Precision comes only from the ONNX: fp16/bf16 means the graph
    computes in that type (vitopt lowers the module cast to it: fp16 weights, a Cast of the
    input and a Cast of the output back to float32); int8 means Q/DQ nodes in the graph.
  * TensorRT 10 (Jetson Orin with JetPack 6): weakly typed; the ONNX stays fp32 and the builder
    flags FP16 / BF16 allow reduced precision; int8 is explicit Q/DQ plus the INT8 flag (and
    FP16 for the float rest). No calibrator: vitopt calibrates in its own pass.
  * fp32 clears BuilderFlag.TF32 on both (it is on by default).
  * TensorRT < 10 is refused (the name-based tensor API, execute_async_v3, is 10+).

ONNX checks (`onnx_problems`): opset >= 17 (LayerNormalization is one node from opset 17);
no op from UNSUPPORTED_OPS and no op from a custom domain (each would need a plugin); the
float type the matmuls compute in is the plan's (a strongly typed network would otherwise
silently run them in fp32, or in fp16 when fp32 was asked); for int8, Q/DQ present and
TensorRT-shaped: signed int8 with zero point 0 (TensorRT takes symmetric quantization only),
so vitopt's u8 asymmetric activations are refused with that reason; a dynamic batch axis.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from vitopt.errors import BackendUnavailableError, ConfigError, LoweringError

MIN_TRT_MAJOR = 10
MIN_OPSET = 17
PRECISIONS = ("fp32", "fp16", "bf16", "int8")

#: ONNX ops the TensorRT ONNX parser does not import (rows marked "N" in onnx-tensorrt's
#: docs/operators.md, TensorRT 8.5-10 era; LayerNormalization became supported in 8.6 and is
#: not here). A model using one needs a TensorRT plugin; vitopt's lowering never emits them.
UNSUPPORTED_OPS = frozenset({
    "Bernoulli", "BitShift", "ConcatFromSequence", "ConvInteger", "DFT", "Det",
    "DynamicQuantizeLinear", "MatMulInteger", "MaxUnpool", "MelWeightMatrix", "Multinomial",
    "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement",
    "QLinearConv", "QLinearMatMul", "STFT", "SequenceAt", "SequenceConstruct", "SequenceEmpty",
    "SequenceErase", "SequenceInsert", "SequenceLength", "SequenceMap",
    "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringNormalizer", "TfIdfVectorizer",
    "Unique",
})
#: Ops whose input type decides the precision a strongly typed network computes in.
COMPUTE_OPS = ("MatMul", "Gemm", "Conv")
_ONNX_FLOAT = {"fp32": 1, "fp16": 10, "bf16": 16}  # onnx.TensorProto FLOAT, FLOAT16, BFLOAT16
_TYPE_NAMES = {1: "float32", 10: "float16", 16: "bfloat16", 3: "int8", 2: "uint8"}
_INT8, _UINT8 = 3, 2


# --- the plan -----------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildPlan:
    """How to build `precision` with TensorRT `major`: flag names and what the ONNX must hold."""

    major: int
    precision: str
    strongly_typed: bool
    builder_flags: Tuple[str, ...]  # names in tensorrt.BuilderFlag to set
    clear_flags: Tuple[str, ...]  # ... and to clear (TF32 is on by default)
    onnx_float: str  # the float type the ONNX's matmuls compute in: fp32 | fp16 | bf16
    qdq: bool  # the ONNX must carry int8 Q/DQ nodes


def trt_major(version: str) -> int:
    match = re.match(r"(\d+)\.", str(version))
    if not match:
        raise BackendUnavailableError(f"cannot read a TensorRT version from {version!r}")
    return int(match.group(1))


def plan_build(major: int, precision: str, capability: Optional[Tuple[int, int]] = None) -> BuildPlan:
    """The build plan for TensorRT `major` and `precision` on a GPU of `capability`."""
    if precision not in PRECISIONS:
        raise ConfigError(f"the tensorrt backend builds {', '.join(PRECISIONS)}, not {precision!r}"
                          + ("; no vitopt pass writes FP8 Q/DQ yet" if precision == "fp8" else ""))
    if major < MIN_TRT_MAJOR:
        raise BackendUnavailableError(f"TensorRT {major} is too old: vitopt needs TensorRT "
                                      f"{MIN_TRT_MAJOR} or newer (`pip install -U tensorrt`; on "
                                      f"Jetson, JetPack 6)")
    if precision == "bf16" and capability is not None and capability < (8, 0):
        raise ConfigError(f"bf16 needs a GPU of compute capability 8.0 or newer (sm_80); this one "
                          f"is {capability[0]}.{capability[1]}; use --precision fp16")
    # fp32 means fp32: TF32 (on by default) rounds matmul inputs to a 10-bit mantissa.
    clear = ("TF32",) if precision == "fp32" else ()
    if major >= 11:
        onnx_float = precision if precision in ("fp16", "bf16") else "fp32"
        return BuildPlan(major, precision, True, (), clear, onnx_float, precision == "int8")
    flags = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",), "int8": ("INT8", "FP16")}
    return BuildPlan(major, precision, False, flags[precision], clear, "fp32", precision == "int8")


def profile_shapes(chw: Sequence[int], max_batch: int, opt_batch: Optional[int] = None):
    """(min, opt, max) input shapes of the optimisation profile: batch 1..max_batch, tuned for
    `opt_batch` (default max_batch: TensorRT picks kernels for opt; throughput wants the max)."""
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ConfigError(f"max_batch must be a positive integer, got {max_batch!r}")
    opt = max_batch if opt_batch is None else opt_batch
    if not isinstance(opt, int) or not 1 <= opt <= max_batch:
        raise ConfigError(f"the optimisation batch must be in 1..{max_batch}, got {opt!r}")
    chw = tuple(int(v) for v in chw)
    return (1, *chw), (opt, *chw), (max_batch, *chw)


# --- the ONNX -----------------------------------------------------------------------------
def onnx_problems(model, plan: BuildPlan, max_batch: int = 1) -> List[str]:
    """Everything in `model` (ModelProto or path) that TensorRT would refuse or build wrongly
    for `plan`; an empty list when the model is fit."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        problems.append(f"opset {opset} is below {MIN_OPSET}: LayerNormalization would be "
                        f"decomposed; export with opset >= {MIN_OPSET}")
    nodes = list(model.graph.node)
    custom = sorted({f"{n.domain}::{n.op_type}" for n in nodes if n.domain not in ("", "ai.onnx")})
    if custom:
        problems.append(f"ops from custom domains need TensorRT plugins: {', '.join(custom)}")
    missing = sorted({n.op_type for n in nodes if n.op_type in UNSUPPORTED_OPS})
    if missing:
        problems.append(f"ops TensorRT's ONNX parser does not support: {', '.join(missing)}")
    types = _value_types(model)
    problems += _precision_problems(nodes, types, plan)
    if plan.qdq:
        problems += _qdq_problems(model, nodes)
    if max_batch > 1:
        dims = model.graph.input[0].type.tensor_type.shape.dim if model.graph.input else []
        if not dims or dims[0].HasField("dim_value"):
            problems.append(f"the input has a fixed batch ({dims[0].dim_value if dims else '?'}); "
                            f"the optimisation profile needs a dynamic batch axis for "
                            f"max_batch {max_batch}")
    return problems


def require_fit(model, plan: BuildPlan, max_batch: int = 1) -> None:
    """LoweringError listing every problem `onnx_problems` finds."""
    problems = onnx_problems(model, plan, max_batch)
    if problems:
        raise LoweringError(f"the ONNX model is not fit for TensorRT {plan.major} "
                            f"{plan.precision}: " + "; ".join(problems))


def _value_types(model) -> Dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    for node in graph.node:  # Constant nodes carry their type in the attribute
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            types[node.output[0]] = node.attribute[0].t.data_type
    return types


def _precision_problems(nodes, types: Dict[str, int], plan: BuildPlan) -> List[str]:
    want = _ONNX_FLOAT[plan.onnx_float]
    compute = [n for n in nodes if n.op_type in COMPUTE_OPS]
    found = Counter(types.get(n.input[0], 0) for n in compute)
    wrong = {t: c for t, c in found.items() if t != want}
    if not compute or not wrong:
        return []
    detail = ", ".join(f"{c} in {_TYPE_NAMES.get(t, f'type {t}')}" for t, c in sorted(wrong.items()))
    if plan.strongly_typed and plan.onnx_float != "fp32":
        why = (f"TensorRT {plan.major} is strongly typed and takes the precision from the graph; "
               f"lower the model cast to {plan.onnx_float} (explicit precision)")
    else:
        why = (f"for {plan.precision} on TensorRT {plan.major} the graph must compute in "
               f"{_TYPE_NAMES[want]}" + (" (builder flags " + ", ".join(plan.builder_flags) +
                                         " lower it)" if plan.builder_flags else ""))
    return [f"{sum(wrong.values())} of {len(compute)} {'/'.join(COMPUTE_OPS)} ops compute in "
            f"another type than {_TYPE_NAMES[want]} ({detail}): {why}"]


def _qdq_problems(model, nodes) -> List[str]:
    from onnx import numpy_helper

    consts = {t.name: t for t in model.graph.initializer}
    for node in nodes:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            consts[node.output[0]] = node.attribute[0].t
    qdq = [n for n in nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not qdq:
        return ["int8 needs explicit quantization (QuantizeLinear/DequantizeLinear nodes) in the "
                "graph; run the quantize_int8 pass (--precision int8 --calib ...)"]
    bad = Counter()
    for node in qdq:
        zero = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero is None:
            continue  # no zero point: int8 (Q) with zero 0 by the ONNX spec
        if zero.data_type != _INT8:
            bad[f"{_TYPE_NAMES.get(zero.data_type, zero.data_type)} quantization"] += 1
        elif numpy_helper.to_array(zero).any():
            bad["a non-zero zero point"] += 1
    if not bad:
        return []
    detail = ", ".join(f"{c} with {what}" for what, c in sorted(bad.items()))
    return [f"{sum(bad.values())} of {len(qdq)} Q/DQ nodes are not symmetric int8 ({detail}): "
            f"TensorRT takes only signed int8 with zero point 0. vitopt's quantize_int8 writes u8 "
            f"asymmetric activations (for OpenVINO/ONNX Runtime); use --precision fp16 on TensorRT"]


# --- what was built -----------------------------------------------------------------------
_PRECISION_WORDS = (("fp8", "fp8"), ("int8", "int8"), ("bf16", "bf16"), ("half", "fp16"),
                    ("fp16", "fp16"), ("float", "fp32"), ("fp32", "fp32"), ("int32", "int32"),
                    ("int64", "int64"), ("bool", "bool"))
_ATTENTION_WORDS = ("mha", "attention", "flash", "fmha")


def _precision_of(io: dict) -> str:
    """A layer input/output's data type from inspector JSON: TensorRT 11 writes "DataType";
    TensorRT 10 writes "Format/Datatype" ("Row major linear FP16 format", "Half", ...)."""
    text = str(io.get("DataType") or io.get("Format/Datatype") or io.get("Format") or "").lower()
    return next((name for word, name in _PRECISION_WORDS if word in text), "unknown")


def summarize_layers(engine_json: str) -> dict:
    """From IEngineInspector.get_engine_information(JSON) of an engine built with
    ProfilingVerbosity.DETAILED: layer count, layers by output precision, layers by type, and
    the layers that look like fused attention (type/name/tactic naming MHA/attention/flash;
    a heuristic: TensorRT documents no attention flag in this JSON)."""
    data = json.loads(engine_json)
    layers = [layer for layer in data.get("Layers", []) if isinstance(layer, dict)]
    precisions, kinds, attention = Counter(), Counter(), []
    for layer in layers:
        outputs = layer.get("Outputs") or layer.get("Inputs") or []
        precisions[_precision_of(outputs[0]) if outputs else "unknown"] += 1
        kinds[str(layer.get("LayerType", "unknown"))] += 1
        words = " ".join(str(layer.get(k, "")) for k in ("LayerType", "Name", "TacticName")).lower()
        if any(w in words for w in _ATTENTION_WORDS):
            attention.append(str(layer.get("Name", "?"))[:120])
    int8_in = sum(1 for layer in layers for io in layer.get("Inputs") or []
                  if _precision_of(io) == "int8")
    return {"layers": len(layers), "by_precision": dict(precisions), "by_type": dict(kinds),
            "fused_attention": attention, "layers_with_int8_inputs": int8_in}


def precision_warnings(summary: dict, precision: str) -> List[str]:
    """What a user must hear about the engine: int8 asked, but no layer takes int8 inputs or
    writes int8 (TensorRT fell back to float). Precision is read per layer, so a whole-graph
    Myelin node ending in the float32 output cast says little about fp16; only int8 warns."""
    by = summary["by_precision"]
    if (precision == "int8" and summary["layers"] and not by.get("int8")
            and not summary["layers_with_int8_inputs"]):
        return ["int8 was asked, but no layer of the engine runs int8: TensorRT fell back to "
                "float (check the Q/DQ placement); expect fp16 speed or worse"]
    return []
