"""TensorRT as a vitopt backend: the IR, lowered to ONNX with explicit precision, -> engine.

NOT YET RUN ON HARDWARE BY THIS PROJECT: TensorRT cannot be installed on the machines this
project builds and tests on. Every TensorRT call below follows NVIDIA's Python API reference
(TensorRT 10.x and 11.x: Builder, OnnxParser, IBuilderConfig, IProgressMonitor, Runtime,
IEngineInspector, IExecutionContext); everything around the calls is tested without TensorRT
(tensorrt_checks.py and tests/test_backend_tensorrt.py).

    files = TensorRTBackend().build_module(ir, example, out_dir, precision="fp16", max_batch=64)
    engine = TensorRTBackend().load(out_dir, files, precision="fp16")

build_module: the IR is copied and cast for the plan (tensorrt_checks.plan_build: TensorRT 11
is strongly typed, so fp16/bf16 means the module itself runs in that type between a cast of the
input and a cast of the output to float32; TensorRT 10 takes the fp32 graph and builder flags),
exported to ONNX (vitopt.lower.onnx_export), checked (tensorrt_checks.require_fit), then build()
makes the engine:
  * optimisation profile: batch 1 .. max_batch, tuned at the device profile's opt batch;
  * builder optimisation level, workspace limit: from the profile matching this GPU
    (vitopt.targets.profile_for_gpu; generic `cuda` otherwise);
  * timing cache: one file per GPU model + compute capability + TensorRT version in the user
    cache dir ($XDG_CACHE_HOME or ~/.cache)/vitopt/tensorrt/, read before and written after
    every build, so later builds skip the kernel timing they already did;
  * progress: top-level builder phases reported through IProgressMonitor;
  * ProfilingVerbosity.DETAILED, so the engine inspector reports each layer's precision; the
    summary (fused attention, precisions) goes into tensorrt.json, and an int8 build with no
    int8 layer warns.
Files: model.engine (the serialized plan) and tensorrt.json (TensorRT version, GPU name and
compute capability, precision, plan, shapes, inspector summary). load refuses an engine built
by another TensorRT version or for another GPU, with the reason (BackendUnavailableError).
Run: torch CUDA tensors on a private stream, addresses bound with set_tensor_address,
execute_async_v3; float32 in and out.
"""
from __future__ import annotations

import copy
import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from vitopt.backends.base import Backend, Engine
from vitopt.backends.tensorrt_checks import (PRECISIONS, BuildPlan, plan_build, precision_warnings,
                                             profile_shapes, require_fit, summarize_layers,
                                             trt_major)
from vitopt.errors import (ArtifactError, BackendUnavailableError, ConfigError,
                           LoweringError)

ENGINE = "model.engine"
RECORD = "tensorrt.json"
RECORD_FORMAT = 1
INPUT, OUTPUT = "images", "output"  # names vitopt.lower.onnx_export gives the graph's I/O


# --- pure helpers (tested without TensorRT) -------------------------------------------------
def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vitopt"


def timing_cache_path(gpu_name: str, capability: Tuple[int, int], trt_version: str,
                      root: Optional[Path] = None) -> Path:
    """Where the timing cache for this GPU model and TensorRT version lives (caches do not
    carry over between GPU models or TensorRT versions, so each pair gets its own file)."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"
    name = f"{slug}-sm{capability[0]}{capability[1]}-trt{trt_version}.timing-cache"
    return Path(root or user_cache_dir() / "tensorrt") / name


def build_settings(gpu, max_batch: int) -> dict:
    """Workspace, builder optimisation level and opt batch from the profile matching `gpu`."""
    from vitopt.targets import TARGETS, profile_for_gpu
    profile = (profile_for_gpu(gpu) if gpu is not None else None) or TARGETS["cuda"]
    return {"profile": profile.name, "workspace": profile.workspace,
            "opt_level": int(profile.tuning.get("trt_opt_level", 3)),
            "opt_batch": max(1, min(max_batch, profile.batch[1]))}


def engine_record(trt_version: str, gpu, plan: BuildPlan, shapes, settings: dict,
                  inspector: Optional[dict]) -> dict:
    return {"format": RECORD_FORMAT, "tensorrt": trt_version, "gpu": gpu.name,
            "capability": f"{gpu.capability[0]}.{gpu.capability[1]}", "precision": plan.precision,
            "plan": {"strongly_typed": plan.strongly_typed, "builder_flags": list(plan.builder_flags),
                     "onnx_float": plan.onnx_float, "qdq": plan.qdq},
            "profile": {"min": list(shapes[0]), "opt": list(shapes[1]), "max": list(shapes[2])},
            "settings": settings, "inspector": inspector}


def check_record(record: dict, trt_version: str, gpu, where: str = "this engine") -> None:
    """Refuse an engine this machine cannot deserialize: another TensorRT version, another GPU
    model or compute capability (TensorRT plans are specific to both), or no GPU at all."""
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise ArtifactError(f"{where}: {RECORD} is missing or of another format; recompile with "
                            f"`vitopt compile --backend tensorrt`")
    built = f"TensorRT {record.get('tensorrt')} on {record.get('gpu')} (compute capability " \
            f"{record.get('capability')})"
    if gpu is None:
        raise BackendUnavailableError(f"{where} was built with {built}; this machine has no "
                                      f"NVIDIA GPU to run it on")
    here_cc = f"{gpu.capability[0]}.{gpu.capability[1]}"
    if record.get("tensorrt") != trt_version:
        raise BackendUnavailableError(f"{where} was built with {built}; this machine has TensorRT "
                                      f"{trt_version}, and TensorRT engines only load in the "
                                      f"version that built them. Recompile here.")
    if record.get("capability") != here_cc or record.get("gpu") != gpu.name:
        raise BackendUnavailableError(f"{where} was built with {built}; this GPU is {gpu.name} "
                                      f"(compute capability {here_cc}), and TensorRT engines are "
                                      f"specific to the GPU model. Recompile on this machine.")


def typed_module(module, onnx_float: str):
    """`module` copied and run in `onnx_float` between float32 casts (explicit precision for a
    strongly typed network); the module itself for fp32."""
    import torch

    if onnx_float == "fp32":
        return module
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[onnx_float]

    class Typed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images):
            return self.inner(images.to(dtype)).to(torch.float32)

    return Typed(copy.deepcopy(module).to(dtype)).eval()


def _stderr(message: str) -> None:
    print(f"[vitopt] tensorrt: {message}", file=sys.stderr, flush=True)


# --- the backend --------------------------------------------------------------------------
class TensorRTEngine(Engine):
    """A deserialized engine: float32 numpy in, float32 numpy out, run on CUDA device 0."""

    backend = "tensorrt"

    def __init__(self, engine, precision: str, runtime=None):
        import tensorrt as trt
        import torch

        # the runtime is kept because it must outlive the engine it deserialized
        self.runtime, self.engine, self.precision = runtime, engine, precision
        self.context = engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ArtifactError(f"the TensorRT engine has inputs {inputs} and outputs {outputs}; "
                                f"vitopt engines have one of each. Recompile with vitopt.")
        for name in names:
            if engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise ArtifactError(f"the engine's tensor {name!r} is "
                                    f"{engine.get_tensor_dtype(name)}, not float32; recompile")
        self.input, self.output = inputs[0], outputs[0]

    def run(self, images: np.ndarray) -> np.ndarray:
        import torch

        with torch.cuda.stream(self.stream):
            x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(
                "cuda", non_blocking=False)
            if not self.context.set_input_shape(self.input, tuple(x.shape)):
                raise ArtifactError(f"the engine does not take input shape {list(x.shape)} "
                                    f"(outside its optimisation profile)")
            out = torch.empty(tuple(self.context.get_tensor_shape(self.output)),
                              dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(self.input, x.data_ptr())
            self.context.set_tensor_address(self.output, out.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise ArtifactError("TensorRT failed to run the engine (execute_async_v3 returned "
                                    "False); its log above says why")
        self.stream.synchronize()
        return out.cpu().numpy()


class TensorRTBackend(Backend):
    name = "tensorrt"
    module = "tensorrt"
    pip = "tensorrt"
    precisions = PRECISIONS
    input_format = "torch"  # build_module lowers with explicit precision; build() takes ONNX

    def __init__(self, progress: Optional[Callable[[str], None]] = _stderr):
        self.progress = progress

    def available(self) -> Tuple[bool, str]:
        try:
            import tensorrt as trt
        except (ImportError, OSError) as exc:  # OSError: libnvinfer missing or broken
            return False, (f"the tensorrt backend needs NVIDIA TensorRT 10 or newer, and the "
                           f"'tensorrt' module cannot be imported ({exc}); install it with `pip "
                           f"install tensorrt` (from NVIDIA's package index) or, on Jetson, "
                           f"with JetPack 6")
        major = trt_major(trt.__version__)
        if major < 10:
            return False, (f"TensorRT {trt.__version__} is too old: vitopt needs 10 or newer "
                           f"(`pip install -U tensorrt`)")
        from vitopt.targets import local_gpu
        if local_gpu() is None:
            return False, ("TensorRT builds and runs engines on an NVIDIA GPU, and this machine "
                           "has none (torch.cuda.is_available() is False)")
        return True, ""

    def version(self) -> str:
        import tensorrt as trt

        return trt.__version__

    def supports(self, precision: str) -> Tuple[bool, str]:
        ok, reason = super().supports(precision)
        if not ok or precision != "bf16":
            return ok, reason
        from vitopt.targets import local_gpu
        gpu = local_gpu()
        if gpu is not None and gpu.capability < (8, 0):
            return False, (f"{gpu.name} ({gpu.arch}) has no bf16 (needs sm_80 or newer); use "
                           f"--precision fp16")
        return True, ""

    def plan(self, precision: str) -> BuildPlan:
        from vitopt.targets import local_gpu
        gpu = local_gpu()
        return plan_build(trt_major(self.version()), precision, gpu.capability if gpu else None)

    # --- build ----------------------------------------------------------------------------
    def build_module(self, module, example, out_dir: Path, *, precision: str, max_batch: int,
                     device: str = "cuda", threads: Optional[int] = None) -> List[str]:
        """Lower `module` (the IR) with the plan's explicit precision, check, build."""
        from vitopt.lower.onnx_export import export_onnx

        if device != "cuda":
            raise ConfigError(f"the tensorrt backend builds for NVIDIA GPUs (target cuda or a GPU "
                              f"profile), not {device!r}")
        self.require(precision)
        self._check_max_batch(max_batch)
        plan = self.plan(precision)
        with tempfile.TemporaryDirectory(prefix="vitopt-trt-") as tmp:
            onnx_path = export_onnx(typed_module(module, plan.onnx_float), example.float(),
                                    Path(tmp) / "model.onnx")
            return self.build(onnx_path, out_dir, precision=precision, max_batch=max_batch)

    def build(self, onnx_path: Path, out_dir: Path, *, precision: str, max_batch: int,
              threads: Optional[int] = None) -> List[str]:
        """ONNX -> engine. The ONNX must already carry the plan's precision (build_module
        writes it); it is checked before TensorRT sees it."""
        import onnx
        import tensorrt as trt

        from vitopt.targets import local_gpu
        self.require(precision)
        self._check_max_batch(max_batch)
        plan, gpu = self.plan(precision), local_gpu()
        model = onnx.load(str(onnx_path), load_external_data=False)
        require_fit(model, plan, max_batch)
        dims = model.graph.input[0].type.tensor_type.shape.dim
        settings = build_settings(gpu, max_batch)
        shapes = profile_shapes([d.dim_value for d in dims[1:]], max_batch, settings["opt_batch"])

        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        # No creation flags: TensorRT 11 is always strongly typed (STRONGLY_TYPED is deprecated
        # and ignored there); TensorRT 10 builds weakly typed with precision builder flags.
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(model.SerializeToString()):
            errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
            raise LoweringError(f"TensorRT's ONNX parser refused {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings["workspace"])
        config.builder_optimization_level = settings["opt_level"]
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        for flag in plan.builder_flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        for flag in plan.clear_flags:
            config.clear_flag(getattr(trt.BuilderFlag, flag))
        profile = builder.create_optimization_profile()
        profile.set_shape(network.get_input(0).name, *shapes)
        config.add_optimization_profile(profile)
        cache_path = timing_cache_path(gpu.name, gpu.capability, trt.__version__)
        load_timing_cache(config, cache_path, self.progress)
        monitor = progress_monitor(trt, self.progress) if self.progress else None
        if monitor is not None:
            config.progress_monitor = monitor
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise LoweringError(f"TensorRT {trt.__version__} could not build an engine from "
                                f"{onnx_path} for {precision}; its log above says why")
        save_timing_cache(config, cache_path)

        inspector = self._inspect(trt, logger, serialized, precision)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ENGINE).write_bytes(bytes(serialized))
        record = engine_record(trt.__version__, gpu, plan, shapes, settings, inspector)
        (out_dir / RECORD).write_text(json.dumps(record, indent=2))
        return [ENGINE, RECORD]

    def _inspect(self, trt, logger, serialized, precision: str) -> Optional[dict]:
        runtime = trt.Runtime(logger)  # must outlive the engine it deserializes
        engine = runtime.deserialize_cuda_engine(serialized)
        if engine is None:
            raise LoweringError("TensorRT built an engine it cannot deserialize; see its log")
        inspector = engine.create_engine_inspector()
        summary = summarize_layers(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        del inspector, engine  # before the runtime
        for message in precision_warnings(summary, precision):
            warnings.warn(f"tensorrt: {message}", stacklevel=3)
        return summary

    # --- load -----------------------------------------------------------------------------
    def load(self, out_dir: Path, files: Sequence[str], *, precision: str,
             threads: Optional[int] = None) -> TensorRTEngine:
        import tensorrt as trt

        from vitopt.targets import local_gpu
        self.require(precision)
        plan_file, record_file = self._pick(out_dir, files, ".engine"), self._pick(out_dir, files, ".json")
        try:
            record = json.loads(record_file.read_text())
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"cannot read {record_file}: {exc}; recompile") from exc
        check_record(record, trt.__version__, local_gpu(), where=str(Path(out_dir)))
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(plan_file.read_bytes())
        if engine is None:
            raise ArtifactError(f"TensorRT {trt.__version__} could not deserialize {plan_file}; "
                                f"recompile with `vitopt compile --backend tensorrt`")
        return TensorRTEngine(engine, precision, runtime)


# --- TensorRT objects vitopt implements or keeps ---------------------------------------------
def load_timing_cache(config, path: Path, progress=None) -> None:
    """Give the builder config the timing cache stored at `path` (an empty one when there is
    none, or when TensorRT rejects the stored one)."""
    data = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(data)
    except (RuntimeError, TypeError, ValueError) as exc:  # a corrupt file: start over, say so
        if progress:
            progress(f"timing cache {path} is not usable ({exc}); starting an empty one")
        cache, data = None, b""
    if cache is None:
        cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, False)
    if progress and data:
        progress(f"reusing the timing cache {path}")


def save_timing_cache(config, path: Path) -> None:
    """Write the config's timing cache to `path` atomically (other builds may read it)."""
    cache = config.get_timing_cache()
    if cache is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(bytes(cache.serialize()))
    os.replace(tmp, path)


def progress_monitor(trt, report: Callable[[str], None]):
    """An IProgressMonitor that reports the builder's top-level phases (nested phases and
    steps are many and fast; they are counted, not printed). Never cancels the build."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.steps = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = num_steps
            if parent_phase is None:
                report(f"{phase_name} ({num_steps} steps) ...")

        def step_complete(self, phase_name, step):
            return True

        def phase_finish(self, phase_name):
            self.steps.pop(phase_name, None)

    return Monitor()
