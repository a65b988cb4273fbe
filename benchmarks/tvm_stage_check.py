"""The TVM stage lowering's CUDA plan on a real model, checked on this CPU: DeiT-S `balanced`.

What a `--target cuda` TVM build of a token-merged model lowers (vitopt/backends/
tvm_stage_import.py: stage functions with symbolic token counts, merges per parity, a symbolic
batch, tvm_rewrites.py), built in fp32 for llvm without schedules (TVM's CPU default schedules
are not written for two symbolic dimensions, and the CPU backend never builds a symbolic batch),
then run at batch 1 and 3 against the IR. fp16, dlight and NVRTC are the GPU's part: the
gpu-marked test_cuda_fp16_stage_functions_on_gpu_match_ir checks those on a GPU.

    python benchmarks/tvm_stage_check.py            # about 3 minutes on two cores

Writes tvm_stage_check.json under --out (default: benchmarks/results/<machine>/).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_dir, machine_info  # noqa: E402
from tvm_build_time import merged_ir  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--preset", default="balanced")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import tvm
    from tvm import relax

    from vitopt.backends import tvm as tvm_backend

    ir = merged_ir(args.model, args.preset)
    started = time.perf_counter()
    mod, summary = tvm_backend.import_stages(
        ir, torch.randn(2, 3, 224, 224), {"batch": None}, 8,
        transform=lambda m: tvm_backend.after_import(m, "fp32", dynamic_batch=True))
    target = tvm.target.Target({"kind": "llvm"})
    backend = tvm_backend._backend_pipeline({"kind": "llvm"})
    lower = tvm.transform.Sequential(backend.dataflow_lower_passes(target) +
                                     backend.finalize_passes(target))
    with tvm_backend.fast_inspect_stack(), target, tvm.transform.PassContext(opt_level=3):
        mod = tvm_backend.prepare(mod, {"kind": "llvm"})
        executable = tvm.compile(mod, target=target, relax_pipeline=lower)
    build_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        executable.export_library(str(Path(tmp) / "model.so"))
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(Path(tmp) / "model.so")), tvm.cpu())
        checks = []
        for batch in (1, 3):
            images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
            got = vm["main"](tvm.runtime.tensor(images.numpy()))[0].numpy()
            with torch.no_grad():
                expected = ir(images).numpy()
            checks.append({"batch": batch, "max_abs_diff": float(np.abs(got - expected).max()),
                           "max_abs_output": float(np.abs(expected).max())})
            print(f"batch {batch}: max abs difference {checks[-1]['max_abs_diff']:.2e} "
                  f"(outputs up to {checks[-1]['max_abs_output']:.2f})")
    out = args.out or machine_dir()
    record = {"check": "tvm_stage_check", "machine": machine_info(), "model": args.model,
              "preset": args.preset, "plan": "symbolic batch (CUDA), fp32, llvm unscheduled",
              "build_s": round(build_s, 1), "stage_import": summary, "checks": checks,
              "ok": all(c["max_abs_diff"] <= 1e-4 * max(1.0, c["max_abs_output"]) for c in checks)}
    (out / "tvm_stage_check.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
