"""Whole-model DeiT-S/16 224 on TVM against its peers, measured side by side in one run.

CPU (default): TVM llvm with default schedules (--tune-trials 0) and MetaSchedule-tuned
(--tune-trials N, the persistent database of vitopt/backends/tvm_tuning.py) vs ONNX Runtime
fp32 and OpenVINO fp32 / bf16 (bf16 where the CPU has it), batch 1 and 8. Each TVM build
records its tuning (tasks tuned now / reused from the database / left untuned, trials measured
now, tuning seconds) and its compile time with and without the tuning: run the same command
twice and the second build tunes nothing (0 new trials) and only compiles. With a tuned build,
--task-profile (default on) times every fused TIR function of the batch-1 module alone
(time_evaluator, the schedule the build used: the database's best for the tuned GEMM-like
tasks, TVM's default for the rest) x its calls per image (MetaSchedule's task weight), which
shows which tasks dominate; their sum leaves out the VM's overhead.
CUDA (--device cuda, on a GPU machine): TVM CUDA fp16 (dlight default schedules, or tuned) vs
torch eager fp16 of the same IR, batch 1 and 64. Both sides take float32 numpy images and
return float32 numpy (host->device copy, run, device->host copy), so they do the same work.

Every engine's output is compared with the fp32 IR under vitopt/tolerances.py and recorded.
Timings: vitopt.timing.measure_interleaved (rounds alternate between engines), median of
runs x rounds >= 10 calls per cell. Random init (pretrained=False): speed does not depend on
the weights. Run timing benchmarks under the shared lock:

    flock /tmp/vitopt-bench.lock .venv/bin/python benchmarks/tvm_models.py --batches 1 --tune-trials 0,640
    flock /tmp/vitopt-bench.lock .venv/bin/python benchmarks/tvm_models.py --batches 1 --tune-trials 640 \
        --stem tvm_models.rerun    # the same model again: reuses the database, 0 new trials
    python benchmarks/tvm_models.py --device cuda --batches 1,64 --out $OUT/tvm   # on the GPU

Writes tvm_models.json and tvm_models.md under --out (default: benchmarks/results/<machine>/).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_dir, machine_info, markdown_table  # noqa: E402


def log(message: str) -> None:
    print(f"[tvm_models] {message}", file=sys.stderr, flush=True)


def deit_ir(model_name: str):
    import timm

    from vitopt.frontend.trace import trace

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    return trace(model, torch.randn(2, 3, 224, 224))


def tvm_engine(ir, tmp: Path, name: str, **build):
    from vitopt.backends import get_backend

    backend = get_backend("tvm")
    out = tmp / name
    started = time.perf_counter()
    files = backend.build_module(ir, torch.randn(2, 3, 224, 224), out, log=log, **build)
    record = json.loads((out / "tvm.json").read_text())
    log(f"{name}: built in {time.perf_counter() - started:.1f}s")
    return backend.load(out, files, precision=build["precision"]), record


def onnx_engine(ir, tmp: Path, backend_name: str, precision: str, max_batch: int):
    from vitopt.backends import get_backend
    from vitopt.lower.onnx_export import export_onnx

    onnx_path = tmp / "model.onnx"
    if not onnx_path.exists():
        export_onnx(ir, torch.randn(2, 3, 224, 224), onnx_path)
    backend = get_backend(backend_name)
    out = tmp / f"{backend_name}-{precision}"
    files = backend.build(onnx_path, out, precision=precision, max_batch=max_batch)
    return backend.load(out, files, precision=precision)


def build_info(record: dict) -> dict:
    """The build's tuning record, and its compile time with and without the tuning."""
    tuning = record["tuning"]
    return {"tuning": tuning, "target": record["target"],
            "compile_seconds": record["compile_seconds"],
            "tuning_seconds": tuning.get("seconds", 0.0),
            "compile_seconds_without_tuning": round(record["compile_seconds"]
                                                    - tuning.get("seconds", 0.0), 2)}


def task_profile(ir, tuning_db, size: int = 224) -> list:
    """Every fused TIR function of the batch-1 CPU module (what tune_module extracts tasks from),
    compiled alone with the schedule a tuned build gives it (the database's best record, else
    TVM's default) and timed with time_evaluator (median of 5 repeats, >= 20 ms each), times
    its calls per image (MetaSchedule's task weight). Inputs: random floats, zero integers."""
    import tvm
    from tvm.target import Target

    from vitopt.backends import tvm as tvm_backend
    from vitopt.backends import tvm_tuning
    from vitopt.backends.tvm_speedups import fast_inspect_stack

    target = tvm_backend.TVMBackend.target_for("cpu")
    tvm_target = Target(target)
    database = tvm_tuning.open_database(tvm_tuning.database_dir(target, tuning_db))
    rows = []
    with fast_inspect_stack():
        mod = tvm_backend.import_module(ir, torch.randn(2, 3, size, size),
                                        tvm_backend.batch_plan("cpu", 1, True), 1)
        tasks = tvm_tuning.extract_tasks(tvm_backend.prepare(mod, target), target)
        for task in tasks:
            func_mod = task.dispatched[0]
            sch = database.query_schedule(func_mod, tvm_target, workload_name=task.task_name)
            func = (sch.mod if sch is not None else func_mod)["main"]
            with tvm_target, tvm.transform.PassContext(opt_level=3):
                lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                                  target=tvm_target)
            ms = _time_alone(lib, func)
            rows.append({"task": task.task_name, "weight": int(task.weight),
                         "schedule": "tuned" if sch is not None else "TVM default",
                         "ms_per_call": ms, "ms_per_image": ms * int(task.weight)})
            log(f"task {task.task_name} x{int(task.weight)} ({rows[-1]['schedule']}): {ms:.3f} ms")
    total = sum(r["ms_per_image"] for r in rows)
    for r in rows:
        r["share"] = r["ms_per_image"] / total
    return sorted(rows, key=lambda r: -r["ms_per_image"])


def _time_alone(lib, func) -> float:
    import tvm
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    device = tvm.cpu()
    rng = np.random.default_rng(0)
    args = []
    for info in ArgInfo.from_prim_func(func):  # what MetaSchedule's runner feeds a task
        shape, dtype = [int(d) for d in info.shape], str(info.dtype)
        value = (rng.standard_normal(shape).astype(dtype) if dtype.startswith("float")
                 else np.zeros(shape, dtype))
        args.append(tvm.runtime.tensor(value, device))
    timer = lib.mod.time_evaluator("main", device, number=1, repeat=5, min_repeat_ms=20)
    return float(np.median(timer(*args).results)) * 1e3


def cpu_engines(ir, tmp: Path, trials, max_batch: int, tuning_db):
    from vitopt.backends import get_backend

    engines, info = {}, {}
    for count in trials:
        name = f"tvm llvm {'default' if count == 0 else f'tuned {count}'}"
        engines[name], record = tvm_engine(ir, tmp, f"tvm-{count}", precision="fp32",
                                           max_batch=max_batch, tune_trials=count,
                                           tuning_db=tuning_db)
        info[name] = build_info(record)
    engines["onnxruntime fp32"] = onnx_engine(ir, tmp, "onnxruntime", "fp32", max_batch)
    engines["openvino fp32"] = onnx_engine(ir, tmp, "openvino", "fp32", max_batch)
    if get_backend("openvino").supports("bf16")[0]:
        engines["openvino bf16"] = onnx_engine(ir, tmp, "openvino", "bf16", max_batch)
    return {name: (engine.run, engine.precision, None) for name, engine in engines.items()}, info


def cuda_engines(irs: dict, tmp: Path, trials, max_batch: int, tuning_db):
    """TVM CUDA fp16 per (preset, trials) and torch eager fp16 of the unreduced IR."""
    engines, info = {}, {}
    for preset, ir in irs.items():
        for count in trials:
            name = f"tvm cuda fp16 {'dlight' if count == 0 else f'tuned {count}'} {preset}"
            engine, record = tvm_engine(ir, tmp, f"tvm-cuda-{count}-{preset}", precision="fp16",
                                        max_batch=max_batch, device="cuda", tune_trials=count,
                                        tuning_db=tuning_db)
            engines[name] = (engine.run, "fp16", preset)
            info[name] = {**build_info(record), "gpu": record.get("gpu")}
    base = next(iter(irs))
    module = copy.deepcopy(irs[base]).half().cuda().eval()

    def eager(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = module(torch.from_numpy(images).cuda().half())
        return out.float().cpu().numpy()

    engines["torch eager fp16"] = (eager, "fp16", base)
    return engines, info


def run(args, save=lambda result: None) -> dict:
    """Build and time. On CUDA one preset at a time (its TVM engine(s) beside torch eager fp16),
    calling save(result) after each, so a run cut short keeps what it measured."""
    ir = deit_ir(args.model)
    presets = [p for p in args.presets.split(",") if p]
    batches = [int(b) for b in args.batches.split(",")]
    trials = [int(t) for t in args.tune_trials.split(",")]
    result = {"model": args.model, "device": args.device, "records": [], "builds": {}}
    with tempfile.TemporaryDirectory(prefix="vitopt-tvm-bench-") as tmp:
        tmp = Path(tmp)
        if args.device == "cpu":
            engines, info = cpu_engines(ir, tmp, trials, max(batches), args.tuning_db)
            result["builds"].update(info)
            time_engines(engines, {None: ir}, batches, args, result)
            if max(trials) > 0 and args.task_profile:
                result["task_profile"] = task_profile(ir, args.tuning_db)
            return result
        from vitopt.pipeline import run_pipeline
        for preset in presets:
            irs = {preset: run_pipeline(ir, preset).ir}
            engines, info = cuda_engines(irs, tmp, trials, max(batches), args.tuning_db)
            result["builds"].update(info)
            time_engines(engines, irs, batches, args, result)
            save(result)
    return result


def time_engines(engines: dict, irs: dict, batches, args, result: dict) -> None:
    """Check every engine against its IR's fp32 output, then time them interleaved per batch."""
    from vitopt.timing import measure_interleaved
    from vitopt.tolerances import compare

    for batch in batches:
        images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        array = np.ascontiguousarray(images.numpy())
        with torch.no_grad():
            expected = {key: copy.deepcopy(reference).float().cpu()(images).numpy()
                        for key, reference in irs.items()}
        checks = {name: compare(fn(array), expected[key], precision,
                                "tvm" if "tvm" in name else name.split()[0])
                  for name, (fn, precision, key) in engines.items()}
        timings = measure_interleaved({name: (lambda fn=fn: fn(array))
                                       for name, (fn, _, _) in engines.items()},
                                      warmup=2, runs=args.runs, rounds=args.rounds)
        for name, timing in timings.items():
            result["records"].append({
                "engine": name, "batch": batch, "median_ms": timing.median_ms,
                "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms,
                "images_per_s": batch * 1e3 / timing.median_ms, "calls": timing.runs,
                "matches_ir": checks[name].ok, "max_abs": checks[name].max_abs,
                "cosine": checks[name].cos_sim, "preset": engines[name][2]})
            log(f"batch {batch} {name}: {timing}; vs IR {checks[name]}")


def markdown(result: dict, machine: dict) -> str:
    rows = []
    for batch in sorted({r["batch"] for r in result["records"]}):
        cell = [r for r in result["records"] if r["batch"] == batch]
        best_peer = min(r["median_ms"] for r in cell if not r["engine"].startswith("tvm"))
        for r in cell:
            rows.append({**r, "spread": f"{r['p10_ms']:.1f}-{r['p90_ms']:.1f}",
                         "vs_best_peer": r["median_ms"] / best_peer,
                         "ok": "yes" if r["matches_ir"] else "NO"})
    table = markdown_table(rows, [("batch", "batch", "{}"), ("engine", "engine", "{}"),
                                  ("median_ms", "median ms", "{:.1f}"), ("spread", "p10-p90", "{}"),
                                  ("vs_best_peer", "time / best non-TVM", "{:.2f}x"),
                                  ("ok", "matches IR", "{}"), ("cosine", "cosine", "{:.6f}")])
    builds = markdown_table(
        [{"engine": name, **b, **b["tuning"], "new_trials": b["tuning"].get("trials_run", 0)}
         for name, b in result["builds"].items()],
        [("engine", "build", "{}"), ("trials", "trial budget", "{}"),
         ("new_tasks", "tasks tuned now", "{}"), ("reused_tasks", "tasks reused from database", "{}"),
         ("untuned_tasks", "tasks untuned", "{}"), ("new_trials", "trials measured now", "{}"),
         ("tuning_seconds", "tuning s", "{:.1f}"), ("compile_seconds", "build s (all)", "{:.1f}"),
         ("compile_seconds_without_tuning", "build s without tuning", "{:.1f}")])
    builds += "".join(f"\nDatabase ({name}): {b['tuning']['database']}\n"
                      for name, b in result["builds"].items() if b["tuning"].get("database"))
    profile = ""
    if result.get("task_profile"):
        tasks = result["task_profile"]
        profile = ("\nFused TIR functions of the tuned batch-1 module, each timed alone "
                   "(--task-profile), heaviest first; sum "
                   f"{sum(r['ms_per_image'] for r in tasks):.1f} ms per image:\n\n"
                   + markdown_table([{**r, "share": 100 * r["share"]} for r in tasks],
                                    [("task", "function", "{}"), ("schedule", "schedule", "{}"),
                                     ("weight", "calls per image", "{}"),
                                     ("ms_per_call", "ms per call", "{:.3f}"),
                                     ("ms_per_image", "ms per image", "{:.2f}"),
                                     ("share", "share %", "{:.1f}")]))
    return (f"# {result['model']} on TVM ({result['device']}) vs peers\n\n"
            f"Machine: {machine['cpu']}, {machine['cores_available']} cores, torch threads "
            f"{machine['torch_threads']}; versions {json.dumps(machine['versions'])}; "
            f"{machine['date']}. Shared, contended machine: medians of interleaved rounds.\n\n"
            f"{table}\nBuilds:\n\n{builds}{profile}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batches", default=None, help="comma list (default 1,8; cuda 1,64)")
    parser.add_argument("--tune-trials", default="0", help="comma list of TVM budgets (0: untuned)")
    parser.add_argument("--tuning-db", default=None, help="tuning database folder")
    parser.add_argument("--presets", default="none,balanced",
                        help="cuda: comma list of vitopt presets, one TVM engine each (the first "
                             "is also run in torch eager fp16)")
    parser.add_argument("--task-profile", action=argparse.BooleanOptionalAction, default=True,
                        help="cpu, with a tuned build: time every fused function alone")
    parser.add_argument("--runs", type=int, default=5, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None, help="output folder (default: results/<machine>)")
    parser.add_argument("--stem", default=None, help="output file name without suffix (default: "
                        "tvm_models, cuda: tvm_models_cuda)")
    args = parser.parse_args(argv)
    args.batches = args.batches or ("1,64" if args.device == "cuda" else "1,8")
    if args.runs * args.rounds < 10:
        parser.error("runs x rounds must be at least 10 (median of >= 10 calls per cell)")
    machine = machine_info()
    out = Path(args.out) if args.out else machine_dir()
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("tvm_models" if args.device == "cpu" else "tvm_models_cuda")

    def save(result: dict) -> None:
        (out / f"{stem}.json").write_text(json.dumps({"machine": machine, **result}, indent=2) + "\n")
        (out / f"{stem}.md").write_text(markdown(result, machine))

    result = run(args, save)
    save(result)
    print(markdown(result, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
