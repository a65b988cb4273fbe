"""AOTInductor (torch's own ahead-of-time compiler) as a vitopt backend: torch module -> .pt2.

Unlike the ONNX backends it builds from the torch module (`input_format = "torch"`):

    files = AOTInductorBackend().build_module(ir, example, out_dir, precision="fp16",
                                              max_batch=64, device="cuda")
    engine = AOTInductorBackend().load(out_dir, files, precision="fp16")

build_module: the module is copied, cast to the precision's dtype, moved to the device and
torch.export-ed with a dynamic batch (1..max_batch); `torch._inductor.aoti_compile_and_package`
turns that into one `.pt2` package (C++/OpenMP kernels on CPU, Triton kernels on CUDA; g++
compiles the wrapper either way). Beside it `aotinductor.json` records what the package needs:
device, dtype, max batch, torch version, the CPU flags its vector kernels use, and on CUDA the
GPU's name and compute capability. load refuses, with BackendUnavailableError, a package built
for CUDA on a machine without that GPU, or built for CPU flags this CPU lacks.

Precisions: fp32 on CPU; fp32, fp16 and bf16 (compute capability >= 8.0) on CUDA. fp16/bf16
engines take float32 images, cast them inside run and return float32; Inductor keeps
LayerNorm and softmax reductions in fp32.
Tuning: "default", or "max-autotune" (inductor option max_autotune=True: benchmarks GEMM and
other kernel choices at build time; compile time grows from seconds to many minutes).
Threads (CPU): with `threads=None` at build the kernels follow torch's thread count at run
time (inductor cpp.dynamic_threads), and load(threads=N) sets it for each call; a build with
`threads=N` bakes N into the kernels.
Loaders: how load opens the package (LOADERS; `open_package`). "package" (the default) is
`torch._inductor.aoti_load_package(path)`. The others exist because a CUDA package once
segfaulted inside AOTIModelPackageLoader's constructor on the H100 (torch 2.11, loaded in the
process that built it while Inductor's compile workers were alive); benchmarks/aoti_diag.py tries
each on the GPU machine, and $VITOPT_AOTI_LOADER picks one for CUDA packages (an explicit
`load(loader=...)` wins; CPU packages use "package" unless asked).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
import time
import warnings
import weakref
import zipfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from vitopt.backends.base import Backend, Engine
from vitopt.errors import (ArtifactError, BackendUnavailableError, ConfigError,
                           LoweringError)

PACKAGE = "model.pt2"
RECORD = "aotinductor.json"
RECORD_FORMAT = 1
DEVICES = ("cpu", "cuda")
TUNINGS = ("default", "max-autotune")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
CPU_PRECISIONS = ("fp32",)
#: Ways to open a .pt2 (open_package): aoti_load_package as is, with run_single_threaded=True,
#: with an explicit device_index, the C++ AOTIModelPackageLoader called directly, the wrapper .so
#: extracted and run by AOTIModelContainerRunnerCpu/Cuda (no package loader at all), and
#: aoti_load_package after shutting down Inductor's compile-worker pool.
LOADERS = ("package", "single-threaded", "device-index", "loader-class", "so-runner",
           "no-workers")
LOADER_ENV = "VITOPT_AOTI_LOADER"
#: Words of Inductor's CPU vector ISA name -> the /proc/cpuinfo flag each one needs.
ISA_FLAGS = {"avx2": "avx2", "avx512": "avx512f", "avx512_vnni": "avx512_vnni",
             "amx_tile": "amx_tile", "asimd": "asimd"}


def cpp_compiler() -> str:
    """The C++ compiler Inductor calls: $CXX, else g++."""
    return os.environ.get("CXX") or "g++"


def gpu_identity() -> Optional[dict]:
    """{"name", "capability"} of CUDA device 0, or None without a usable CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "capability": f"{major}.{minor}"}


def cpu_isa_flags() -> List[str]:
    """The CPU flags the vector kernels Inductor generates on this machine rely on."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return [ISA_FLAGS[word] for word in str(pick_vec_isa()).split() if word in ISA_FLAGS]


class AOTInductorEngine(Engine):
    """A loaded .pt2 package: float32 numpy in, float32 numpy out, any device and dtype inside."""

    backend = "aotinductor"

    def __init__(self, runner, device: str, dtype, precision: str, threads: Optional[int]):
        self.runner, self.device, self.dtype = runner, device, dtype
        self.precision, self.threads = precision, threads

    def run(self, images: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, self.dtype)
        with torch.no_grad(), self._thread_count():
            out = self.runner(x)
        if isinstance(out, (list, tuple)):
            out = out[0]
        return out.float().cpu().numpy()

    def run_all(self, inputs) -> list:
        """Several inputs in the module's order -> every output (segments of an early-exit
        model: images or tokens[, sizes] in; logits, tokens[, sizes] out)."""
        import torch

        xs = [torch.from_numpy(np.ascontiguousarray(a)).to(self.device, self.dtype) for a in inputs]
        with torch.no_grad(), self._thread_count():
            out = self.runner(*xs)
        out = out if isinstance(out, (list, tuple)) else [out]
        return [o.float().cpu().numpy() for o in out]

    def _thread_count(self):
        import torch

        if self.device != "cpu" or self.threads is None or torch.get_num_threads() == self.threads:
            return contextlib.nullcontext()
        return _torch_threads(self.threads)


@contextlib.contextmanager
def _torch_threads(threads: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class AOTInductorBackend(Backend):
    name = "aotinductor"
    module = "torch._inductor"
    pip = "torch"
    precisions = tuple(DTYPES)
    input_format = "torch"  # build_module() takes the torch module; build() (ONNX) refuses

    def available(self) -> Tuple[bool, str]:
        try:
            import torch
            import torch._inductor
        except ImportError as exc:
            return self._import_error(exc)
        if not hasattr(torch._inductor, "aoti_compile_and_package"):
            return False, (f"torch {torch.__version__} has no AOTInductor packaging "
                           f"(torch._inductor.aoti_compile_and_package); install torch>=2.6 "
                           f"with `pip install -U torch`")
        compiler = cpp_compiler()
        if shutil.which(compiler) is None:
            return False, (f"AOTInductor compiles C++ with {compiler!r}, which is not on PATH; "
                           f"install a C++ compiler (`apt-get install g++`) or point $CXX at one")
        return True, ""

    def version(self) -> str:
        import torch

        return torch.__version__

    def supports(self, precision: str) -> Tuple[bool, str]:
        ok, reason = super().supports(precision)
        if not ok or precision in CPU_PRECISIONS:
            return ok, reason
        gpu = gpu_identity()
        if gpu is None:
            return False, (f"AOTInductor runs {precision} on CUDA GPUs only, and this machine "
                           f"has none (torch.cuda.is_available() is False); use --precision "
                           f"fp32 for the CPU")
        if precision == "bf16" and float(gpu["capability"]) < 8.0:
            return False, (f"bf16 needs compute capability 8.0 or newer; {gpu['name']} has "
                           f"{gpu['capability']}; use --precision fp16")
        return True, ""

    # --- build -----------------------------------------------------------------------------
    def build(self, onnx_path: Path, out_dir: Path, *, precision: str, max_batch: int,
              threads: Optional[int] = None) -> List[str]:
        raise LoweringError(f"the {self.name} backend builds from the torch module, not from "
                            f"ONNX ({onnx_path}); call build_module(module, example, out_dir, ...)")

    def build_module(self, module, example, out_dir: Path, *, precision: str, max_batch: int,
                     device: str = "cpu", tuning: str = "default", threads: Optional[int] = None,
                     options: Optional[Mapping[str, object]] = None,
                     name: str = "") -> List[str]:
        """Compile `module` (images [B,C,H,W] -> tensor) into out_dir; return the file names.

        example: float32 images; only their shape [C,H,W] matters. A tuple of tensors instead
        compiles a module of several inputs, all with the batch first (an early-exit segment:
        tokens [B,N,D] and sizes [B,N,1]). options: extra torch._inductor.config settings
        ({"name": value}), applied last and recorded. name: a prefix for the file names, so
        several packages (segments) share one folder.
        """
        import torch

        self._check_request(precision, device, tuning)
        self.require(precision)
        if device == "cuda" and gpu_identity() is None:
            raise BackendUnavailableError("device='cuda' needs a CUDA GPU, and torch finds none "
                                          "here (torch.cuda.is_available() is False); build "
                                          "with device='cpu' or on the GPU machine")
        self._check_max_batch(max_batch)
        self._check_threads(threads)
        configs = inductor_configs(device, tuning, threads, options)
        dtype = getattr(torch, DTYPES[precision])
        module = copy.deepcopy(module).eval().to(device=device, dtype=dtype)
        inputs = (tuple(_batch_of_two(t, device, dtype) for t in example)
                  if isinstance(example, (tuple, list)) else (_example(example, device, dtype),))
        images = inputs[0]
        program = _export(module, inputs, max_batch)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        package, record_file = f"{name}{PACKAGE}", f"{name}{RECORD}"
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(out_dir / package),
                                                     inductor_configs=dict(configs))
        except Exception as exc:  # Inductor raises many types (codegen, C++ compile, Triton)
            raise LoweringError(f"AOTInductor could not compile the module for {device} "
                                f"{precision}: {_first_line(exc)}") from exc
        record = build_record(device, precision, max_batch, tuning, threads, configs,
                              list(images.shape[1:]), time.perf_counter() - started)
        (out_dir / record_file).write_text(json.dumps(record, indent=2), encoding="utf-8")
        return [package, record_file]

    def _check_request(self, precision: str, device: str, tuning: str) -> None:
        if device not in DEVICES:
            raise ConfigError(f"unknown device {device!r} for {self.name}; use one of "
                              f"{', '.join(DEVICES)}")
        if tuning not in TUNINGS:
            raise ConfigError(f"unknown tuning {tuning!r}; use one of {', '.join(TUNINGS)}")
        if precision in self.precisions and device == "cpu" and precision not in CPU_PRECISIONS:
            raise ConfigError(f"{self.name} on CPU builds {', '.join(CPU_PRECISIONS)} only, not "
                              f"{precision!r}; use --precision fp32, or device 'cuda' on a GPU")

    def check_opens(self, out_dir: Path, files: Sequence[str], *, precision: str, device: str,
                    image_shape: Sequence[int]) -> None:
        """EngineLoadError when a fresh process cannot open the package and run a batch (CUDA
        packages: see aoti_load_check, which says why); compile_model calls it before load."""
        from vitopt.backends import aoti_load_check

        if aoti_load_check.wanted(device):
            aoti_load_check.check_opens_in_child(Path(out_dir), files, precision, image_shape)

    # --- load ------------------------------------------------------------------------------
    def load(self, out_dir: Path, files: Sequence[str], *, precision: str,
             threads: Optional[int] = None, loader: Optional[str] = None) -> AOTInductorEngine:
        """The engine for a built package. loader: one of LOADERS; None means "package", or
        $VITOPT_AOTI_LOADER for a CUDA package."""
        import torch

        self.require()
        self._check_threads(threads)
        if loader is not None:
            check_loader(loader, "loader")
        package = self._pick(out_dir, files, ".pt2")
        record = read_record(self._pick(out_dir, files, ".json"))
        if record.get("precision") != precision:
            raise ArtifactError(f"{package} was built for {record.get('precision')!r}, not "
                                f"{precision!r}; recompile with `vitopt compile`")
        check_fits_here(record, package)
        self.require(precision)
        loader = loader or default_loader(record["device"])
        try:
            runner = open_package(package, loader, record["device"])
        except Exception as exc:  # the loader raises RuntimeError with C++ messages
            raise ArtifactError(f"torch {torch.__version__} cannot load {package} (built with "
                                f"torch {record.get('torch')}): {_first_line(exc)}. Recompile "
                                f"with `vitopt compile` on this machine.") from exc
        return AOTInductorEngine(runner, record["device"], getattr(torch, DTYPES[precision]),
                                 precision, threads)


# --- opening a package ----------------------------------------------------------------------
def check_loader(loader: str, source: str) -> str:
    if loader not in LOADERS:
        raise ConfigError(f"unknown AOTInductor loader {loader!r} (from {source}); use one of "
                          f"{', '.join(LOADERS)}")
    return loader


def default_loader(device: str) -> str:
    """"package", or $VITOPT_AOTI_LOADER for CUDA packages."""
    wanted = os.environ.get(LOADER_ENV, "").strip()
    if device != "cuda" or not wanted:
        return "package"
    return check_loader(wanted, f"${LOADER_ENV}")


def open_package(package: Path, loader: str = "package", device: str = "cpu"):
    """A callable (tensor -> output) for the package, opened the way `loader` says."""
    import torch

    check_loader(loader, "loader")
    path = str(package)
    if loader == "package":
        return torch._inductor.aoti_load_package(path)
    if loader == "single-threaded":
        return torch._inductor.aoti_load_package(path, run_single_threaded=True)
    if loader == "device-index":
        return torch._inductor.aoti_load_package(path, device_index=0 if device == "cuda" else -1)
    if loader == "no-workers":
        from torch._inductor.async_compile import shutdown_compile_workers

        shutdown_compile_workers()
        return torch._inductor.aoti_load_package(path)
    if loader == "loader-class":
        return _loader_class(path, device)
    return _so_runner(package, device)


def _loader_class(path: str, device: str):
    """torch._C._aoti.AOTIModelPackageLoader itself, without load_pt2's Python around it."""
    import torch

    try:
        from torch._inductor.package.package import AOTICompiledModel
    except ImportError:  # where it lives differs between torch versions
        from torch.export.pt2_archive._package import AOTICompiledModel
    cls = torch._C._aoti.AOTIModelPackageLoader
    try:
        loader = cls(path, "model", False, 1, 0 if device == "cuda" else -1)
    except TypeError:  # older torch: (path, model_name, run_single_threaded, num_runners)
        loader = cls(path, "model", False, 1)
    return AOTICompiledModel(loader)


def _so_runner(package: Path, device: str):
    """Run the package's wrapper .so with AOTIModelContainerRunner*, bypassing the package
    loader: the archive is extracted to a temporary folder that lives as long as the runner."""
    import torch

    folder = tempfile.mkdtemp(prefix="vitopt-aoti-so-")
    with zipfile.ZipFile(package) as archive:
        archive.extractall(folder)
    libraries = sorted(Path(folder).rglob("*.so"))
    if len(libraries) != 1:
        shutil.rmtree(folder, ignore_errors=True)
        raise ArtifactError(f"{package} holds {len(libraries)} .so files, not one; use another "
                            f"loader")
    library = libraries[0]
    if device == "cuda":
        runner = torch._C._aoti.AOTIModelContainerRunnerCuda(str(library), 1, "cuda",
                                                             str(library.parent))
    else:
        runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(library), 1)

    def run(images):
        return runner.run([images])

    run.runner = runner  # type: ignore[attr-defined]
    weakref.finalize(run, shutil.rmtree, folder, True)
    return run


# --- helpers ---------------------------------------------------------------------------------
def inductor_configs(device: str, tuning: str, threads: Optional[int],
                     options: Optional[Mapping[str, object]]) -> Dict[str, object]:
    """The torch._inductor.config settings a build uses; unknown option names are refused."""
    from torch._inductor import config

    configs: Dict[str, object] = {}
    if device == "cpu":
        configs.update({"cpp.threads": threads} if threads else {"cpp.dynamic_threads": True})
    if tuning == "max-autotune":
        configs["max_autotune"] = True
    known = config.get_config_copy()
    unknown = sorted(str(key) for key in (options or {}) if key not in known)
    if unknown:
        raise ConfigError(f"unknown torch._inductor.config option(s) {', '.join(unknown)} for "
                          f"torch {_torch_version()}; see torch/_inductor/config.py")
    configs.update(options or {})
    return configs


def build_record(device: str, precision: str, max_batch: int, tuning: str,
                 threads: Optional[int], configs: Mapping[str, object], input_shape: List[int],
                 seconds: float) -> dict:
    """What aotinductor.json holds: everything load needs to tell if the package fits."""
    return {"format": RECORD_FORMAT, "device": device, "precision": precision,
            "dtype": DTYPES[precision], "max_batch": max_batch, "input_shape": input_shape,
            "tuning": tuning, "threads": threads, "inductor_configs": dict(configs),
            "torch": _torch_version(), "gpu": gpu_identity() if device == "cuda" else None,
            "cpu_requires": cpu_isa_flags() if device == "cpu" else [],
            "compile_seconds": round(seconds, 2)}


def read_record(path: Path) -> dict:
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read the AOTInductor build record {path}: {exc}; recompile "
                            f"with `vitopt compile`") from exc
    if not isinstance(record, dict) or record.get("device") not in DEVICES or \
            record.get("precision") not in DTYPES:
        raise ArtifactError(f"{path} is not an AOTInductor build record this vitopt reads (it "
                            f"needs device and precision); recompile with `vitopt compile`")
    return record


def check_fits_here(record: dict, package: Path) -> None:
    """BackendUnavailableError unless this machine has the GPU / CPU flags the package needs."""
    if record["device"] == "cuda":
        _check_gpu(record.get("gpu") or {}, package)
    else:
        _check_cpu_flags(record.get("cpu_requires") or [], package)


def _check_gpu(built_for: dict, package: Path) -> None:
    wanted = f"{built_for.get('name', 'an unknown GPU')} (compute capability " \
             f"{built_for.get('capability', '?')})"
    here = gpu_identity()
    if here is None:
        raise BackendUnavailableError(f"{package} was built for CUDA on {wanted}, and this "
                                      f"machine has no CUDA GPU; recompile for the CPU "
                                      f"(--target cpu) or run it on that GPU")
    if here["name"] != built_for.get("name") or here["capability"] != built_for.get("capability"):
        raise BackendUnavailableError(f"{package} was built and tuned for {wanted}; this GPU is "
                                      f"{here['name']} (compute capability {here['capability']}). "
                                      f"Recompile on this GPU with `vitopt compile`.")


def _check_cpu_flags(required: Sequence[str], package: Path) -> None:
    from vitopt.artifact import CPU_FLAGS, hardware_info

    here = hardware_info()
    missing = [flag for flag in required if flag in CPU_FLAGS and flag not in here["flags"]]
    if missing:
        raise BackendUnavailableError(f"{package} has CPU kernels that need {', '.join(required)};"
                                      f" this CPU ({here['cpu']}) lacks {', '.join(missing)}. "
                                      f"Recompile on this machine with `vitopt compile`.")


def _example(example, device: str, dtype):
    """Two images of the example's shape (a batch of 1 would make torch.export specialize it)."""
    import torch

    if not isinstance(example, torch.Tensor) or example.dim() != 4:
        raise ConfigError(f"example must be a 4-d image tensor [B,C,H,W], got "
                          f"{getattr(example, 'shape', type(example).__name__)}")
    return example[:1].expand(2, -1, -1, -1).contiguous().to(device=device, dtype=dtype)


def _batch_of_two(tensor, device: str, dtype):
    """Two rows of a segment input (a batch of 1 would make torch.export specialize it)."""
    return tensor[:1].expand(2, *tensor.shape[1:]).contiguous().to(device=device, dtype=dtype)


def _export(module, inputs: tuple, max_batch: int):
    import torch
    from torch.export import Dim

    batch = Dim("batch", min=1, max=max(2, max_batch))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(module, tuple(inputs),
                                       dynamic_shapes=tuple({0: batch} for _ in inputs))
    except Exception as exc:  # torch.export raises many types; report them as one
        raise LoweringError(f"torch.export could not export the module for AOTInductor with a "
                            f"dynamic batch: {_first_line(exc)}") from exc


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _torch_version() -> str:
    import torch

    return torch.__version__
