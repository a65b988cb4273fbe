"""Whole-model DeiT-S/16 224 on TVM against its peers, measured side by side in one run.

CPU (default): TVM llvm with default schedules (--tune-trials 0) and MetaSchedule-tuned
(--tune-trials N, the persistent database of vitopt/backends/tvm_tuning.py) vs ONNX Runtime
fp32 and OpenVINO fp32 / bf16 (bf16 where the CPU has it), batch 1 and 8.
CUDA (--device cuda, on a GPU machine): TVM CUDA fp16 (dlight default schedules, or tuned) vs
torch eager fp16 of the same IR, batch 1 and 64. Both sides take float32 numpy images and
return float32 numpy (host->device copy, run, device->host copy), so they do the same work.

Every engine's output is compared with the fp32 IR under vitopt/tolerances.py and recorded.
Timings: vitopt.timing.measure_interleaved (rounds alternate between engines), median of
runs x rounds >= 10 calls per cell. Random init (pretrained=False): speed does not depend on
the weights. Run timing benchmarks under the shared lock:

    flock /tmp/vitopt-bench.lock .venv/bin/python benchmarks/tvm_models.py --tune-trials 0,64
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


def cpu_engines(ir, tmp: Path, trials, max_batch: int, tuning_db):
    from vitopt.backends import get_backend

    engines, info = {}, {}
    for count in trials:
        name = f"tvm llvm {'default' if count == 0 else f'tuned {count}'}"
        engines[name], record = tvm_engine(ir, tmp, f"tvm-{count}", precision="fp32",
                                           max_batch=max_batch, tune_trials=count,
                                           tuning_db=tuning_db)
        info[name] = {"tuning": record["tuning"], "target": record["target"],
                      "compile_seconds": record["compile_seconds"]}
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
            info[name] = {"tuning": record["tuning"], "target": record["target"],
                          "gpu": record.get("gpu"), "compile_seconds": record["compile_seconds"]}
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
    builds = "\n".join(f"- {name}: {json.dumps(b['tuning'])}, compile {b['compile_seconds']} s"
                       for name, b in result["builds"].items())
    return (f"# {result['model']} on TVM ({result['device']}) vs peers\n\n"
            f"Machine: {machine['cpu']}, {machine['cores_available']} cores, torch threads "
            f"{machine['torch_threads']}; versions {json.dumps(machine['versions'])}; "
            f"{machine['date']}. Shared, contended machine: medians of interleaved rounds.\n\n"
            f"{table}\nBuilds:\n{builds}\n")


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
    parser.add_argument("--runs", type=int, default=5, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None, help="output folder (default: results/<machine>)")
    args = parser.parse_args(argv)
    args.batches = args.batches or ("1,64" if args.device == "cuda" else "1,8")
    if args.runs * args.rounds < 10:
        parser.error("runs x rounds must be at least 10 (median of >= 10 calls per cell)")
    machine = machine_info()
    out = Path(args.out) if args.out else machine_dir()
    out.mkdir(parents=True, exist_ok=True)
    stem = "tvm_models" if args.device == "cpu" else "tvm_models_cuda"

    def save(result: dict) -> None:
        (out / f"{stem}.json").write_text(json.dumps({"machine": machine, **result}, indent=2) + "\n")
        (out / f"{stem}.md").write_text(markdown(result, machine))

    result = run(args, save)
    save(result)
    print(markdown(result, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
