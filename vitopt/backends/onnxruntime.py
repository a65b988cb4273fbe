"""ONNX Runtime on CPU (CPUExecutionProvider) as a vitopt backend.

build: ORT optimizes the ONNX graph at the EXTENDED level (constant folding, fusions into
ORT contrib ops such as FusedMatMul and SkipLayerNormalization) and that optimized model is the
engine file. EXTENDED, not ALL: ALL adds NCHWc layout rewrites specific to this CPU, which ORT
itself warns must not be saved; they are applied again at load, where ALL is used.
Precision lives in the graph (fp32, or int8 as Q/DQ nodes), so there is no precision flag.

Sessions stop their intra-op threads' spinning at the end of every run
(session.force_spinning_stop): threads still spin while a run lasts, but an engine whose run
returned no longer burns the cores the next engine needs. Without it, an early-exit model's
segment engines (one session each, run back to back) spun against each other: the digits
proxy split in three ran 2.3x slower than unsplit at batch 1, 1.07-1.21x with it
(benchmarks/early_exit.py, 2026-11-27).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from vitopt.backends.base import Backend, Engine
from vitopt.errors import ArtifactError, LoweringError

_QUIET = 3  # ORT log severity: errors only


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"

    def __init__(self, session, precision: str):
        self.session = session
        self.precision = precision
        self.input_name = session.get_inputs()[0].name

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(images)})[0]

    def run_all(self, inputs) -> list:
        """Several inputs in the graph's order -> every output (segments of an early-exit model)."""
        feed = {i.name: np.ascontiguousarray(a) for i, a in zip(self.session.get_inputs(), inputs)}
        return self.session.run(None, feed)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    module = "onnxruntime"
    pip = "onnxruntime"
    precisions = ("fp32", "int8")

    def available(self) -> Tuple[bool, str]:
        try:
            import onnxruntime
        except ImportError as exc:
            return self._import_error(exc)
        if "CPUExecutionProvider" not in onnxruntime.get_available_providers():
            return False, ("this onnxruntime build has no CPUExecutionProvider; reinstall it "
                           "with `pip install --force-reinstall onnxruntime`")
        return True, ""

    def version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def _options(self, level: str, threads: Optional[int]):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        options.log_severity_level = _QUIET
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.force_spinning_stop", "1")
        if threads is not None:
            options.intra_op_num_threads = threads
        return options

    def build(self, onnx_path: Path, out_dir: Path, *, precision: str, max_batch: int,
              threads: Optional[int] = None) -> List[str]:
        import onnxruntime as ort

        self.require(precision)
        self._check_max_batch(max_batch)
        self._check_threads(threads)
        out_dir.mkdir(parents=True, exist_ok=True)
        name = f"{Path(onnx_path).stem}.ort.onnx"
        options = self._options("ORT_ENABLE_EXTENDED", threads)
        options.optimized_model_filepath = str(Path(out_dir) / name)
        try:
            ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own pybind types
            raise LoweringError(f"ONNX Runtime could not build {onnx_path}: {exc}") from exc
        return [name]

    def load(self, out_dir: Path, files: Sequence[str], *, precision: str,
             threads: Optional[int] = None) -> OnnxRuntimeEngine:
        import onnxruntime as ort

        self.require(precision)
        self._check_threads(threads)
        path = self._pick(out_dir, files, ".onnx")
        try:
            session = ort.InferenceSession(str(path), self._options("ORT_ENABLE_ALL", threads),
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ArtifactError(f"ONNX Runtime {self.version()} cannot load {path}: {exc}. "
                                f"Recompile with `vitopt compile` using this version.") from exc
        return OnnxRuntimeEngine(session, precision)


INT8_OPS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul",
            "QGemm")
FLOAT_LINEAR_OPS = ("MatMul", "FusedMatMul", "Gemm")


def int8_summary(model_path) -> dict:
    """What ORT runs for the linears of an optimized model file (the engine file): int8 kernels
    (MatMulIntegerToFloat, QLinearMatMul, ...) vs float MatMul/Gemm (attention matmuls included)."""
    import onnx
    from collections import Counter

    ops = Counter(n.op_type for n in onnx.load(str(model_path), load_external_data=False).graph.node)
    return {"int8_linears": sum(ops[o] for o in INT8_OPS),
            "float_linears": sum(ops[o] for o in FLOAT_LINEAR_OPS),
            "linears_by_op": {o: ops[o] for o in INT8_OPS + FLOAT_LINEAR_OPS if ops[o]}}
