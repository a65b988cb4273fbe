"""OpenVINO on CPU as a vitopt backend, plus a report of the precision each op really runs in.

build: the ONNX model is read, its batch bounded to 1..max_batch, and saved as OpenVINO IR
(.xml + .bin, weights kept fp32: compress_to_fp16=False). load: compiled for "CPU" with
  INFERENCE_PRECISION_HINT  f32 (fp32) | bf16 (bf16; int8 where the CPU has BF16) | f16 (fp16)
  PERFORMANCE_HINT          LATENCY
  INFERENCE_NUM_THREADS     threads (when given)
The precision hint must be set even for fp32: on a CPU with BF16 the CPU plugin defaults to
bf16. int8 means the graph already carries the quantization (Q/DQ or NNCF); the remaining ops
(float attention, LayerNorm, GELU) run bf16 where the CPU lists BF16 (as OpenVINO + NNCF int8
does by default there), else f32. `int8_summary(engine)` counts the linears OpenVINO really
runs in u8/i8 and the precision of its fused attention. bf16/fp16 need the CPU to list BF16/FP16 in OPTIMIZATION_CAPABILITIES.
`runtime_precisions(engine)` counts (layerType, runtimePrecision) over the compiled model, the
way to check that linears and attention really run in bf16/int8 rather than assume it.
"""
from __future__ import annotations

from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from vitopt.backends.base import Backend, Engine
from vitopt.errors import ArtifactError, LoweringError

DEVICE = "CPU"
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
_CAPABILITY = {"bf16": "BF16", "fp16": "FP16"}  # what OPTIMIZATION_CAPABILITIES must list


@lru_cache(maxsize=1)
def cpu_capabilities() -> Tuple[str, ...]:
    """OPTIMIZATION_CAPABILITIES of the CPU plugin, e.g. ('BF16', 'FP32', 'INT8', ...)."""
    import openvino as ov

    return tuple(ov.Core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))


class OpenVINOEngine(Engine):
    backend = "openvino"

    def __init__(self, compiled, precision: str):
        self.compiled = compiled
        self.precision = precision
        self.request = compiled.create_infer_request()

    def run(self, images: np.ndarray) -> np.ndarray:
        result = self.request.infer({0: np.ascontiguousarray(images)}, share_inputs=True,
                                    share_outputs=False)
        return np.asarray(result[0])

    def run_all(self, inputs) -> list:
        """Several inputs in the model's order -> every output (segments of an early-exit model)."""
        result = self.request.infer({i: np.ascontiguousarray(a) for i, a in enumerate(inputs)},
                                    share_inputs=True, share_outputs=False)
        return [np.asarray(result[output]) for output in self.compiled.outputs]


class OpenVINOBackend(Backend):
    name = "openvino"
    module = "openvino"
    pip = "openvino"
    precisions = tuple(PRECISION_HINTS)

    def available(self) -> Tuple[bool, str]:
        try:
            import openvino as ov
        except ImportError as exc:
            return self._import_error(exc)
        if DEVICE not in ov.Core().available_devices:
            return False, "OpenVINO finds no CPU device; reinstall with `pip install openvino`"
        return True, ""

    def version(self) -> str:
        import openvino as ov

        return ov.get_version()

    def supports(self, precision: str) -> Tuple[bool, str]:
        ok, reason = super().supports(precision)
        if not ok or precision not in _CAPABILITY:
            return ok, reason
        if _CAPABILITY[precision] not in cpu_capabilities():
            from vitopt.artifact import hardware_info

            return False, (f"this CPU ({hardware_info()['cpu']}) has no {precision} support in "
                           f"OpenVINO (OPTIMIZATION_CAPABILITIES: {', '.join(cpu_capabilities())})"
                           f"; use --precision fp32 (or int8) here, or run on a CPU with "
                           f"{_CAPABILITY[precision]} (e.g. AVX512_BF16 or AMX)")
        return True, ""

    def build(self, onnx_path: Path, out_dir: Path, *, precision: str, max_batch: int,
              threads: Optional[int] = None) -> List[str]:
        import openvino as ov

        self.require(precision)
        self._check_max_batch(max_batch)
        self._check_threads(threads)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = Path(onnx_path).stem
        try:
            model = ov.Core().read_model(str(onnx_path))
            shapes = {}
            for port in model.inputs:  # images, or a segment's tokens/sizes (early exits)
                shape = port.get_partial_shape()
                if shape.rank.is_static and shape.rank.get_length() >= 2 and shape[0].is_dynamic:
                    shape[0] = ov.Dimension(1, max_batch)
                    shapes[port] = shape
            if shapes:
                model.reshape(shapes)
            ov.save_model(model, str(out_dir / f"{stem}.xml"), compress_to_fp16=False)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with its own text
            raise LoweringError(f"OpenVINO could not convert {onnx_path}: {exc}") from exc
        return [f"{stem}.xml", f"{stem}.bin"]

    def config(self, precision: str, threads: Optional[int] = None) -> dict:
        """The compile properties for `precision` and `threads`."""
        hint = PRECISION_HINTS[precision]
        if precision == "int8" and "BF16" in cpu_capabilities():
            hint = "bf16"  # the float rest of an int8 graph; Q/DQ'd linears stay int8
        config = {"INFERENCE_PRECISION_HINT": hint,
                  "PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        return config

    def load(self, out_dir: Path, files: Sequence[str], *, precision: str,
             threads: Optional[int] = None) -> OpenVINOEngine:
        import openvino as ov

        self.require(precision)
        self._check_threads(threads)
        xml = self._pick(out_dir, files, ".xml")
        try:
            core = ov.Core()
            compiled = core.compile_model(core.read_model(str(xml)), DEVICE,
                                          self.config(precision, threads))
        except Exception as exc:
            raise ArtifactError(f"OpenVINO {self.version()} cannot compile {xml}: {exc}. "
                                f"Recompile with `vitopt compile` using this version.") from exc
        return OpenVINOEngine(compiled, precision)


def runtime_precisions(engine) -> Counter:
    """Counter of (layerType, runtimePrecision) over the ops of a compiled model.

    `engine`: an OpenVINOEngine or an openvino CompiledModel. For example
    {("FullyConnected", "bf16"): 9, ("Subgraph", "bf16"): 2, ...}.
    """
    compiled = getattr(engine, "compiled", engine)
    counts = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        counts[(info["layerType"].astype(str), info["runtimePrecision"].astype(str))] += 1
    return counts


LINEAR_TYPES = ("FullyConnected", "MatMul")
INT8_TYPES = ("u8", "i8")


def int8_summary(engine) -> dict:
    """What an int8 engine really runs: linears (FullyConnected/MatMul) in u8/i8 vs float,
    and the fused attention kernels ("Subgraph") by precision."""
    counts = runtime_precisions(engine)
    linears = {p: n for (t, p), n in counts.items() if t in LINEAR_TYPES}
    return {"int8_linears": sum(n for p, n in linears.items() if p in INT8_TYPES),
            "float_linears": sum(n for p, n in linears.items() if p not in INT8_TYPES),
            "linears_by_precision": dict(sorted(linears.items())),
            "fused_attention": dict(sorted((p, n) for (t, p), n in counts.items() if t == "Subgraph"))}
