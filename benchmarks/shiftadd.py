"""Shift-add kernel vs TVM fp32 matmul vs TVM int8 matmul on DeiT-S linear shapes, this CPU.

ShiftAddViT (You et al. 2023) measured its shift kernels against a TVM fp32 matmul; this runs
that comparison honestly here, plus an int8 matmul, which is what multiply hardware offers at
the same weight size. All three kernels are TensorIR from te, compiled for this CPU (llvm,
host mcpu) with the SAME schedule template and the same tile parameters
(kernels/tuning/shiftadd_llvm.json "default": rows x channels tile, vector lanes over output
channels, reduction outside, parallel outer loop) and no search: the tuning budget is equal
(zero MetaSchedule trials) for all three. The int8 matmul is written as plain int8*int8 ->
int32 (LLVM may or may not pick VNNI instructions; no tensorize). The shift-add time includes
its per-row activation quantization and rescale; the fp32 and int8 ones are the bare matmul
(the int8 input is already quantized): a bias in favour of multiply.

Shapes (rows = 197 tokens x batch): 197x384x1536 (fc1), 197x1536x384 (fc2), 197x384x1152 (qkv),
batch 1 and 8. Timing: rounds interleave the kernels (each round runs every kernel once, in
turn), >= 10 rounds after warm-up; medians and p10-p90 reported. Run it under the shared lock:

    flock /tmp/vitopt-bench.lock .venv/bin/python benchmarks/shiftadd.py --rounds 15
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

SHAPES = [(197, 384, 1536), (197, 1536, 384), (197, 384, 1152)]
RESULTS = Path(__file__).resolve().parent / "results" / "cpu-amd-epyc-2c"


def _matmul_func(m, k, n, dtype):
    from tvm import te
    x = te.placeholder((m, k), dtype, name="x")
    w = te.placeholder((k, n), dtype, name="w_t")
    r = te.reduce_axis((0, k), name="r")
    acc = "float32" if dtype == "float32" else "int32"
    out = te.compute((m, n), lambda i, j: te.sum(x[i, r].astype(acc) * w[r, j].astype(acc),
                                                 axis=r), name="acc32")
    return te.create_prim_func([x, w, out])


def _schedule_matmul(func, p):
    from tvm import s_tir
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("acc32")
    m, n, r = sch.get_loops(block)
    mo, mi = sch.split(m, [None, p["tile_m"]])
    no, ni, nv = sch.split(n, [None, p["tile_n"] // p["vector"], p["vector"]])
    sch.reorder(mo, no, r, mi, ni, nv)
    sch.parallel(sch.fuse(mo, no))
    sch.vectorize(nv)
    sch.unroll(mi)
    sch.decompose_reduction(block, r)
    return sch.mod["main"].with_attr("global_symbol", "shiftadd")


def build_all(m, k, n, params):
    import tvm

    from vitopt.kernels import shiftadd_tir
    target = shiftadd_tir.target_for("llvm")
    libs = {"shift-add": shiftadd_tir.build(m, k, n, params=params).lib}
    for name, dtype in (("fp32 matmul", "float32"), ("int8 matmul", "int8")):
        func = _schedule_matmul(_matmul_func(m, k, n, dtype), params)
        libs[name] = tvm.compile(tvm.IRModule({"shiftadd": func}), target=target)
    return {name: lib["shiftadd"] for name, lib in libs.items()}  # look each function up once


def inputs(m, k, n):
    import torch
    import tvm

    from vitopt.ir.shift import encode_weight
    rng = np.random.default_rng(0)
    dev = tvm.cpu()
    x = rng.standard_normal((m, k)).astype(np.float32)
    codes, scale = encode_weight(torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32)
                                                  * 0.02), 6)
    t = tvm.runtime.tensor
    return {
        "shift-add": [t(x, dev), t(np.ascontiguousarray(codes.numpy().T), dev), t(scale.numpy(), dev),
                      t(np.empty((m, n), np.float32), dev)],
        "fp32 matmul": [t(x, dev), t(rng.standard_normal((k, n)).astype(np.float32), dev),
                        t(np.empty((m, n), np.float32), dev)],
        "int8 matmul": [t(rng.integers(-127, 128, (m, k)).astype(np.int8), dev),
                        t(rng.integers(-127, 128, (k, n)).astype(np.int8), dev),
                        t(np.empty((m, n), np.int32), dev)],
    }


def measure(kernels, args, rounds, calls):
    for name, fn in kernels.items():  # warm-up
        for _ in range(2):
            fn(*args[name])
    times = {name: [] for name in kernels}
    for _ in range(rounds):
        for name, fn in kernels.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn(*args[name])
            times[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: {"median_ms": statistics.median(v),
                   "p10_ms": float(np.percentile(v, 10)), "p90_ms": float(np.percentile(v, 90))}
            for name, v in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=3, help="calls per kernel per round")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--out", default=str(RESULTS / "shiftadd"))
    args = parser.parse_args(argv)
    if args.rounds < 10:
        parser.error("--rounds must be >= 10 (medians of at least 10)")
    from vitopt.kernels.shiftadd_tir import load_tuning
    params = load_tuning("llvm")
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for tokens, k, n in SHAPES:
            m = tokens * batch
            kernels = build_all(m, k, n, params)
            result = measure(kernels, inputs(m, k, n), args.rounds, args.calls)
            base = result["fp32 matmul"]["median_ms"]
            for name, r in result.items():
                rows.append({"batch": batch, "shape": f"{m}x{k}x{n}", "kernel": name, **r,
                             "vs_fp32": round(base / r["median_ms"], 3)})
                print(f"batch {batch} {m}x{k}x{n} {name:12s} {r['median_ms']:8.3f} ms "
                      f"(p10 {r['p10_ms']:.3f} p90 {r['p90_ms']:.3f})  speed vs fp32 "
                      f"{base / r['median_ms']:.2f}x", flush=True)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "tvm_threads": os.environ.get("TVM_NUM_THREADS", "default"),
            "load_average": os.getloadavg()[0], "rounds": args.rounds, "calls": args.calls,
            "schedule": params, "note": "contended shared 2-core machine"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| batch | shape (MxKxN) | kernel | median ms | p10-p90 ms | speed vs fp32 |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['shape']} | {r['kernel']} | {r['median_ms']:.3f} | "
              f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f} | {r['vs_fp32']:.2f}x |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + f"\n\n{json.dumps(meta)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
