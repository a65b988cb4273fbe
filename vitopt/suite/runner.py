"""Run a matrix: per model, build every cell, check it, measure accuracy on the proxy, then time
all cells of that model at each batch in interleaved rounds (vitopt.timing.measure_interleaved),
so machine drift hits every cell alike. One record per cell and batch.

Method, recorded with the results:
  latency      warm-up calls, then `runs` timed calls per round x `rounds` rounds; median, p10,
               p90 and min of all samples (ms per call, whole batch)
  throughput   batch / median latency (images/s)
  memory       RSS delta: resident set size (/proc/self/statm) after building the cell and one
               call at the largest batch, minus before building it. Freed memory of earlier cells
               can be reused, so it is a lower bound on what the cell needs
  compile      seconds from the model to a runnable engine (export/convert/quantize/compile;
               torch.compile: the first call)
  size         bytes of the files the engine runs from (none for torch eager/compile)
  numerics     cosine and max abs difference to eager fp32 on the first batch of digits test
               images (resized and normalised for the model)
  accuracy     top-1 on the digits proxy's held-out test split (360 images), proxy only
  FLOPs        vitopt's EncoderIR.flops() per image: of the model for peers, after the passes
               for vitopt cells
A cell that fails to build or run is recorded with status "error" and the message.

Isolation (always on cuda; `isolate=True` / `--isolate` elsewhere): each cell runs in its own
child process with a time limit (vitopt/suite/isolation.py), so a segfault, a hang or an
out-of-memory kill costs that cell only and becomes a failed record with a `failure` object
(signal, exit code, timeout, the tail of its output). Isolated cells are timed alone, not
interleaved, and the results file is rewritten after every cell.
"""
from __future__ import annotations

import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from vitopt.suite.machine import machine_info
from vitopt.suite.matrix import Group, Matrix, VitoptConfig
from vitopt.suite.models import SuiteModel, build_model
from vitopt.suite.peers import PEERS, Built, PeerContext

SCHEMA_VERSION = 1
Log = Callable[[str], None]


@dataclass
class Cell:
    name: str
    kind: str                     # peer | vitopt
    config_kind: str              # peer | baseline | pass | preset
    config: Optional[VitoptConfig] = None
    built: Optional[Built] = None
    error: Optional[str] = None
    rss_delta_mb: Optional[float] = None
    cosine: Optional[float] = None
    max_abs: Optional[float] = None
    top1: Optional[float] = None
    failure: Optional[dict] = None  # isolated cells: how the child process failed


@dataclass
class SuiteResult:
    matrix: Matrix
    machine: dict
    method: dict
    records: List[dict] = field(default_factory=list)
    seconds: float = 0.0
    command: str = ""
    complete: bool = True

    def to_json(self) -> dict:
        return {"schema_version": SCHEMA_VERSION,
                "suite": {"name": self.matrix.name, "matrix_file": self.matrix.path,
                          "description": self.matrix.description, "command": self.command,
                          "seconds": round(self.seconds, 1), "complete": self.complete},
                "machine": self.machine, "method": self.method, "records": self.records}


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def method_of(matrix: Matrix, isolation=None) -> dict:
    t = matrix.timing
    extra = {}
    if isolation is not None:
        extra["isolation"] = (f"each cell in its own child process (python -m "
                              f"vitopt.suite.cell_worker), at most {isolation.timeout_s:.0f} s "
                              f"per cell" + (f", {isolation.budget_s:.0f} s for the whole suite"
                                             if isolation.budget_s else "")
                              + "; a crash, kill or timeout is a failed record")
    return {"warmup": t.warmup, "runs_per_round": t.runs, "rounds": t.rounds,
            "samples": t.runs * t.rounds, "statistic": "median, p10, p90, min (ms per call)",
            "interleaved": ("no: isolated cells are timed alone, one after another, rounds "
                            "back to back" if isolation is not None else
                            "all cells of one model and batch, round-robin rounds"),
            **extra,
            "memory": "RSS delta (/proc/self/statm) around build + one call at the largest batch",
            "flops": "vitopt EncoderIR.flops() per image",
            "accuracy": "top-1 on builtin:digits test split (PROXY, not ImageNet)",
            "calibration": f"builtin:digits calib split, resized; {matrix.calib_images} images "
                           f"for the peers, vitopt's default (128) for vitopt int8",
            "threads": matrix.threads or torch.get_num_threads()}


def run_suite(matrix: Matrix, *, log: Log = lambda m: None, command: str = "",
              isolation=None, on_progress: Optional[Callable[[SuiteResult], None]] = None
              ) -> SuiteResult:
    """Run every group of `matrix` and return the records (nothing is written here).

    isolation: a vitopt.suite.isolation.Isolation to run each cell in its own process (the
    default on cuda: Isolation.for_matrix(matrix)); None on the CPU runs them in this one.
    on_progress(result): called with the records so far (result.complete False) after every
    isolated cell and every in-process group, so a caller can save partial results."""
    from vitopt.suite.isolation import Isolation, run_group_isolated
    started = time.perf_counter()
    if isolation is None and matrix.device == "cuda":
        isolation = Isolation.for_matrix(matrix)
    if matrix.threads:
        torch.set_num_threads(matrix.threads)
    result = SuiteResult(matrix, machine_info(matrix.threads, matrix.device),
                         method_of(matrix, isolation), command=command)
    total = sum(len(g.peers) + len(g.vitopt) for g in matrix.groups)
    progress = _Progress(total, log)
    log(f"suite {matrix.name}: {len(matrix.groups)} model(s), {total} cells, threads "
        f"{result.method['threads']}, {matrix.timing.runs}x{matrix.timing.rounds} timed runs"
        + (", each cell isolated in its own process" if isolation is not None else ""))

    def emit(records: List[dict]) -> None:
        if on_progress is not None:
            partial = SuiteResult(matrix, result.machine, result.method, records,
                                  time.perf_counter() - started, command, complete=False)
            on_progress(partial)

    for index, group in enumerate(matrix.groups):
        if isolation is not None:
            done = list(result.records)
            result.records += run_group_isolated(matrix, index, progress, log, isolation,
                                                 lambda records: emit(done + records))
        else:
            result.records += run_group(matrix, group, progress, log)
            emit(list(result.records))
    result.seconds = time.perf_counter() - started
    log(f"suite {matrix.name} done in {result.seconds:.0f}s")
    return result


class _Progress:
    def __init__(self, total: int, log: Log):
        self.total, self.done, self.log, self.started = total, 0, log, time.perf_counter()

    def step(self, message: str) -> None:
        self.done += 1
        self.log(f"[{self.done}/{self.total}, {time.perf_counter() - self.started:.0f}s] {message}")


def model_flops(model: SuiteModel) -> int:
    """FLOPs per image of the plain model (vitopt's IR count), for the peers' records."""
    import vitopt
    return vitopt.trace(model.module, model.example()).flops()


def empty_cells(group: Group) -> List[Cell]:
    """The group's cells, not built yet: its peers, then its vitopt configurations."""
    return ([Cell(peer, "peer", "peer") for peer in group.peers]
            + [Cell(c.name, "vitopt", c.kind, c) for c in group.vitopt])


def _builder(matrix: Matrix, group: Group, model: SuiteModel, ctx: PeerContext, tmp: Path,
             index: int) -> Callable[[], Built]:
    """What builds cell `index` of empty_cells(group)."""
    if index < len(group.peers):
        peer = group.peers[index]
        return lambda: PEERS[peer](ctx)
    config_index = index - len(group.peers)
    config = group.vitopt[config_index]

    def build() -> Built:
        from vitopt.suite.vitopt_cell import build_vitopt
        return build_vitopt(model, config, tmp / f"vitopt-{config_index}.vitopt",
                            device=matrix.device, max_batch=max(group.batches),
                            threads=matrix.threads)
    return build


def _context(matrix: Matrix, group: Group, model: SuiteModel, tmp: Path) -> PeerContext:
    return PeerContext(model.module, model.example(), min(group.batches), tmp, matrix.threads,
                       matrix.device, _calib_loader(model, matrix.calib_images))


def _measure_cells(cells: List[Cell], matrix: Matrix, group: Group, model: SuiteModel,
                   log: Log) -> Dict[int, dict]:
    _check_numerics(cells, model, min(group.batches), log)
    if model.proxy:
        _accuracy(cells, max(group.batches), log)
    return {batch: _time_batch(cells, model, batch, matrix, log) for batch in group.batches}


def run_group(matrix: Matrix, group: Group, progress: _Progress, log: Log) -> List[dict]:
    model = build_model(group.model)
    base_flops = model_flops(model)
    log(f"{group.model}: {model.description}; {base_flops / 1e9:.2f} GFLOPs/image")
    max_batch = max(group.batches)
    with tempfile.TemporaryDirectory(prefix=f"vitopt-suite-{group.model}-") as tmp:
        ctx = _context(matrix, group, model, Path(tmp))
        cells = [_build(cell, _builder(matrix, group, model, ctx, Path(tmp), index), max_batch,
                        model, progress) for index, cell in enumerate(empty_cells(group))]
        timings = _measure_cells(cells, matrix, group, model, log)
        return _records(matrix, group, model, base_flops, cells, timings)


def run_cell(matrix: Matrix, group: Group, index: int, log: Log) -> dict:
    """Build, check and time cell `index` of empty_cells(group) alone, in this process; the
    result as JSON data (what an isolated cell's child process hands back, cell_payload)."""
    model = build_model(group.model)
    progress = _Progress(1, log)
    with tempfile.TemporaryDirectory(prefix=f"vitopt-suite-{group.model}-") as tmp:
        ctx = _context(matrix, group, model, Path(tmp))
        cell = _build(empty_cells(group)[index],
                      _builder(matrix, group, model, ctx, Path(tmp), index),
                      max(group.batches), model, progress)
        timings = _measure_cells([cell], matrix, group, model, log)
        return cell_payload(cell, timings)


def cell_payload(cell: Cell, timings: Dict[int, dict]) -> dict:
    built = cell.built
    return {"cell": cell.name, "error": cell.error, "rss_delta_mb": cell.rss_delta_mb,
            "cosine": cell.cosine, "max_abs": cell.max_abs, "top1": cell.top1,
            "built": None if built is None else {
                "engine": built.engine, "precision": built.precision, "how": built.how,
                "version": built.version, "artifact_bytes": built.artifact_bytes,
                "compile_s": built.compile_s, "extra": built.extra},
            "timings": {str(b): {name: t.to_dict() for name, t in v["timings"].items()}
                        for b, v in timings.items()},
            "errors": {str(b): v["errors"] for b, v in timings.items()}}


def cell_from_payload(cell: Cell, payload: dict) -> Tuple[Cell, Dict[int, dict]]:
    """The Cell (with a run-less Built for its record) and its timings, from cell_payload()."""
    from vitopt.timing import Timing
    info = payload.get("built")
    cell.error = payload.get("error")
    cell.rss_delta_mb, cell.top1 = payload.get("rss_delta_mb"), payload.get("top1")
    cell.cosine, cell.max_abs = payload.get("cosine"), payload.get("max_abs")
    if info is not None:
        cell.built = Built(None, None, info["engine"], info["precision"], info["how"],
                           info["version"], info["artifact_bytes"], info["compile_s"],
                           info.get("extra") or {})
    timings = {int(b): {"timings": {n: Timing(**t) for n, t in v.items()},
                        "errors": payload.get("errors", {}).get(b, {})}
               for b, v in payload.get("timings", {}).items()}
    return cell, timings


def _calib_loader(model: SuiteModel, count: int):
    cache = {}

    def load() -> torch.Tensor:
        if "images" not in cache:
            from vitopt.data.folder import resolve_dataset
            cache["images"] = resolve_dataset("builtin:digits", "calib", model.image_size,
                                              model.mean, model.std, model.in_chans,
                                              limit=count)[0]
        return cache["images"]
    return load


def _error_text(exc: BaseException) -> str:
    lines = traceback.format_exception_only(type(exc), exc)
    return " ".join(line.strip() for line in lines)[:500]


def _build(cell: Cell, build, max_batch: int, model: SuiteModel, progress: _Progress) -> Cell:
    started = time.perf_counter()
    before = _rss_mb()
    try:
        cell.built = build()
        cell.built.run(cell.built.to_input(model.example(max_batch).numpy()))
        cell.rss_delta_mb = max(0.0, _rss_mb() - before)
        progress.step(f"{model.name} / {cell.name}: built in {time.perf_counter() - started:.1f}s "
                      f"({cell.built.how})")
    except Exception as exc:  # recorded in the cell's records and shown in the tables
        cell.built, cell.error = None, _error_text(exc)
        progress.step(f"{model.name} / {cell.name}: FAILED: {cell.error}")
    return cell


def _as_numpy(output) -> np.ndarray:
    if isinstance(output, torch.Tensor):
        return output.detach().float().cpu().numpy()
    if not isinstance(output, np.ndarray) and hasattr(output, "numpy"):   # a TVM tensor
        output = output.numpy()
    return np.asarray(output, dtype=np.float32)


def _probe(model: SuiteModel, batch: int) -> torch.Tensor:
    """Real images for the numerics check (random ones make int8 and token merging look worse
    than they are): the digits test split, resized and normalised for the model."""
    from vitopt.data.folder import resolve_dataset
    return resolve_dataset("builtin:digits", "test", model.image_size, model.mean, model.std,
                           model.in_chans, limit=batch)[0].contiguous()


def _check_numerics(cells: List[Cell], model: SuiteModel, batch: int, log: Log) -> None:
    images = _probe(model, batch)
    with torch.no_grad():
        reference = model.module.cpu()(images).float().numpy().ravel()
    for cell in _ok(cells):
        try:
            out = _as_numpy(cell.built.run(cell.built.to_input(images.numpy()))).ravel()
        except Exception as exc:  # recorded
            cell.built, cell.error = None, _error_text(exc)
            log(f"{cell.name}: FAILED on the numerics probe: {cell.error}")
            continue
        if out.shape != reference.shape:
            cell.built, cell.error = None, (f"output shape {out.shape} differs from eager "
                                            f"{reference.shape}")
            continue
        cell.max_abs = float(np.abs(out - reference).max())
        cell.cosine = float(out @ reference / max(np.linalg.norm(out) * np.linalg.norm(reference),
                                                  1e-30))


def _accuracy(cells: List[Cell], batch: int, log: Log) -> None:
    from vitopt.data.digits import load_digits_split
    from vitopt.data.proxy import evaluate_top1
    images, labels = load_digits_split("test")
    for cell in _ok(cells):
        built = cell.built
        cell.top1 = evaluate_top1(lambda x, b=built: torch.from_numpy(
            _as_numpy(b.run(b.to_input(np.ascontiguousarray(x.numpy()))))),
            images, labels, batch_size=batch)
        log(f"{cell.name}: proxy top-1 {cell.top1:.4f}")


def _ok(cells: List[Cell]) -> List[Cell]:
    return [c for c in cells if c.built is not None]


def _time_batch(cells: List[Cell], model: SuiteModel, batch: int, matrix: Matrix, log: Log) -> dict:
    from vitopt.timing import measure_interleaved
    array = np.ascontiguousarray(model.example(batch).numpy())
    fns, errors = {}, {}
    for cell in _ok(cells):
        x = cell.built.to_input(array)
        try:
            cell.built.run(x)   # a batch size the cell has not seen yet compiles here, untimed
        except Exception as exc:  # recorded for this batch
            errors[cell.name] = _error_text(exc)
            log(f"{cell.name} at batch {batch}: FAILED: {errors[cell.name]}")
            continue
        fns[cell.name] = lambda run=cell.built.run, x=x: run(x)
    log(f"{model.name} batch {batch}: timing {len(fns)} cells, interleaved ...")
    t = matrix.timing
    timings = measure_interleaved(fns, warmup=t.warmup, runs=t.runs, rounds=t.rounds) if fns else {}
    for name, timing in sorted(timings.items(), key=lambda kv: kv[1].median_ms):
        log(f"  {name:32s} {timing.median_ms:9.2f} ms  (p10 {timing.p10_ms:.2f}, "
            f"p90 {timing.p90_ms:.2f})")
    return {"timings": timings, "errors": errors}


def _records(matrix: Matrix, group: Group, model: SuiteModel, base_flops: int,
             cells: List[Cell], timings: Dict[int, dict]) -> List[dict]:
    records = []
    for batch in group.batches:
        per_batch = timings.get(batch, {"timings": {}, "errors": {}})
        times, errors = per_batch["timings"], per_batch["errors"]
        peers = {c.name: times[c.name].median_ms for c in cells
                 if c.kind == "peer" and c.name in times}
        best_peer = min(peers, key=peers.get) if peers else None
        eager = times.get("torch-eager-fp32")
        for cell in cells:
            records.append(_record(matrix, model, base_flops, cell, batch, times.get(cell.name),
                                   errors.get(cell.name), best_peer,
                                   peers.get(best_peer) if best_peer else None,
                                   eager.median_ms if eager else None))
    return records


def _record(matrix, model, base_flops, cell: Cell, batch, timing, batch_error, best_peer,
            best_peer_ms, eager_ms) -> dict:
    built = cell.built
    error = cell.error or batch_error
    ok = timing is not None and error is None
    config = None
    if cell.config is not None:
        config = {"preset": cell.config.preset, "passes": list(cell.config.passes),
                  "precision": cell.config.precision, "backend": cell.config.backend}
    extra = built.extra if built else {}
    gflops = extra.get("gflops_per_image", base_flops / 1e9) if built else None
    return {
        "suite": matrix.name, "model": model.name, "model_description": model.description,
        "image_size": model.image_size, "batch": batch, "cell": cell.name, "kind": cell.kind,
        "config_kind": cell.config_kind, "config": config,
        "engine": built.engine if built else None,
        "precision": built.precision if built else (cell.config.precision if cell.config else None),
        "how": built.how if built else None, "engine_version": built.version if built else None,
        "status": "ok" if ok else "error", "error": None if ok else (error or "not timed"),
        "latency_ms": ({"median": timing.median_ms, "p10": timing.p10_ms, "p90": timing.p90_ms,
                        "min": timing.min_ms, "samples": timing.runs, "warmup": timing.warmup}
                       if ok else None),
        "throughput_ips": batch * 1e3 / timing.median_ms if ok else None,
        "best_peer": best_peer,
        "speedup_vs_best_peer": best_peer_ms / timing.median_ms if ok and best_peer_ms else None,
        "speedup_vs_torch_eager": eager_ms / timing.median_ms if ok and eager_ms else None,
        "compile_s": round(built.compile_s, 2) if built else None,
        "artifact_bytes": built.artifact_bytes if built else None,
        "rss_delta_mb": round(cell.rss_delta_mb, 1) if cell.rss_delta_mb is not None else None,
        "gflops_per_image": gflops,
        "passes_applied": extra.get("passes_applied"),
        "cosine_vs_eager": cell.cosine, "max_abs_vs_eager": cell.max_abs,
        "top1": cell.top1, "proxy": model.proxy,
        "threads": matrix.threads or torch.get_num_threads(), "device": matrix.device,
        "failure": cell.failure,
    }
