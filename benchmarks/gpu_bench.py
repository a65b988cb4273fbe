"""GPU benchmark: torch eager, torch.compile(max-autotune) and vitopt (AOTInductor) on real ViTs.

    python3 benchmarks/gpu_bench.py --out DIR                      # DeiT-S/16, ViT-B/16 on CUDA, fp16
    python3 benchmarks/gpu_bench.py --device cpu --quick --out DIR # same code, tiny ViT, CPU, fp32

Cells are (model, config); configs:
  eager       the plain timm model, .to(precision), eager PyTorch
  compile     torch.compile of the plain model with the max-autotune mode options, bounded by
              COMPILE_BOUNDS (applied only where the installed torch has the knob; the JSON
              lists what was set and what was missing); one static compile per batch size
  vitopt      trace -> run_pipeline("lossless") -> the IR at precision through the aotinductor
              backend (one .pt2, dynamic batch up to the largest batch; --aoti-tuning default
              unless asked), checked against the fp32 IR with vitopt.tolerances.compare
Every cell runs in its own child process with a hard timeout, so a slow compile or a crash
costs that cell only: its time budget is the remaining --budget-s shared by the remaining cells
in proportion to WEIGHTS. Timing: warm-up calls, then >= --runs calls each followed by a device
synchronize (vitopt.timing.measure): median, p10, p90; images/s = batch / median. Inputs stay on
the device for every config; vitopt also reports e2e_median_ms (numpy in, numpy out).
Writes gpu_bench.json (env, settings, one record per (model, config, batch)) and gpu_bench.md.
Exit code: 0 all ok, 1 a cell failed or timed out, 2 a numerics check failed.
"""
from __future__ import annotations

import argparse
import copy
import getpass
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

MODELS = ("deit_small_patch16_224", "vit_base_patch16_224")
QUICK_MODEL = "tiny_vit"  # a small timm ViT at 32x32, for --quick
CONFIGS = ("eager", "compile", "vitopt")
WEIGHTS = {"eager": 1.0, "compile": 3.0, "vitopt": 3.0}  # share of the time budget per cell
MIN_CELL_S = 20.0
#: Inductor settings that bound max-autotune's compile time (on top of the mode's options).
COMPILE_BOUNDS = {
    "coordinate_descent_tuning": False,  # the mode turns it on; it re-tunes every fused kernel
    "max_autotune_gemm_backends": "ATEN,TRITON",  # no CPP/CUTLASS candidates
    "max_autotune_gemm_search_space": "DEFAULT",  # not EXHAUSTIVE
    "precompilation_timeout_seconds": 60,  # give up on slow candidate kernels
}
BACKEND_OF = {"eager": "torch", "compile": "inductor", "vitopt": "aotinductor"}
FIELDS = ("model", "batch", "config", "precision", "backend", "median_ms", "p10_ms", "p90_ms",
          "images_per_s", "compile_s", "max_abs_diff", "cos", "check_ok", "status", "error")


# --- the parent: plan cells, run each in a child with a timeout, write the report -----------
def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.cell:
        return run_cell(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = [(model, config) for model in args.models for config in args.configs]
    report = {"env": environment(args.device), "settings": settings(args), "records": []}
    deadline = time.monotonic() + args.budget_s
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        for index, (model, config) in enumerate(cells):
            timeout = cell_timeout(deadline - time.monotonic(), [c for _, c in cells[index:]],
                                   args.min_cell_s)
            report["records"] += run_child(args, model, config, timeout, Path(tmp), out)
            write_report(report, out)
    print(markdown(report))
    return exit_code(report["records"])


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/gpu-bench", help="folder for gpu_bench.json/.md")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny model, batches 1,3, few runs")
    parser.add_argument("--models", type=_names, help=f"comma list; default {','.join(MODELS)}")
    parser.add_argument("--configs", type=_names, default=list(CONFIGS), help="comma list")
    parser.add_argument("--batches", type=_ints, help="comma list; default 1,64 (quick: 1,3)")
    parser.add_argument("--precision", choices=("fp16", "bf16", "fp32"),
                        help="default fp16 on cuda, fp32 on cpu")
    parser.add_argument("--runs", type=int, help="timed runs per cell (default 30; quick 5)")
    parser.add_argument("--warmup", type=int, help="untimed runs (default 5; quick 2)")
    parser.add_argument("--budget-s", type=float, default=260.0, help="total time for all cells")
    parser.add_argument("--min-cell-s", type=float, default=MIN_CELL_S,
                        help="no cell gets less time than this")
    parser.add_argument("--aoti-tuning", default="default", choices=("default", "max-autotune"))
    parser.add_argument("--compile-mode", default="max-autotune",
                        help="torch.compile mode whose options are used (bounded)")
    parser.add_argument("--cell", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = args.models or ([QUICK_MODEL] if args.quick else list(MODELS))
    args.batches = args.batches or ([1, 3] if args.quick else [1, 64])
    args.precision = args.precision or ("fp16" if args.device == "cuda" else "fp32")
    args.runs = args.runs or (5 if args.quick else 30)
    args.warmup = args.warmup or (2 if args.quick else 5)
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    return args


def _names(text: str) -> List[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ints(text: str) -> List[int]:
    return [int(part) for part in _names(text)]


def cell_timeout(remaining_s: float, configs_left: List[str], minimum: float) -> float:
    """This cell's share of the remaining budget (WEIGHTS), at least `minimum` seconds."""
    share = WEIGHTS[configs_left[0]] / sum(WEIGHTS[c] for c in configs_left)
    return max(minimum, remaining_s * share)


def run_child(args, model: str, config: str, timeout: float, tmp: Path, out: Path) -> List[dict]:
    """Run one cell in a child process group; whatever it finished comes back, the rest fails."""
    result = tmp / f"{model}-{config}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--cell", model, config,
               "--result", str(result)] + child_flags(args)
    started = time.monotonic()
    with open(out / "gpu_bench.log", "a", encoding="utf-8") as log:
        log.write(f"\n=== {model} {config} (timeout {timeout:.0f}s) ===\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code, error = process.wait(timeout=timeout), None
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the child and its compile workers
            process.wait()
            code, error = None, f"timed out after {timeout:.0f}s"
    state = json.loads(result.read_text()) if result.is_file() else {"records": [], "step": "start"}
    if error is None and code != 0:
        error = state.get("error") or f"child exited with code {code} (see gpu_bench.log)"
    print(f"{model} {config}: {time.monotonic() - started:.0f}s"
          + (f", {error} during {state.get('step')}" if error else ""), flush=True)
    return complete(state["records"], args, model, config, error and f"{error} during {state.get('step')}")


def child_flags(args) -> List[str]:
    return ["--device", args.device, "--precision", args.precision,
            "--batches", ",".join(map(str, args.batches)), "--runs", str(args.runs),
            "--warmup", str(args.warmup), "--aoti-tuning", args.aoti_tuning,
            "--compile-mode", args.compile_mode] + (["--quick"] if args.quick else [])


def complete(records: List[dict], args, model: str, config: str, error: Optional[str]) -> List[dict]:
    """One record per batch: those the child wrote, plus failed ones for the batches it did not."""
    done = {r["batch"] for r in records}
    for batch in args.batches:
        if batch not in done:
            records.append(record(model, config, batch, args.precision, status="failed",
                                  error=error or "the child wrote no result for this batch"))
    return sorted(records, key=lambda r: r["batch"])


def record(model: str, config: str, batch: int, precision: str, **fields) -> dict:
    base = dict.fromkeys(FIELDS)
    base.update(model=model, config=config, batch=batch, precision=precision,
                backend=BACKEND_OF[config], status="ok")
    base.update(fields)
    return base


def exit_code(records: List[dict]) -> int:
    if any(r["check_ok"] is False for r in records):
        return 2
    return 1 if any(r["status"] != "ok" for r in records) else 0


# --- environment and report ------------------------------------------------------------------
def environment(device: str) -> dict:
    import torch

    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "triton": _version("triton"), "timm": _version("timm"), "device": device,
           "cpu": _cpu_name(), "cuda": torch.version.cuda,
           "inductor_cache_was_warm": os.path.isdir(cache) and bool(os.listdir(cache))}
    if device == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        env.update(gpu=torch.cuda.get_device_name(0), capability=f"{major}.{minor}",
                   driver=_nvidia_smi("driver_version"))
    return env


def settings(args) -> dict:
    return {"models": args.models, "configs": args.configs, "batches": args.batches,
            "precision": args.precision, "runs": args.runs, "warmup": args.warmup,
            "budget_s": args.budget_s, "min_cell_s": args.min_cell_s, "aoti_tuning": args.aoti_tuning,
            "compile_mode": args.compile_mode, "compile_bounds": COMPILE_BOUNDS,
            "timing": "perf_counter around each call followed by a device synchronize"}


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # missing or broken: the report says None
        return None


def _cpu_name() -> str:
    from vitopt.artifact import hardware_info

    return hardware_info()["cpu"]


def _nvidia_smi(field: str) -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def write_report(report: dict, out: Path) -> None:
    (out / "gpu_bench.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "gpu_bench.md").write_text(markdown(report), encoding="utf-8")


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [f"# GPU bench: {env.get('gpu') or env['cpu']}", "",
             ", ".join(f"{k} {v}" for k, v in env.items() if v is not None), "",
             "| model | batch | config | prec | median ms | p10 | p90 | img/s | vs eager | "
             "compile s | max abs | cos | status |", "|" + "---|" * 13]
    eager = {(r["model"], r["batch"]): r["median_ms"] for r in report["records"]
             if r["config"] == "eager" and r["median_ms"]}
    for r in report["records"]:
        base = eager.get((r["model"], r["batch"]))
        speedup = f"{base / r['median_ms']:.2f}x" if base and r["median_ms"] else ""
        status = r["status"] if r["check_ok"] is not False else "NUMERICS FAILED"
        lines.append(f"| {r['model']} | {r['batch']} | {r['config']} | {r['precision']} | "
                     f"{_num(r['median_ms'])} | {_num(r['p10_ms'])} | {_num(r['p90_ms'])} | "
                     f"{_num(r['images_per_s'], 0)} | {speedup} | {_num(r['compile_s'], 1)} | "
                     f"{_num(r['max_abs_diff'], 4)} | {_num(r['cos'], 5)} | {status} |")
    errors = [f"- {r['model']} {r['config']} b{r['batch']}: {r['error']}"
              for r in report["records"] if r["error"]]
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


def _num(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


# --- the child: one (model, config) cell ------------------------------------------------------
class Cell:
    """One cell's progress, written to --result after every step so a timeout loses little."""

    def __init__(self, args):
        self.args, self.path = args, Path(args.result)
        self.model, self.config = args.cell
        self.state = {"records": [], "step": "start", "error": None}

    def step(self, name: str) -> None:
        print(f"[{self.model} {self.config}] {name}", flush=True)
        self.state["step"] = name
        self.save()

    def add(self, batch: int, **fields) -> None:
        self.state["records"].append(record(self.model, self.config, batch, self.args.precision,
                                            **fields))
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state), encoding="utf-8")
        tmp.replace(self.path)


def run_cell(args) -> int:
    import torch

    cell = Cell(args)
    try:
        torch.manual_seed(0)
        cell.step("creating the model")
        model = create_model(cell.model, args.quick)
        RUNNERS[cell.config](cell, model)
    except Exception as exc:  # recorded for the parent; the traceback goes to the log
        import traceback

        traceback.print_exc()
        cell.state["error"] = f"{type(exc).__name__}: {str(exc).strip()[:500]}"
        cell.save()
        return 1
    return 0


def create_model(name: str, quick: bool):
    import timm

    if name == QUICK_MODEL or quick:
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                 patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                 num_classes=10).eval()
    return timm.create_model(name, pretrained=False).eval()


def images(model_or_size, batch: int, device: str):
    import torch

    size = model_or_size if isinstance(model_or_size, int) else _image_size(model_or_size)
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).to(device)


def _image_size(model) -> int:
    size = model.default_cfg.get("input_size", (3, 224, 224))[-1]
    return int(getattr(getattr(model, "patch_embed", None), "img_size", (size,))[0])


def dtype_of(precision: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def reference(module, x):
    """The fp32 output of `module` on images `x` (fp32), computed on x's device."""
    import torch

    ref = copy.deepcopy(module).float().to(x.device)
    with torch.no_grad():
        return ref(x).float().cpu()


def timed(cell: Cell, fn, device: str):
    from vitopt.timing import measure

    sync = _synchronizer(device)

    def call():
        fn()
        sync()

    return measure(call, warmup=cell.args.warmup, runs=cell.args.runs)


def _synchronizer(device: str):
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def check_fields(output, expected, precision: str, backend: str) -> dict:
    from vitopt.tolerances import compare

    result = compare(output, expected, precision, backend)
    return {"max_abs_diff": result.max_abs, "cos": result.cos_sim, "check_ok": result.ok,
            "check": str(result)}


def timing_fields(timing, batch: int) -> dict:
    return {"median_ms": timing.median_ms, "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms,
            "images_per_s": batch * 1e3 / timing.median_ms, "runs": timing.runs}


def run_eager(cell: Cell, model) -> None:
    import torch

    args = cell.args
    module = copy.deepcopy(model).to(args.device, dtype_of(args.precision))
    for batch in args.batches:
        cell.step(f"eager batch {batch}")
        x32 = images(model, batch, args.device)
        expected, x = reference(model, x32), x32.to(dtype_of(args.precision))
        with torch.no_grad():
            out = module(x)
            timing = timed(cell, lambda: module(x), args.device)
        cell.add(batch, **timing_fields(timing, batch),
                 **check_fields(out, expected, args.precision, "torch"))


def compile_options(mode: str) -> tuple:
    """(options for torch.compile, bounds applied, bounds this torch lacks)."""
    import torch._inductor
    from torch._inductor import config

    options = dict(torch._inductor.list_mode_options(mode))
    known = config.get_config_copy()
    applied = {k: v for k, v in COMPILE_BOUNDS.items() if k in known}
    options.update(applied)
    return options, applied, sorted(set(COMPILE_BOUNDS) - set(applied))


def run_compile(cell: Cell, model) -> None:
    import torch

    args = cell.args
    options, applied, missing = compile_options(args.compile_mode)
    for batch in args.batches:
        cell.step(f"torch.compile batch {batch}")
        torch._dynamo.reset()
        module = copy.deepcopy(model).to(args.device, dtype_of(args.precision))
        compiled = torch.compile(module, options=options, dynamic=False)
        x32 = images(model, batch, args.device)
        expected, x = reference(model, x32), x32.to(dtype_of(args.precision))
        with torch.no_grad():
            started = time.perf_counter()
            out = compiled(x).clone()
            _synchronizer(args.device)()
            compile_s = time.perf_counter() - started
            cell.step(f"timing torch.compile batch {batch}")
            timing = timed(cell, lambda: compiled(x), args.device)
        cell.add(batch, **timing_fields(timing, batch), compile_s=compile_s,
                 options=options, bounds_applied=applied, bounds_missing=missing,
                 **check_fields(out, expected, args.precision, "inductor"))


def run_vitopt(cell: Cell, model) -> None:
    import torch

    from vitopt.backends import get_backend
    from vitopt.frontend.trace import trace
    from vitopt.pipeline import run_pipeline

    args = cell.args
    cell.step("trace + lossless pipeline")
    started = time.perf_counter()
    example = images(model, 2, "cpu")
    result = run_pipeline(trace(model, example), "lossless")
    ir, passes = result.ir, [r.name for r in result.records if r.modified]
    lift_s = time.perf_counter() - started
    backend = get_backend("aotinductor")
    options = compile_options("max-autotune")[1] if args.aoti_tuning == "max-autotune" else None
    with tempfile.TemporaryDirectory(prefix="vitopt-aoti-") as tmp:
        cell.step(f"AOTInductor build ({args.aoti_tuning})")
        started = time.perf_counter()
        files = backend.build_module(ir, example, Path(tmp), precision=args.precision,
                                     max_batch=max(args.batches), device=args.device,
                                     tuning=args.aoti_tuning, options=options)
        build_s = time.perf_counter() - started
        engine = backend.load(Path(tmp), files, precision=args.precision)
        for batch in args.batches:
            cell.step(f"vitopt batch {batch}")
            x32 = images(model, batch, args.device)
            expected, x = reference(ir, x32), x32.to(dtype_of(args.precision))
            host = x32.cpu().numpy()
            out = engine.run(host)
            with torch.no_grad():
                timing = timed(cell, lambda: engine.runner(x), args.device)
            e2e = timed(cell, lambda: engine.run(host), args.device)
            cell.add(batch, **timing_fields(timing, batch), compile_s=build_s, lift_s=lift_s,
                     tuning=args.aoti_tuning, e2e_median_ms=e2e.median_ms,
                     passes=passes,
                     **check_fields(out, expected, args.precision, "aotinductor"))


RUNNERS = {"eager": run_eager, "compile": run_compile, "vitopt": run_vitopt}

if __name__ == "__main__":
    sys.exit(main())
