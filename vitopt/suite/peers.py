"""Peers: the engines people would use instead of vitopt, each set up as its documentation
recommends. Every builder gets the same eager model and returns a `Built` cell.

  torch-eager-fp32      model in eval mode under torch.inference_mode()
  torch-bf16-autocast   the same under torch.autocast(device, dtype=torch.bfloat16)
  torch-compile         torch.compile(model) with the default mode (Inductor), dynamic=False:
                        one specialisation per batch size, compiled on first use (the compile
                        time recorded is the first call at the group's first batch)
  ort-fp32              plain torch.onnx.export(dynamo=True) of the model (vitopt's exporter
                        wrapper, which only fixes a dynamic batch and checks the file), on an
                        InferenceSession: CPUExecutionProvider, ORT_ENABLE_ALL,
                        intra_op_num_threads = threads, sequential
  ort-int8              ORT's own static quantizer, as its docs recommend for transformers:
                        quant_pre_process (shape inference + optimisation), then
                        quantize_static(QDQ, per_channel=True, activations QUInt8, weights QInt8,
                        MinMax calibration through a CalibrationDataReader over the calibration
                        images), run as ort-fp32; reduce_range=True (7-bit weights) on x86
                        CPUs without VNNI/AMX, as ORT's docs say for U8S8 on such machines
                        (their int8 GEMMs saturate int16 pairs otherwise)
  ov-fp32, ov-bf16      ov.convert_model(model, example_input, dynamic batch) compiled for CPU with
                        INFERENCE_PRECISION_HINT f32/bf16, PERFORMANCE_HINT LATENCY,
                        INFERENCE_NUM_THREADS = threads
  ov-nncf-int8          nncf.quantize(the converted fp32 model, calibration images,
                        model_type=nncf.ModelType.TRANSFORMER), compiled as ov-bf16 where the
                        CPU has BF16 (the float rest of the graph), else as ov-fp32
  torch-eager-fp16      (GPU) model.half() on the device, eager
  torch-compile-max-autotune  (GPU) torch.compile(model.half(), mode="max-autotune")

Calibration images for the int8 peers are the digits calibration split resized to the model's
input and normalised with its mean/std: the same images vitopt's int8 cells calibrate on.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch

from vitopt.errors import BackendUnavailableError, ConfigError
from vitopt.targets import x86_without_int8_dot


@dataclass
class Built:
    """A ready cell: `run(x)` on what `to_input(array)` made; sizes and versions for the record."""

    run: Callable[[object], object]
    to_input: Callable[[np.ndarray], object]
    engine: str
    precision: str
    how: str
    version: str
    artifact_bytes: Optional[int] = None
    compile_s: float = 0.0
    extra: Dict[str, object] = field(default_factory=dict)


@dataclass
class PeerContext:
    model: torch.nn.Module
    example: torch.Tensor        # [2, C, H, W]
    first_batch: int
    tmp: Path
    threads: Optional[int]
    device: str
    calib: Callable[[], torch.Tensor]   # normalised calibration images, loaded on first use
    _onnx: Optional[Path] = None

    def plain_onnx(self) -> Path:
        """The model's plain ONNX export, made once per group and shared by the ORT peers."""
        if self._onnx is None:
            from vitopt.lower.onnx_export import export_onnx
            self._onnx = export_onnx(self.model, self.example, self.tmp / "plain.onnx")
        return self._onnx


def _file_bytes(*paths: Path) -> int:
    return sum(p.stat().st_size for p in paths if p.exists())


# --- torch --------------------------------------------------------------------------------
def _torch_input(device: str, dtype=torch.float32):
    def convert(array: np.ndarray):
        return torch.from_numpy(array).to(device=device, dtype=dtype)
    return convert


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _torch_run(module, device: str, autocast: Optional[torch.dtype] = None):
    sync = _sync(device)

    def run(x):
        with torch.inference_mode():
            if autocast is not None:
                with torch.autocast(device, dtype=autocast):
                    out = module(x)
            else:
                out = module(x)
        sync()
        return out
    return run


def _model_on(ctx: PeerContext, dtype=torch.float32) -> torch.nn.Module:
    """The shared model on the CPU in fp32, else a copy moved/cast (the original stays put)."""
    if ctx.device == "cpu" and dtype == torch.float32:
        return ctx.model
    return copy.deepcopy(ctx.model).to(device=ctx.device, dtype=dtype)


def torch_eager_fp32(ctx: PeerContext) -> Built:
    model = _model_on(ctx)
    return Built(_torch_run(model, ctx.device), _torch_input(ctx.device), "torch", "fp32",
                 f"eager, inference_mode, {ctx.device}", torch.__version__)


def torch_bf16_autocast(ctx: PeerContext) -> Built:
    model = _model_on(ctx)
    return Built(_torch_run(model, ctx.device, torch.bfloat16), _torch_input(ctx.device), "torch",
                 "bf16", f"eager under torch.autocast({ctx.device!r}, bfloat16)", torch.__version__)


def _compiled(ctx: PeerContext, module, mode: Optional[str], dtype) -> Built:
    started = time.perf_counter()
    compiled = torch.compile(module, mode=mode, dynamic=False)
    run = _torch_run(compiled, ctx.device)
    to_input = _torch_input(ctx.device, dtype)
    first = ctx.example[:1].expand(ctx.first_batch, *ctx.example.shape[1:]).contiguous()
    run(to_input(first.numpy()))   # compiles for the first batch size
    return Built(run, to_input, "torch.compile", "fp16" if dtype == torch.float16 else "fp32",
                 f"torch.compile(mode={mode or 'default'!r}, backend inductor, dynamic=False), "
                 f"{ctx.device}", torch.__version__, compile_s=time.perf_counter() - started)


def torch_compile(ctx: PeerContext) -> Built:
    return _compiled(ctx, _model_on(ctx), None, torch.float32)


def torch_eager_fp16(ctx: PeerContext) -> Built:
    _need_cuda("torch-eager-fp16", ctx)
    model = _model_on(ctx, torch.float16)
    return Built(_torch_run(model, ctx.device), _torch_input(ctx.device, torch.float16), "torch",
                 "fp16", "eager, model.half(), inference_mode, cuda", torch.__version__)


def torch_compile_max_autotune(ctx: PeerContext) -> Built:
    _need_cuda("torch-compile-max-autotune", ctx)
    return _compiled(ctx, _model_on(ctx, torch.float16), "max-autotune", torch.float16)


def _need_cuda(peer: str, ctx: PeerContext) -> None:
    if ctx.device != "cuda" or not torch.cuda.is_available():
        raise BackendUnavailableError(f"peer {peer} needs a CUDA GPU (matrix device "
                                      f"{ctx.device!r}, cuda available: "
                                      f"{torch.cuda.is_available()}); use a gpu matrix")


# --- ONNX Runtime ---------------------------------------------------------------------------
def _cpu_only(peer: str, ctx: PeerContext) -> None:
    if ctx.device != "cpu":
        raise ConfigError(f"peer {peer} runs on the CPU; drop it from a {ctx.device} matrix")


def _ort_session(path: Path, threads: Optional[int]):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _numpy_input(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)


def ort_fp32(ctx: PeerContext) -> Built:
    import onnxruntime as ort
    _cpu_only("ort-fp32", ctx)
    started = time.perf_counter()
    path = ctx.plain_onnx()
    run = _ort_session(path, ctx.threads)
    return Built(run, _numpy_input, "onnxruntime", "fp32",
                 "plain dynamo ONNX export, CPUExecutionProvider, ORT_ENABLE_ALL", ort.__version__,
                 artifact_bytes=_file_bytes(path), compile_s=time.perf_counter() - started)


def ort_int8(ctx: PeerContext) -> Built:
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    _cpu_only("ort-int8", ctx)
    started = time.perf_counter()
    plain = ctx.plain_onnx()
    prepared = ctx.tmp / "ort_pre.onnx"
    quant_pre_process(str(plain), str(prepared))
    calib = ctx.calib()

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"images": calib[i:i + 1].numpy()} for i in range(calib.shape[0])])

        def get_next(self):
            return next(self.items, None)

    quantized = ctx.tmp / "ort_int8.onnx"
    reduce_range = x86_without_int8_dot()
    quantize_static(str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=reduce_range,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    run = _ort_session(quantized, ctx.threads)
    return Built(run, _numpy_input, "onnxruntime", "int8",
                 f"quant_pre_process + quantize_static(QDQ, per-channel, U8 activations, S8 "
                 f"weights{', reduce_range (no VNNI/AMX)' if reduce_range else ''}, MinMax, "
                 f"{calib.shape[0]} calibration images)", ort.__version__,
                 artifact_bytes=_file_bytes(quantized), compile_s=time.perf_counter() - started)


# --- OpenVINO -------------------------------------------------------------------------------
def _ov_convert(ctx: PeerContext):
    import openvino as ov
    shape = [-1, *ctx.example.shape[1:]]
    return ov.convert_model(ctx.model, example_input=ctx.example, input=[ov.PartialShape(shape)])


def _ov_compile(model, hint: str, ctx: PeerContext):
    import openvino as ov
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    if ctx.threads:
        config["INFERENCE_NUM_THREADS"] = ctx.threads
    compiled = ov.Core().compile_model(model, "CPU", config)
    request = compiled.create_infer_request()

    def run(x):
        return np.asarray(request.infer({0: x}, share_inputs=True, share_outputs=False)[0])
    return run, compiled


def _ov_size(model, ctx: PeerContext, stem: str) -> int:
    import openvino as ov
    xml = ctx.tmp / f"{stem}.xml"
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return _file_bytes(xml, xml.with_suffix(".bin"))


def _ov_peer(ctx: PeerContext, precision: str, hint: str) -> Built:
    import openvino as ov
    _cpu_only(f"ov-{precision}", ctx)
    started = time.perf_counter()
    model = _ov_convert(ctx)
    run, _ = _ov_compile(model, hint, ctx)
    compile_s = time.perf_counter() - started
    return Built(run, _numpy_input, "openvino", precision,
                 f"ov.convert_model(torch module, dynamic batch), CPU, INFERENCE_PRECISION_HINT "
                 f"{hint}, PERFORMANCE_HINT LATENCY", ov.get_version(),
                 artifact_bytes=_ov_size(model, ctx, f"ov_{precision}"), compile_s=compile_s)


def ov_fp32(ctx: PeerContext) -> Built:
    return _ov_peer(ctx, "fp32", "f32")


def ov_bf16(ctx: PeerContext) -> Built:
    from vitopt.backends.openvino import cpu_capabilities
    if "BF16" not in cpu_capabilities():
        raise BackendUnavailableError(f"ov-bf16: this CPU has no BF16 in OpenVINO "
                                      f"({', '.join(cpu_capabilities())})")
    return _ov_peer(ctx, "bf16", "bf16")


def ov_nncf_int8(ctx: PeerContext) -> Built:
    import nncf
    import openvino as ov
    from vitopt.backends.openvino import cpu_capabilities
    _cpu_only("ov-nncf-int8", ctx)
    started = time.perf_counter()
    calib = ctx.calib()
    dataset = nncf.Dataset([calib[i:i + 1].numpy() for i in range(calib.shape[0])])
    quantized = nncf.quantize(_ov_convert(ctx), dataset, model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=calib.shape[0])
    hint = "bf16" if "BF16" in cpu_capabilities() else "f32"
    run, _ = _ov_compile(quantized, hint, ctx)
    compile_s = time.perf_counter() - started
    return Built(run, _numpy_input, "openvino", "int8",
                 f"nncf.quantize(model_type=TRANSFORMER, {calib.shape[0]} calibration images) "
                 f"of ov.convert_model, INFERENCE_PRECISION_HINT {hint} for the float rest, "
                 f"LATENCY", f"{ov.get_version()}, nncf {nncf.__version__}",
                 artifact_bytes=_ov_size(quantized, ctx, "ov_nncf"), compile_s=compile_s)


PEERS: Dict[str, Callable[[PeerContext], Built]] = {
    "torch-eager-fp32": torch_eager_fp32,
    "torch-bf16-autocast": torch_bf16_autocast,
    "torch-compile": torch_compile,
    "ort-fp32": ort_fp32,
    "ort-int8": ort_int8,
    "ov-fp32": ov_fp32,
    "ov-bf16": ov_bf16,
    "ov-nncf-int8": ov_nncf_int8,
    "torch-eager-fp16": torch_eager_fp16,
    "torch-compile-max-autotune": torch_compile_max_autotune,
}

#: Where each peer runs; a matrix naming a peer for another device is refused when it loads.
PEER_DEVICES: Dict[str, tuple] = {
    "torch-eager-fp32": ("cpu", "cuda"),
    "torch-bf16-autocast": ("cpu", "cuda"),
    "torch-compile": ("cpu", "cuda"),
    "ort-fp32": ("cpu",),
    "ort-int8": ("cpu",),
    "ov-fp32": ("cpu",),
    "ov-bf16": ("cpu",),
    "ov-nncf-int8": ("cpu",),
    "torch-eager-fp16": ("cuda",),
    "torch-compile-max-autotune": ("cuda",),
}
