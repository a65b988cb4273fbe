"""Accuracy of reparam_shiftadd's variants on the digits proxy (held-out test split, top-1).

Every variant starts from the same traced builtin:digits-vit and runs the pass alone, with its
default settings unless the row says otherwise: shift-add linears (MLP only, all linears, the
`sensitive` half), add-attention (binary Q/K, Hamming similarity; vitopt.ir.add_attention)
alone and with MLP shift-add, each without and with the pass's fine-tune (train split only;
the test split is never seen). Calibration (sensitivity scoring; the hashing's PCA init when
there is no fine-tune) uses the `calib` split. Deterministic for the seed; on 2 cores the whole
table takes a few minutes. Run it under the shared lock:

    flock /tmp/vitopt-bench.lock .venv/bin/python benchmarks/shiftadd_accuracy.py

Writes benchmarks/results/<machine>/shiftadd_accuracy.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, write_results  # noqa: E402

VARIANTS = [  # (name, reparam_shiftadd options)
    ("mlp shift-add", {"layers": "mlp"}),
    ("mlp shift-add + FT", {"layers": "mlp", "finetune": True}),
    ("all linears shift-add", {"layers": "all"}),
    ("all linears shift-add + FT", {"layers": "all", "finetune": True}),
    ("sensitive (half multiply)", {"layers": "sensitive"}),
    ("add-attention only, no FT", {"layers": "none", "attention": "add",
                                   "allow_untrained_add_attention": True}),
    ("add-attention only + FT", {"layers": "none", "attention": "add", "finetune": True}),
    ("add-attention + mlp shift-add + FT", {"layers": "mlp", "attention": "add",
                                            "finetune": True}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated substrings of variant names")
    args = parser.parse_args()

    import torch

    from vitopt.data.digits import load_digits_split
    from vitopt.data.proxy import evaluate_top1, trace_digits_vit
    from vitopt.pipeline import PassContext, PassSpec, Pipeline

    torch.set_num_threads(2)
    images, labels = load_digits_split("test")
    calib, _ = load_digits_split("calib")
    ir = trace_digits_vit(images[:2])  # the fine-tune loads its train split with meta's mean/std
    base = evaluate_top1(ir, images, labels)
    records = [{"variant": "float (no pass)", "options": {}, "top1": base, "delta_points": 0.0,
                "seconds": 0.0, "notes": []}]
    print(f"float: {100 * base:.2f} %", flush=True)
    wanted = [w for w in args.only.split(",") if w]
    for name, options in VARIANTS:
        if wanted and not any(w in name for w in wanted):
            continue
        started = time.perf_counter()
        result = Pipeline([PassSpec("reparam_shiftadd", {**options, "progress": False})]).run(
            ir, context=PassContext(calib=calib, calib_source="builtin:digits calib split"))
        seconds = time.perf_counter() - started
        top1 = evaluate_top1(result.ir, images, labels)
        record = result.records[0]
        tuned = record.stats.get("finetune") or {}
        records.append({"variant": name, "options": options, "top1": top1,
                        "delta_points": round(100 * (top1 - base), 2),
                        "epochs": tuned.get("epochs"), "lr": tuned.get("lr"),
                        "seconds": round(seconds, 1), "notes": record.notes})
        print(f"{name}: {100 * top1:.2f} % ({100 * (top1 - base):+.2f} points, {seconds:.0f} s)",
              flush=True)
    rows = [{**r, "top1_pct": 100 * r["top1"]} for r in records]
    table = markdown_table(rows, [("variant", "variant", "{}"), ("top1_pct", "top-1 %", "{:.2f}"),
                                  ("delta_points", "vs float (points)", "{:+.2f}"),
                                  ("epochs", "FT epochs", "{}"), ("lr", "FT lr", "{:g}"),
                                  ("seconds", "pass seconds", "{:.0f}")])
    markdown = ("# reparam_shiftadd accuracy on the digits proxy\n\n"
                f"Held-out test split, {labels.shape[0]} images (one image = "
                f"{100 / labels.shape[0]:.2f} points). Command:\n\n"
                "    flock /tmp/vitopt-bench.lock .venv/bin/python benchmarks/shiftadd_accuracy.py\n\n"
                + table)
    out = write_results("shiftadd_accuracy", records, markdown,
                        {"test_images": int(labels.shape[0])})
    print(markdown)
    print(f"wrote {out}/shiftadd_accuracy.json and .md")


if __name__ == "__main__":
    main()
