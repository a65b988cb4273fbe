"""Shift-add kernel vs TVM fp32 matmul vs TVM int8 matmul on DeiT-S linear shapes, this CPU.

ShiftAddViT (You et al. 2023) measured its shift kernels against a TVM fp32 matmul; this runs
that comparison honestly here, plus an int8 matmul, which is what multiply hardware offers at
the same weight size. All three kernels are TensorIR from te (un-scheduled PrimFuncs), compiled
for this CPU (llvm, host mcpu), each with the same tuning budget:

- `--tune-trials 0` ("default" rows): the SAME hand schedule template and tile parameters for
  all three (kernels/tuning/shiftadd_llvm.json "default": rows x channels tile, vector lanes
  over output channels, reduction outside, parallel outer loop), no search;
- `--tune-trials N` ("tuned N" rows): MetaSchedule on each un-scheduled PrimFunc, N measured
  candidates per kernel per shape, the same search for all three (its own post-order-apply
  design space for this llvm target, evolutionary search, random cost model as in
  vitopt/backends/tvm_tuning.py). Records go to a persistent JSON database (--db, default
  <vitopt cache>/tvm/kernels/<target>/), so a rerun tunes only the trials a kernel still lacks;
  the "new trials" column says how many this run measured, and the tuning seconds are this
  run's. `--tune-trials 0,N` times default and tuned kernels side by side in the same rounds.

The int8 matmul is written as plain int8*int8 -> int32 (no tensorize); whether LLVM emitted
AVX-512 VNNI (vpdpbusd / vpdpwssd) is read from the compiled assembly and recorded per kernel.
The shift-add time includes its per-row activation quantization and rescale; the fp32 and int8
ones are the bare matmul (the int8 input is already quantized): a bias in favour of multiply.
Every tuned kernel's output is checked against its default-schedule output (bit-exact for the
integer kernels and shift-add, fp32 within 1e-4 relative: the reduction order changes).

Shapes (rows = 197 tokens x batch): 197x384x1536 (fc1), 197x1536x384 (fc2), 197x384x1152 (qkv),
batch 1 and 8. Timing: rounds interleave the kernels (each round runs every kernel once, in
turn), >= 10 rounds after warm-up; medians and p10-p90 reported. Run it under the shared lock:

    flock /tmp/vitopt-bench.lock .venv/bin/python benchmarks/shiftadd.py --tune-trials 0,32 --rounds 10
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = [(197, 384, 1536), (197, 1536, 384), (197, 384, 1152)]
KERNELS = ("shift-add", "fp32 matmul", "int8 matmul")
RESULTS = Path(__file__).resolve().parent / "results" / "cpu-amd-epyc-2c"
VNNI_OPS = ("vpdpbusd", "vpdpwssd")  # AVX-512 VNNI dot products (u8*s8 and s16*s16 -> s32)


def log(message: str) -> None:
    print(f"[shiftadd] {message}", flush=True)


def _matmul_func(m, k, n, dtype):
    from tvm import te
    x = te.placeholder((m, k), dtype, name="x")
    w = te.placeholder((k, n), dtype, name="w_t")
    r = te.reduce_axis((0, k), name="r")
    acc = "float32" if dtype == "float32" else "int32"
    out = te.compute((m, n), lambda i, j: te.sum(x[i, r].astype(acc) * w[r, j].astype(acc),
                                                 axis=r), name="acc32")
    return te.create_prim_func([x, w, out])


def unscheduled(name, m, k, n):
    """The un-scheduled PrimFunc of kernel `name` (what both the template and MetaSchedule take)."""
    from vitopt.kernels import shiftadd_tir
    if name == "shift-add":
        return shiftadd_tir.prim_func(m, k, n)
    return _matmul_func(m, k, n, "float32" if name == "fp32 matmul" else "int8")


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
    return sch.mod["main"]


def template_schedule(name, m, k, n, params):
    from vitopt.kernels import shiftadd_tir
    func = unscheduled(name, m, k, n)
    if name == "shift-add":
        return shiftadd_tir.schedule(func, "llvm", params)
    return _schedule_matmul(func, params)


def compile_kernel(func, target):
    """(the compiled function, VNNI instruction count in its assembly)."""
    import tvm
    lib = tvm.compile(tvm.IRModule({"shiftadd": func.with_attr("global_symbol", "shiftadd")}),
                      target=target)
    asm = lib.mod.inspect_source("asm")
    return lib["shiftadd"], sum(asm.count(op) for op in VNNI_OPS)


# --- MetaSchedule --------------------------------------------------------------------------
def tune_kernel(func, target: dict, trials: int, db_dir: Path):
    """Tune `func` in the database at db_dir until it holds `trials` measured candidates;
    return (best scheduled PrimFunc, {"new_trials", "trials_in_db", "tune_seconds"})."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.target import Target

    from vitopt.backends import tvm_tuning
    from vitopt.backends.tvm_speedups import fast_inspect_stack
    tvm_target = Target(target)
    database = tvm_tuning.open_database(db_dir)
    before = _trials_in_db(database, func)
    started = time.perf_counter()
    if before < trials:
        cores = int(target.get("num-cores", 1))
        with fast_inspect_stack(), tempfile.TemporaryDirectory(prefix="vitopt-ms-") as work:
            ms.tir_integration.tune_tir(
                func, tvm_target, work, max_trials_global=trials - before,
                num_trials_per_iter=min(trials - before, 32),
                builder=ms.builder.LocalBuilder(
                    max_workers=cores, timeout_sec=tvm_tuning.BUILD_TIMEOUT_S,
                    initializer=tvm_tuning.load_tensor_intrinsics),
                runner=ms.runner.LocalRunner(timeout_sec=tvm_tuning.RUN_TIMEOUT_S),
                database=database, cost_model=tvm_tuning.COST_MODEL,
                task_scheduler="round-robin", num_tuning_cores=cores, seed=0)
    seconds = time.perf_counter() - started
    after = _trials_in_db(database, func)
    sch = ms.tir_integration.compile_tir(database, func, tvm_target)
    if sch is None:
        raise RuntimeError(f"MetaSchedule found no valid schedule in {trials} trials for this "
                           f"kernel; see the tuning log, or raise --tune-trials")
    return sch.mod["main"], {"new_trials": after - before, "trials_in_db": after,
                             "tune_seconds": round(seconds, 1)}


def _trials_in_db(database, func) -> int:
    from tvm.s_tir.meta_schedule.tir_integration import _normalize_mod
    mod = _normalize_mod(func)
    if not database.has_workload(mod):
        return 0
    return len(database.get_top_k(database.commit_workload(mod), 1 << 30))


# --- inputs, checks, timing ----------------------------------------------------------------
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


def matches(fn, reference, args) -> bool:
    """Does `fn` give `reference`'s output on `args` (bit-exact unless float32 matmul)?"""
    outputs = []
    for f in (fn, reference):
        f(*args)
        outputs.append(args[-1].numpy().copy())
    if outputs[0].dtype == np.float32 and len(args) == 3:  # the fp32 matmul: order may change
        return bool(np.allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-4))
    return bool(np.array_equal(outputs[0], outputs[1]))


def measure(kernels, args, rounds, calls):
    """kernels: {label: (kernel name, fn)}; args: {kernel name: arguments}."""
    for name, fn in kernels.values():  # warm-up
        for _ in range(2):
            fn(*args[name])
    times = {label: [] for label in kernels}
    for _ in range(rounds):
        for label, (name, fn) in kernels.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn(*args[name])
            times[label].append((time.perf_counter() - start) / calls * 1e3)
    return {label: {"median_ms": statistics.median(v),
                    "p10_ms": float(np.percentile(v, 10)), "p90_ms": float(np.percentile(v, 90))}
            for label, v in times.items()}


def run_shape(m, k, n, budgets, params, db_dir, rounds, calls):
    from vitopt.backends import tvm_targets
    from vitopt.kernels import shiftadd_tir
    args = inputs(m, k, n)
    kernels, info = {}, {}
    for name in KERNELS:
        default_fn, default_vnni = compile_kernel(template_schedule(name, m, k, n, params),
                                                  shiftadd_tir.target_for("llvm"))
        for trials in budgets:
            label = (name, "default" if trials == 0 else f"tuned {trials}")
            if trials == 0:
                kernels[label], info[label] = (name, default_fn), {"vnni_ops": default_vnni}
                continue
            target = tvm_targets.llvm_target()
            func, tuning = tune_kernel(unscheduled(name, m, k, n), target, trials, db_dir)
            fn, vnni = compile_kernel(func, target)
            kernels[label] = (name, fn)
            info[label] = {**tuning, "vnni_ops": vnni,
                           "matches_default": matches(fn, default_fn, args[name])}
            log(f"{m}x{k}x{n} {name} {label[1]}: {tuning['new_trials']} new trials in "
                f"{tuning['tune_seconds']} s ({tuning['trials_in_db']} in the database), "
                f"VNNI ops {vnni}, matches the default schedule: "
                f"{info[label]['matches_default']}")
    return measure(kernels, args, rounds, calls), info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=3, help="calls per kernel per round")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--tune-trials", default="0",
                        help="comma list of MetaSchedule budgets per kernel and shape (0: the "
                             "hand template, no search), e.g. 0,32")
    parser.add_argument("--db", default=None, help="tuning database folder (default: "
                        "<vitopt cache>/tvm/kernels)")
    parser.add_argument("--out", default=str(RESULTS / "shiftadd"))
    args = parser.parse_args(argv)
    if args.rounds < 10:
        parser.error("--rounds must be >= 10 (medians of at least 10)")
    try:
        budgets = sorted({int(t) for t in args.tune_trials.split(",")})
    except ValueError:
        parser.error(f"--tune-trials must be a comma list of integers, got {args.tune_trials!r}")
    if budgets[0] < 0:
        parser.error(f"--tune-trials must be >= 0, got {budgets[0]}")
    from vitopt.backends import tvm_targets, tvm_tuning
    os.environ.setdefault("TVM_NUM_THREADS", str(tvm_targets.usable_cores()))  # TVM alone: 1
    from vitopt.kernels.shiftadd_tir import load_tuning
    params = load_tuning("llvm")
    db_dir = None
    if budgets[-1] > 0:
        db_dir = tvm_tuning.database_dir(tvm_targets.llvm_target(),
                                         args.db or str(tvm_tuning.cache_root() / "kernels"))
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for tokens, k, n in SHAPES:
            m = tokens * batch
            result, info = run_shape(m, k, n, budgets, params, db_dir, args.rounds, args.calls)
            for (name, tuning), r in result.items():
                base = result[("fp32 matmul", tuning)]["median_ms"]
                rows.append({"batch": batch, "shape": f"{m}x{k}x{n}", "kernel": name,
                             "schedule": tuning, **r, "vs_fp32": round(base / r["median_ms"], 3),
                             **info[(name, tuning)]})
                print(f"batch {batch} {m}x{k}x{n} {name:12s} {tuning:9s} {r['median_ms']:8.3f} ms "
                      f"(p10 {r['p10_ms']:.3f} p90 {r['p90_ms']:.3f})  speed vs fp32 "
                      f"{base / r['median_ms']:.2f}x", flush=True)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "tvm_threads": os.environ.get("TVM_NUM_THREADS", "default"),
            "load_average": os.getloadavg()[0], "rounds": args.rounds, "calls": args.calls,
            "tune_trials": budgets, "template": params, "database": str(db_dir),
            "search": "MetaSchedule post-order-apply space, evolutionary search, cost model "
                      f"{tvm_tuning.COST_MODEL}", "note": "contended shared 2-core machine"}
    write(Path(args.out), rows, meta)
    return 0


def write(out: Path, rows, meta) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    def cell(r, key, fmt="{}"):
        return fmt.format(r[key]) if key in r else "-"

    lines = ["| batch | shape (MxKxN) | kernel | schedule | median ms | p10-p90 ms | speed vs fp32 "
             "(same schedule kind) | new trials | tuning s | VNNI ops | matches default |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['shape']} | {r['kernel']} | {r['schedule']} | "
              f"{r['median_ms']:.3f} | {r['p10_ms']:.3f}-{r['p90_ms']:.3f} | {r['vs_fp32']:.2f}x | "
              f"{cell(r, 'new_trials')} | {cell(r, 'tune_seconds')} | {r['vnni_ops']} | "
              f"{cell(r, 'matches_default')} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + f"\n\n{json.dumps(meta)}\n")


if __name__ == "__main__":
    raise SystemExit(main())
