"""A vitopt cell: the model through the public API, `vitopt.compiler.compile_model` then
`vitopt.runtime.load`, timed through the loaded Runtime (what a user calls).

int8 cells calibrate on `builtin:digits` (its calib split resized to the model's input, the
same images the int8 peers get). The compile's own latency measurement is off (the suite times
every cell itself, interleaved with the peers); its numerics check against the IR stays on.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

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
    if device == "cuda":
        how += ("; timed through the Runtime, which takes and returns host numpy arrays, so its "
                "time includes the host-device copies the torch peers do not pay")
    backend = manifest["backend"]
    return Built(runtime, lambda array: np.ascontiguousarray(array, dtype=np.float32),
                 f"vitopt/{backend['name']}", manifest["precision"], how,
                 f"{backend['name']} {backend['version']}", artifact_bytes=artifact_bytes(out),
                 compile_s=compile_s,
                 extra={"gflops_per_image": manifest["model"]["gflops_per_image"],
                        "passes_applied": applied, "token_schedule": manifest["token_schedule"]})
