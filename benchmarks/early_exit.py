"""Early exits on the digits proxy: wall-clock per image vs the same model without exits.

Builds the trained digits ViT with exit heads (trained on the train split, thresholds
calibrated on the calib split to the default budget), deploys it as segmented engines with
batch compaction, and times a full pass over the held-out test split (360 images) at batch 1
and batch 64, against the model without exits on the same backend and precision, in the same
run (interleaved rounds, median of >= 12 timed passes). Also times the segmented engine with
never-exit thresholds, which isolates the overhead of splitting (extra engine calls, copies of
the token state). Reports top-1, the exit distribution and the fraction of FLOPs skipped.

    flock /tmp/vitopt-bench.lock .venv/bin/python benchmarks/early_exit.py
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import machine_info, markdown_table, write_results  # noqa: E402


def build(args):
    from vitopt.data.digits import load_digits_split
    from vitopt.data.proxy import build_digits_vit
    from vitopt.exits.calibrate import calibrate_thresholds
    from vitopt.exits.train import train_heads
    from vitopt.frontend.trace import trace
    from vitopt.pipeline import PassSpec, Pipeline
    train_x, train_y = load_digits_split("train")
    base = trace(build_digits_vit(), train_x[:2])
    options = {"blocks": tuple(args.blocks)} if args.blocks else {}
    ir = Pipeline([PassSpec("insert_exit_heads", options)]).run(base).ir
    train_heads(ir, train_x, train_y, seed=0, log=print)
    calib = calibrate_thresholds(ir, *load_digits_split("calib"), args.budget)
    print(f"thresholds {calib['thresholds']}, calib compute {calib['compute_fraction']:.3f}")
    return base, ir, calib


_EXPORTED = {}  # tmp dir -> (exported segments, plan): the ONNX is shared by the backends


def engines_for(backend_name, base, ir, precision, tmp: Path):
    from vitopt.backends import get_backend
    from vitopt.exits.lower import build_exported, export_segments
    from vitopt.exits.segments import heads_config
    from vitopt.lower.onnx_export import export_onnx
    from vitopt.segmented import SegmentedEngine
    backend = get_backend(backend_name)
    example = torch.randn(3, 3, 32, 32)
    if not (tmp / "plain.onnx").exists():
        export_onnx(base, example, tmp / "plain.onnx")
    files = backend.build(tmp / "plain.onnx", tmp / f"plain-{backend_name}", precision=precision,
                          max_batch=64)
    plain = backend.load(tmp / f"plain-{backend_name}", files, precision=precision)
    if tmp not in _EXPORTED:
        _EXPORTED[tmp] = export_segments(ir, example, tmp / "onnx")
    exported, plan = _EXPORTED[tmp]
    built = build_exported(exported, plan, backend, tmp / f"seg-{backend_name}", precision=precision,
                           max_batch=64)
    parts = [backend.load(tmp / f"seg-{backend_name}", b["files"], precision=precision) for b in built]
    return plain, SegmentedEngine(parts, *heads_config(ir))


def run_set(engine, batches):
    return [engine(b) for b in batches]


def measure_backend(backend_name, base, ir, precision, tmp, images, labels, runs, rounds):
    from vitopt.exits.segments import compute_per_exit
    from vitopt.timing import measure_interleaved
    plain, segmented = engines_for(backend_name, base, ir, precision, tmp)
    never = segmented.never_exiting()
    costs, total = compute_per_exit(ir)
    rows = []
    for batch in (1, 64):
        batches = [np.ascontiguousarray(images[i:i + batch]) for i in range(0, len(images), batch)]
        taken = np.concatenate([segmented.run_with_exits(b)[1] for b in batches])
        top1 = float((np.concatenate(run_set(segmented.run, batches)).argmax(1) == labels).mean())
        base_top1 = float((np.concatenate(run_set(plain.run, batches)).argmax(1) == labels).mean())
        timings = measure_interleaved({
            "plain": lambda: run_set(plain.run, batches),
            "exits": lambda: run_set(segmented.run, batches),
            "never": lambda: run_set(never.run, batches)}, warmup=1, runs=runs, rounds=rounds)
        per = {k: t.median_ms / len(images) for k, t in timings.items()}
        rows.append({
            "backend": backend_name, "precision": precision, "batch": batch,
            "plain_ms": per["plain"], "exits_ms": per["exits"], "never_ms": per["never"],
            "speedup": per["plain"] / per["exits"], "split_overhead": per["never"] / per["plain"] - 1,
            "plain_p10_p90": [timings["plain"].p10_ms / len(images), timings["plain"].p90_ms / len(images)],
            "exits_p10_p90": [timings["exits"].p10_ms / len(images), timings["exits"].p90_ms / len(images)],
            "samples": timings["plain"].runs,
            "top1_plain": base_top1, "top1_exits": top1,
            "distribution": (np.bincount(taken, minlength=len(costs)) / len(taken)).tolist(),
            "flops_skipped": float(1 - (np.asarray(costs)[taken] / total).mean())})
        r = rows[-1]
        print(f"{backend_name} {precision} batch {batch}: plain {r['plain_ms']:.3f} ms/img, exits "
              f"{r['exits_ms']:.3f} ({r['speedup']:.2f}x), never-exit {r['never_ms']:.3f} "
              f"(split overhead {r['split_overhead']:+.1%}); top-1 {base_top1:.4f} -> {top1:.4f}; "
              f"FLOPs skipped {r['flops_skipped']:.1%}; exits {np.round(r['distribution'], 3)}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="openvino,onnxruntime")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--budget", type=float, default=1.0, help="exit accuracy budget (points)")
    parser.add_argument("--blocks", type=lambda s: [int(v) for v in s.split(",")], default=None)
    parser.add_argument("--runs", type=int, default=4, help="timed passes per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stem", default="early_exit")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    from vitopt.data.digits import load_digits_split
    started = time.perf_counter()
    base, ir, calib = build(args)
    images, labels = load_digits_split("test")
    images, labels = images.numpy(), labels.numpy()
    records = []
    with tempfile.TemporaryDirectory(prefix="vitopt-ee-bench-") as tmp:
        for backend_name in args.backends.split(","):
            records += measure_backend(backend_name, base, ir, args.precision, Path(tmp), images,
                                       labels, args.runs, args.rounds)
    blocks = [h.block for h in __import__("vitopt.ir.exits", fromlist=["x"]).exit_stages(ir)]
    columns = [("backend", "backend", "{}"), ("batch", "batch", "{}"),
               ("plain_ms", "no exits ms/img", "{:.3f}"), ("exits_ms", "exits ms/img", "{:.3f}"),
               ("speedup", "speedup", "{:.2f}x"), ("never_ms", "never-exit ms/img", "{:.3f}"),
               ("split_overhead", "split overhead", "{:+.1%}"), ("flops_skipped", "FLOPs skipped", "{:.1%}"),
               ("top1_plain", "top-1 no exits", "{:.4f}"), ("top1_exits", "top-1 exits", "{:.4f}")]
    info = machine_info()
    markdown = (f"# Early exits on the digits proxy (held-out test split, 360 images)\n\n"
                f"Machine: {info['cpu']}, {info['cores_available']} cores, shared with other jobs "
                f"(contended; numbers are noisy). {info['versions']}. Precision {args.precision}. "
                f"Exits after blocks {blocks}, rule {calib['rule']}, thresholds "
                f"{[round(t, 4) for t in calib['thresholds']]} (calibrated on the calib split to "
                f"{args.budget} point(s) of changed predictions). Per-image time = median time of a "
                f"full pass over the 360 images / 360 (interleaved rounds, {records[0]['samples']} "
                f"passes each). 'never-exit' is the segmented engine with thresholds that never exit: "
                f"the cost of splitting alone.\n\n" + markdown_table(records, columns) +
                "\nExit distribution (heads..., full): " +
                "; ".join(f"{r['backend']} b{r['batch']} {np.round(r['distribution'], 3).tolist()}"
                          for r in records) +
                f"\n\nCommand: `flock /tmp/vitopt-bench.lock .venv/bin/python benchmarks/early_exit.py`"
                f" ({time.perf_counter() - started:.0f} s)\n")
    out = write_results(args.stem, records, markdown, {"calibration": calib, "blocks": blocks})
    print(markdown)
    print(f"wrote {out}/{args.stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
