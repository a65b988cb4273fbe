"""Apache TVM (Relax) as a vitopt backend: torch module -> Relax -> llvm or CUDA library.

Like AOTInductor it builds from the torch module (`input_format = "torch"`):

    files = TVMBackend().build_module(ir, example, out_dir, precision="fp32", max_batch=8,
                                      device="cpu", tune_trials=200)
    engine = TVMBackend().load(out_dir, files, precision="fp32")

build_module, step by step:
  1. export: the module (fp32) is torch.export-ed, with the batch shape of the plan below;
  2. import: `tvm.relax.frontend.torch.from_exported_program` with vitopt's converters for its
     own torch ops (`vitopt.lower.tvm_ops.custom_convert_map()`); weights become constants.
     Steps 1-3 go stage by stage instead (`lowering`, choose_lowering) for an untuned
     EncoderIR with token reduction: stages of one kind share one Relax function with a
     symbolic token count, so TVM lowers them once, not once per token count
     (tvm_stage_import.py);
  3. rewrites, with a symbolic batch (tvm_rewrites.py: a linear's weight that torch's
     decomposition broadcast over the batch is used unbroadcast); precision: fp16 (CUDA) is
     `relax.transform.ToMixedPrecision(out_dtype="float32")` (matmul/conv inputs fp16, fp32
     accumulation, softmax kept fp32), then LayerNorm and softmax that came out fp16 are
     computed in fp32 and cast back (`reductions_in_fp32`). The function still takes and
     returns float32;
  4. prepare: the target's library dispatch, LegalizeOps, FoldConstant, FuseOps, FuseTIR;
  5. tune (tune_trials > 0): MetaSchedule on the fused TIR functions, with the persistent
     database of tvm_tuning.py (a second compile reuses it and tunes nothing new);
  6. finish: apply the database's best schedules; on CUDA, dlight default schedules (gpu.Matmul,
     GEMV, Reduction, GeneralReduction, Fallback) for every function the database does not
     cover; on llvm, dlight's CPU Reduction/GEMV and a parallel+vector rule for elementwise
     functions (tvm_cpu_schedules.py; GEMMs are left to tuning); the dataflow-lowering and finalize passes; `tvm.compile`; `export_library`.
Beside `model.so` a JSON record (`tvm.json`) holds what load needs: TVM version, target dict,
device, dtype, batch plan, CPU features or CUDA arch, tuning info.

Parameters are bound into the library as constants: FoldConstant then pre-computes the weight
transposes (every linear is `x @ W.T`) at build time instead of at every call, and the artifact
is one self-contained file that needs no parameter-loading step at run time.

Batch plan: MetaSchedule only tunes static-shape functions (it extracts no tasks with a
symbolic batch), and llvm code is only fast when scheduled, so on the CPU the library holds one
static batch-1 function and the engine runs a batch image by image. On CUDA without tuning the
function takes any batch 1..max_batch (dlight schedules symbolic shapes); tuned CUDA builds are
static at max_batch and smaller batches are zero-padded (images are independent).

CUDA without a GPU: TVM compiles CUDA through NVRTC, so `device="cuda"` with `cuda_arch="sm_90"`
builds here (cross-compilation); load refuses it on a machine without that GPU.
Threads (CPU): TVM's own thread pool; it starts with $TVM_NUM_THREADS threads, which vitopt
sets to this machine's usable cores unless already set (TVM alone would use one here), and
load(threads=N) reconfigures the pool for the engine's calls.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from vitopt.backends import tvm_targets, tvm_tuning
from vitopt.backends.base import Backend, Engine
from vitopt.backends.tvm_cpu_schedules import cpu_default_schedules, fast_math_pass
from vitopt.backends.tvm_schedules import ScheduleReport, robust_dlight_pass
from vitopt.backends.tvm_speedups import fast_inspect_stack
from vitopt.backends.tvm_rewrites import unbroadcast_matmul_weights
from vitopt.backends.tvm_stage_import import import_stages
from vitopt.errors import ArtifactError, BackendUnavailableError, ConfigError, LoweringError

LIBRARY = "model.so"
RECORD = "tvm.json"
RECORD_FORMAT = 1
DEVICES = ("cpu", "cuda")
DTYPES = {"fp32": "float32", "fp16": "float16"}
CPU_PRECISIONS = ("fp32",)
FUNCTION = "main"
Log = Callable[[str], None]


def _init_threads() -> None:
    """TVM sizes its pool from $TVM_NUM_THREADS when it starts; default it to the usable cores."""
    os.environ.setdefault("TVM_NUM_THREADS", str(tvm_targets.usable_cores()))


def batch_plan(device: str, max_batch: int, tuned: bool) -> Dict[str, object]:
    """{"mode": "per-image" | "dynamic" | "padded", "batch": the static batch or None}."""
    if device == "cpu":
        return {"mode": "per-image", "batch": 1}
    if tuned:
        return {"mode": "padded", "batch": max_batch}
    return {"mode": "dynamic", "batch": None}


class TVMEngine(Engine):
    """A loaded library: float32 numpy in, float32 numpy out (fp16 runs inside on CUDA)."""

    backend = "tvm"

    def __init__(self, vm, device, plan: Dict[str, object], precision: str, max_batch: int):
        self.vm, self.device, self.plan = vm, device, plan
        self.precision, self.max_batch = precision, max_batch
        self.function = vm[FUNCTION]

    def run(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if self.plan["mode"] == "per-image":
            return np.concatenate([self._call(images[i:i + 1]) for i in range(len(images))])
        if self.plan["mode"] == "padded":
            static = int(self.plan["batch"])
            chunks = [self._padded(images[i:i + static], static)
                      for i in range(0, len(images), static)]
            return np.concatenate(chunks)
        return self._call(images)

    def _padded(self, images: np.ndarray, static: int) -> np.ndarray:
        if len(images) == static:
            return self._call(images)
        padded = np.zeros((static, *images.shape[1:]), np.float32)
        padded[:len(images)] = images
        return self._call(padded)[:len(images)]

    def _call(self, images: np.ndarray) -> np.ndarray:
        import tvm

        out = self.function(tvm.runtime.tensor(images, self.device))
        if not hasattr(out, "numpy"):  # the importer returns a tuple of outputs
            out = out[0]
        return out.numpy().astype(np.float32, copy=False)


class TVMBackend(Backend):
    name = "tvm"
    module = "tvm"
    pip = "vitopt[tvm]"
    precisions = tuple(DTYPES)
    input_format = "torch"  # build_module() takes the torch module; build() (ONNX) refuses

    def available(self) -> Tuple[bool, str]:
        _init_threads()
        try:
            import tvm
            from tvm import relax  # noqa: F401
            from tvm.relax.frontend.torch import from_exported_program  # noqa: F401
        except ImportError as exc:
            return self._import_error(exc)
        if not hasattr(tvm, "s_tir") or not hasattr(tvm, "compile"):
            return False, (f"vitopt needs TVM 0.27 or newer (tvm.compile, tvm.s_tir); found "
                           f"{getattr(tvm, '__version__', '?')}; install it with "
                           f"`pip install {self.pip}`")
        compiler = os.environ.get("CXX") or "g++"
        if shutil.which(compiler) is None:
            return False, (f"TVM links its libraries with {compiler!r}, which is not on PATH; "
                           f"install a C++ compiler (`apt-get install g++`) or point $CXX at one")
        return True, ""

    def version(self) -> str:
        import tvm

        return str(tvm.__version__)

    # --- build -----------------------------------------------------------------------------
    def build(self, onnx_path: Path, out_dir: Path, *, precision: str, max_batch: int,
              threads: Optional[int] = None) -> List[str]:
        raise LoweringError(f"the {self.name} backend builds from the torch module, not from "
                            f"ONNX ({onnx_path}); call build_module(module, example, out_dir, ...)")

    def build_module(self, module, example, out_dir: Path, *, precision: str, max_batch: int,
                     device: str = "cpu", threads: Optional[int] = None, tune_trials: int = 0,
                     tuning_db: Optional[str] = None, cuda_arch: Optional[str] = None,
                     lowering: str = "auto", log: Optional[Log] = None) -> List[str]:
        """Compile `module` (images [B,C,H,W] -> tensor) into out_dir; return the file names.

        cuda_arch: "sm_XX" for device="cuda" (default: the visible GPU's); with it no GPU is
        needed here. tune_trials: MetaSchedule trials in all (0: default schedules only).
        tuning_db: the database folder (default: tvm_tuning.cache_root()).
        lowering: "whole" (one export of the module), "stages" (an EncoderIR stage by stage,
        stages of one kind sharing a function: tvm_stage_import.py) or "auto" (choose_lowering).
        """
        log = log or (lambda message: None)
        self._check_request(precision, device, tune_trials)
        self.require(precision)
        self._check_max_batch(max_batch)
        self._check_threads(threads)
        target = self.target_for(device, cuda_arch, threads)
        plan = batch_plan(device, max_batch, tune_trials > 0)
        started = time.perf_counter()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        # TVMScript parsing inside dlight/MetaSchedule is 40-100x slower with torch loaded
        # unless inspect.stack is the fast equivalent (tvm_speedups has the measurement).
        lowering, why = choose_lowering(module, lowering, tune_trials)
        log(f"TVM lowering: {lowering} ({why})")
        stages = None
        with fast_inspect_stack():
            rewrite = functools.partial(after_import, precision=precision,
                                        dynamic_batch=plan["batch"] is None)
            if lowering == "stages":
                mod, stages = import_stages(module, example, plan, max_batch, log=log,
                                            transform=rewrite)
            else:
                mod = rewrite(import_module(module, example, plan, max_batch))
            mod = prepare(mod, target)
            tuning = None
            if tune_trials > 0:
                db_dir = tvm_tuning.database_dir(target, tuning_db)
                tuning = tvm_tuning.tune_module(mod, target, tune_trials, db_dir, log)
            schedules = compile_library(mod, target, out_dir / LIBRARY,
                                        tuning and tuning["database"])
        record = build_record(target, device, precision, max_batch, plan, tuning,
                              list(example.shape[1:]), time.perf_counter() - started)
        record["lowering"] = {"mode": lowering, "why": why, **(stages or {})}
        if device == "cuda":
            record["schedule_fallbacks"] = schedules.fallbacks
            for name, why in schedules.fallbacks.items():
                log(f"TVM schedule fallback for {name}: {why}")
        (out_dir / RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
        log(f"TVM {record['tvm']} built {record['built_for']} in {record['compile_seconds']}s")
        return [LIBRARY, RECORD]

    def _check_request(self, precision: str, device: str, tune_trials) -> None:
        if device not in DEVICES:
            raise ConfigError(f"unknown device {device!r} for {self.name}; use one of "
                              f"{', '.join(DEVICES)}")
        if not isinstance(tune_trials, int) or isinstance(tune_trials, bool) or tune_trials < 0:
            raise ConfigError(f"tune_trials must be an integer >= 0 (0: no tuning), got "
                              f"{tune_trials!r}")
        if precision in self.precisions and device == "cpu" and precision not in CPU_PRECISIONS:
            raise ConfigError(f"{self.name} on CPU builds {', '.join(CPU_PRECISIONS)} only, not "
                              f"{precision!r}; use --precision fp32, or --target cuda")

    @staticmethod
    def target_for(device: str, cuda_arch: Optional[str] = None,
                   threads: Optional[int] = None) -> Dict[str, object]:
        """The TVM target dict for `device` (llvm for this CPU, or cuda for `cuda_arch`)."""
        if device == "cpu":
            return tvm_targets.llvm_target(threads)
        arch = cuda_arch or tvm_targets.visible_cuda_arch()
        if arch is None:
            raise BackendUnavailableError(
                "building for CUDA needs either a visible GPU or a CUDA architecture to "
                "cross-compile for; this machine has no GPU, so pass --cuda-arch (e.g. sm_90 "
                "for H100, sm_80 for A100)")
        return tvm_targets.cuda_target(arch)

    # --- load ------------------------------------------------------------------------------
    def load(self, out_dir: Path, files: Sequence[str], *, precision: str,
             threads: Optional[int] = None) -> TVMEngine:
        """The engine for a built library; BackendUnavailableError if it cannot run here."""
        self.require()
        self._check_threads(threads)
        library = self._pick(out_dir, files, ".so")
        record = read_record(self._pick(out_dir, files, ".json"))
        if record["precision"] != precision:
            raise ArtifactError(f"{library} was built for {record['precision']!r}, not "
                                f"{precision!r}; recompile with `vitopt compile`")
        check_fits_here(record, library)
        import tvm
        from tvm import relax

        if threads is not None and record["device"] == "cpu":
            set_threads(threads)
        try:
            executable = tvm.runtime.load_module(str(library))
            device = tvm.cuda(0) if record["device"] == "cuda" else tvm.cpu(0)
            vm = relax.VirtualMachine(executable, device)
        except Exception as exc:  # the loader raises TVMError with C++ messages
            raise ArtifactError(f"TVM {tvm.__version__} cannot load {library} (built with TVM "
                                f"{record.get('tvm')}): {_first_line(exc)}. Recompile with "
                                f"`vitopt compile`.") from exc
        return TVMEngine(vm, device, record["batch_plan"], precision, int(record["max_batch"]))


# --- the build steps ------------------------------------------------------------------------
LOWERINGS = ("auto", "whole", "stages")


def choose_lowering(module, requested: str, tune_trials: int) -> Tuple[str, str]:
    """("whole" | "stages", why). auto: stage by stage for an untuned EncoderIR whose blocks
    run at more than one token count (token reduction: the whole-model import lowers one set
    of TIR functions per count), else the whole module at once."""
    from vitopt.ir.encoder import EncoderIR
    from vitopt.ir.stages import Attention

    if requested not in LOWERINGS:
        raise ConfigError(f"unknown TVM lowering {requested!r}; use one of {', '.join(LOWERINGS)}")
    if requested == "whole":
        return "whole", "asked for"
    refusal = None
    if not isinstance(module, EncoderIR):
        refusal = f"the module is a {type(module).__name__}, not an EncoderIR"
    elif tune_trials > 0:
        refusal = ("MetaSchedule tunes only static shapes, and shared stage functions have a "
                   "symbolic token count")
    if requested == "stages":
        if refusal:
            raise ConfigError(f"the TVM stage lowering does not apply: {refusal}; use "
                              f"lowering='whole' or 'auto'")
        return "stages", "asked for"
    if refusal:
        return "whole", refusal
    counts = {n for stage, n in zip(module.stages, module.token_counts())
              if isinstance(stage, Attention)}
    if len(counts) <= 1:
        return "whole", "every block runs at one token count"
    return "stages", (f"blocks run at {len(counts)} token counts; stages of one kind share a "
                      f"function with a symbolic token count")


def import_module(module, example, plan: Dict[str, object], max_batch: int):
    """torch.export (batch per `plan`) -> Relax IRModule, with vitopt's op converters."""
    import copy

    import torch
    from torch.export import Dim
    from tvm.relax.frontend.torch import from_exported_program

    from vitopt.lower.tvm_ops import custom_convert_map

    if not isinstance(example, torch.Tensor) or example.dim() != 4:
        raise ConfigError(f"example must be a 4-d image tensor [B,C,H,W], got "
                          f"{getattr(example, 'shape', type(example).__name__)}")
    module = copy.deepcopy(module).eval().float()
    batch = 2 if plan["batch"] is None else int(plan["batch"])
    images = example[:1].float().expand(batch, -1, -1, -1).contiguous()
    dynamic = None if plan["batch"] is not None else \
        ({0: Dim("batch", min=1, max=max(2, max_batch))},)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(module, (images,), dynamic_shapes=dynamic)
    except Exception as exc:  # torch.export raises many types; report them as one
        raise LoweringError(f"torch.export could not export the module for TVM: "
                            f"{_first_line(exc)}") from exc
    try:
        return from_exported_program(program, custom_convert_map=custom_convert_map())
    except Exception as exc:  # the importer raises on ops it has no converter for
        raise LoweringError(f"TVM's exported-program importer could not convert the module: "
                            f"{_first_line(exc)}; an op vitopt adds needs a converter in "
                            f"vitopt/lower/tvm_ops.py") from exc


def after_import(mod, precision: str, dynamic_batch: bool):
    """With a symbolic batch, the rewrites of tvm_rewrites.py (with a static batch the weight
    broadcasts they remove fold at build time); then fp16 when asked for."""
    if dynamic_batch:
        mod = unbroadcast_matmul_weights(mod)
    return to_fp16(mod) if precision == "fp16" else mod


def to_fp16(mod):
    """fp16 with fp32 accumulation, LayerNorm and softmax computed in fp32 (see module doc)."""
    from tvm import relax

    mod = relax.transform.ToMixedPrecision(out_dtype="float32")(mod)
    return reductions_in_fp32(mod)


def reductions_in_fp32(mod):
    """Every fp16 LayerNorm/softmax becomes cast-to-fp32, the op, cast-back-to-fp16."""
    from tvm import relax
    from tvm.ir import Op

    ops = {Op.get("relax.nn.layer_norm"), Op.get("relax.nn.softmax")}

    @relax.expr_functor.mutator
    class _Mutator(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            info = call.ty
            if call.op not in ops or getattr(info, "dtype", None) != "float16":
                return call
            args = [self.builder_.emit(relax.op.astype(arg, "float32")) for arg in call.args]
            inner = self.builder_.emit(relax.Call(call.op, args, call.attrs))
            return relax.op.astype(inner, "float16")

    mutator = _Mutator(mod)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    return mutator.builder_.get()


def prepare(mod, target: Dict[str, object]):
    """Library dispatch, legalize, fold and fuse: the module MetaSchedule extracts tasks from."""
    import tvm
    from tvm import relax

    tvm_target = tvm.target.Target(target)
    # llvm: GELU, softmax, exp, erf, tanh as TVM's vectorizable fast_* polynomials
    # (tvm_cpu_schedules.fast_math_pass); CUDA keeps the exact forms.
    fast_math = [fast_math_pass()] if target["kind"] == "llvm" else []
    with tvm_target:
        passes = _backend_pipeline(target).library_dispatch_passes(tvm_target) + [
            *fast_math, relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
        return tvm.transform.Sequential(passes)(mod)


def finish_pipeline(target: Dict[str, object], database: Optional[str],
                    report: Optional[ScheduleReport] = None):
    """Apply tuned schedules, then dlight defaults to the rest (CUDA: per function, with
    fallbacks: tvm_schedules; llvm: tvm_cpu_schedules), then lower and finalize (a Relax pass)."""
    import tvm
    from tvm import relax

    tvm_target = tvm.target.Target(target)
    passes = []
    if database:
        passes.append(relax.transform.MetaScheduleApplyDatabase(work_dir=database))
    if target["kind"] == "cuda":
        passes.append(robust_dlight_pass(report if report is not None else ScheduleReport()))
    else:  # llvm: parallel + vector schedules for what MetaSchedule did not tune
        passes.append(cpu_default_schedules())
    backend = _backend_pipeline(target)
    passes += backend.dataflow_lower_passes(tvm_target) + backend.finalize_passes(tvm_target)
    return tvm.transform.Sequential(passes)


def _backend_pipeline(target: Dict[str, object]):
    """TVM's per-target pass lists (tvm.relax.backend.<cpu_generic|cuda>.pipeline)."""
    import importlib

    name = "cuda" if target["kind"] == "cuda" else "cpu_generic"
    return importlib.import_module(f"tvm.relax.backend.{name}.pipeline")


def compile_library(mod, target: Dict[str, object], path: Path,
                    database: Optional[str]) -> ScheduleReport:
    """tvm.compile with finish_pipeline, then export_library to `path`; returns which functions
    needed a schedule fallback (CUDA)."""
    import tvm

    report = ScheduleReport()

    tvm_target = tvm.target.Target(target)
    try:
        with tvm_target, tvm.transform.PassContext(opt_level=3):
            executable = tvm.compile(mod, target=tvm_target,
                                     relax_pipeline=finish_pipeline(target, database, report))
        executable.export_library(str(path))
        return report
    except Exception as exc:  # TVMError / compiler errors from C++
        raise LoweringError(f"TVM could not compile the module for {target['kind']}"
                            f"{' ' + str(target.get('arch')) if target.get('arch') else ''}: "
                            f"{_first_line(exc)}") from exc


# --- the build record -----------------------------------------------------------------------
def build_record(target: Dict[str, object], device: str, precision: str, max_batch: int,
                 plan: Dict[str, object], tuning: Optional[dict], input_shape: List[int],
                 seconds: float) -> dict:
    """What tvm.json holds: everything load needs to tell whether the library fits."""
    import tvm

    record = {"format": RECORD_FORMAT, "tvm": str(tvm.__version__), "device": device,
              "precision": precision, "dtype": DTYPES[precision], "max_batch": max_batch,
              "batch_plan": plan, "input_shape": input_shape, "target": target,
              "tuning": tuning or {"trials": 0, "schedules": "dlight defaults" if
                                   device == "cuda" else "TVM defaults (untuned)"},
              "compile_seconds": round(seconds, 2)}
    if device == "cpu":
        record["cpu"] = {"mcpu": target["mcpu"],
                         "features": tvm_targets.required_features(target)}
        record["built_for"] = f"llvm {target['mcpu']} ({len(record['cpu']['features'])} features)"
    else:
        here = tvm_targets.visible_cuda_arch()
        record["cuda_arch"] = target["arch"]
        record["gpu"] = tvm_targets.gpu_name() if here else None
        record["cross_compiled"] = here is None
        record["built_for"] = f"cuda {target['arch']}" + (
            " (cross-compiled, not run on this machine)" if here is None else f" on {record['gpu']}")
    return record


def read_record(path: Path) -> dict:
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read the TVM build record {path}: {exc}; recompile with "
                            f"`vitopt compile`") from exc
    if not isinstance(record, dict) or record.get("device") not in DEVICES or \
            record.get("precision") not in DTYPES or not isinstance(record.get("batch_plan"), dict):
        raise ArtifactError(f"{path} is not a TVM build record this vitopt reads (it needs "
                            f"device, precision and batch_plan); recompile with `vitopt compile`")
    return record


def check_fits_here(record: dict, library: Path) -> None:
    """BackendUnavailableError unless this machine has the GPU arch / CPU features it needs."""
    if record["device"] == "cuda":
        arch, here = record.get("cuda_arch"), tvm_targets.visible_cuda_arch()
        if here is None:
            raise BackendUnavailableError(
                f"{library} is a CUDA library for {arch}"
                f"{' (cross-compiled, never run)' if record.get('cross_compiled') else ''}, and "
                f"this machine has no CUDA GPU; run it on a machine with an {arch} GPU, or "
                f"recompile for the CPU with --target cpu")
        if here != arch:
            raise BackendUnavailableError(f"{library} was compiled for {arch}; this GPU is "
                                          f"{tvm_targets.gpu_name()} ({here}). Recompile with "
                                          f"--cuda-arch {here}.")
        return
    missing = tvm_targets.missing_cpu_features((record.get("cpu") or {}).get("features") or [])
    if missing:
        cpu = (record.get("cpu") or {}).get("mcpu", "another CPU")
        raise BackendUnavailableError(f"{library} was compiled for {cpu} with CPU features this "
                                      f"CPU lacks: {', '.join(missing)}. Recompile on this "
                                      f"machine with `vitopt compile --backend tvm`.")


def set_threads(threads: int) -> None:
    """Resize TVM's CPU thread pool (mode 1: big cores, as TVM's own default)."""
    from tvm_ffi import get_global_func

    os.environ["TVM_NUM_THREADS"] = str(threads)
    get_global_func("runtime.config_threadpool")(1, int(threads))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"
