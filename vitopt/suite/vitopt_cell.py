"""A vitopt cell: the model through the public API, `vitopt.compiler.compile_model` then
`vitopt.runtime.load`, timed through the loaded Runtime (what a user calls).

int8 cells calibrate on `builtin:digits` (its calib split resized to the model's input, the
same images the int8 peers get). The compile's own latency measurement is off (the suite times
every cell itself, interleaved with the peers); its numerics check against the IR stays on.

On cuda the Runtime takes and returns host numpy arrays, so timing it would add two host-device
copies (38.5 MB in at DeiT-S batch 64) that the torch peers, whose inputs already sit on the
GPU, do not pay. So there, as for the peers, the input is put on the GPU once and the engine's
device-side callable is timed (AOTInductor: the package's runner on a torch tensor of the
engine's dtype; TVM: the VM function on a tvm tensor, dynamic-batch libraries only) with a
device synchronise after each call; `how` says which path was timed, and an engine without
such a callable is timed through the Runtime, copies included.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np

from vitopt.suite.matrix import VitoptConfig
from vitopt.suite.models import SuiteModel
from vitopt.suite.peers import Built

CALIB = "builtin:digits"


def artifact_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def build_vitopt(model: SuiteModel, config: VitoptConfig, out: Path, *, device: str,
                 max_batch: int, threads: Optional[int]) -> Built:
    from vitopt.compiler import CompileOptions, compile_model
    from vitopt.runtime import load
    options = CompileOptions(target="cuda" if device == "cuda" else "cpu", backend=config.backend,
                             precision=config.precision, preset=config.preset,
                             passes=config.passes, max_batch=max_batch, threads=threads,
                             calib=CALIB if config.precision == "int8" else None,
                             image_size=model.image_size, measure=False)
    started = time.perf_counter()
    report = compile_model(model.module, out, options)
    runtime = load(out, threads=threads)
    compile_s = time.perf_counter() - started
    manifest = report.manifest
    applied = [p["name"] for p in manifest["passes"] if p["modified"]]
    declined = [p["name"] for p in manifest["passes"] if not p["modified"]]
    how = (f"compile_model(preset={config.preset!r}, passes={list(config.passes)}, "
           f"precision={config.precision!r}) -> runtime.load; applied: {', '.join(applied) or 'none'}"
           + (f"; declined: {', '.join(declined)}" if declined else ""))
    run, to_input = runtime, (lambda array: np.ascontiguousarray(array, dtype=np.float32))
    if device == "cuda":
        path = device_path(runtime.engine)
        if path is None:
            how += ("; timed through the Runtime (host numpy in and out), so its time includes "
                    "the host-device copies the torch peers do not pay")
        else:
            run, to_input, what = path
            how += f"; timed on device-resident inputs: {what}"
    backend = manifest["backend"]
    return Built(run, to_input, f"vitopt/{backend['name']}", manifest["precision"], how,
                 f"{backend['name']} {backend['version']}", artifact_bytes=artifact_bytes(out),
                 compile_s=compile_s,
                 extra={"gflops_per_image": manifest["model"]["gflops_per_image"],
                        "passes_applied": applied, "token_schedule": manifest["token_schedule"]})


def device_path(engine) -> Optional[Tuple[Callable, Callable, str]]:
    """(run, to_input, description) that keep the data on the GPU, or None for this engine."""
    if getattr(engine, "backend", "") == "aotinductor" and hasattr(engine, "runner"):
        import torch

        def to_torch(array: np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(array)).to(engine.device, engine.dtype)

        def run_aoti(x):
            with torch.no_grad():
                out = engine.runner(x)
            torch.cuda.synchronize()
            return out[0] if isinstance(out, (list, tuple)) else out
        return run_aoti, to_torch, (f"the AOTInductor runner on a {engine.dtype} CUDA tensor, "
                                    f"torch.cuda.synchronize() after each call")
    if (getattr(engine, "backend", "") == "tvm" and hasattr(engine, "function")
            and getattr(engine, "plan", {}).get("mode") == "dynamic"):
        import tvm

        def to_tvm(array: np.ndarray):
            return tvm.runtime.tensor(np.ascontiguousarray(array, dtype=np.float32),
                                      engine.device)

        def run_tvm(x):
            out = engine.function(x)
            if not hasattr(out, "numpy"):   # the importer returns a tuple of outputs
                out = out[0]
            engine.device.sync()
            return out
        return run_tvm, to_tvm, ("the TVM VM function on a float32 tvm tensor on the GPU (the "
                                 "fp16 cast is inside the library), device.sync() after each call")
    return None
