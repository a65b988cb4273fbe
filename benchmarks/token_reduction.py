"""Token reduction (merge_tokens, prune_tokens): proxy accuracy and DeiT-S latency per setting.

For every setting of each pass (FLOPs budgets for merge_tokens, keep rates for prune_tokens,
proportional attention on/off) and for the `balanced` and `fast` presets:
  * accuracy: top-1 of the digits proxy (builtin:digits-vit, held-out `test` split, 360 images;
    a PROXY, not ImageNet) in the reference executor (fp32) and, unless --no-engine-accuracy,
    on the OpenVINO bf16 engine; the unreduced model in the same run is the baseline.
  * speed: DeiT-S/16 224 (random init: token counts, not weights, decide the cost) with the
    same pass options, OpenVINO bf16, at each batch, timed in interleaved rounds against the
    unreduced engine (lossless preset) in the same run: medians and p10-p90.
Every setting runs on top of the `lossless` preset, which is exact, so "merge flops=0.63" is
the token reduction of the `balanced` preset.

    python benchmarks/token_reduction.py            # full: ~12 DeiT-S engines, 15-25 minutes
    python benchmarks/token_reduction.py --quick    # balanced vs unreduced only, ~3 minutes
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
from common import markdown_table, write_results  # noqa: E402

MERGE_BUDGETS = (0.8, 0.7, 0.63, 0.55, 0.5)
PRUNE_RATES = (0.9, 0.8, 0.7, 0.6, 0.5)


def settings(quick: bool):
    """(label, pass specs on top of lossless, speed batches) per row."""
    from vitopt.pipeline import PRESETS, PassSpec
    lossless = {s.name for s in PRESETS["lossless"]}
    preset = {name: [s for s in PRESETS[name] if s.name not in lossless] for name in ("balanced", "fast")}
    rows = [("preset balanced", preset["balanced"], "all")]
    if quick:
        return rows
    rows.append(("preset fast", preset["fast"], "all"))
    rows += [(f"merge flops={f}", [PassSpec("merge_tokens", {"flops": f})], "main")
             for f in MERGE_BUDGETS]
    rows.append(("merge flops=0.63, no proportional attention",
                 [PassSpec("merge_tokens", {"flops": 0.63, "proportional_attention": False})], "main"))
    rows += [(f"prune keep_rate={k}", [PassSpec("prune_tokens", {"keep_rate": k})], "main")
             for k in PRUNE_RATES]
    return rows


def apply(ir, specs):
    from vitopt.pipeline import Pipeline
    result = Pipeline(specs).run(ir)
    return result.ir, result.records


def proxy_accuracy(rows, engine_accuracy: bool, tmp: Path, log):
    """{label: dict} of proxy top-1 (reference executor, and bf16 engine) and token stats."""
    from vitopt.data.digits import load_digits_split
    from vitopt.data.proxy import build_digits_vit, evaluate_top1
    from vitopt.frontend.trace import trace
    from vitopt.ir.reduce import tokens_at_end
    from vitopt.pipeline import PRESETS
    from vitopt.schedule import build_engine

    images, labels = load_digits_split("test")
    base, _ = apply(trace(build_digits_vit(), images[:2]), PRESETS["lossless"])

    def measure(ir, name):
        out = {"top1": evaluate_top1(ir, images, labels, batch_size=120),
               "flops_ratio": ir.flops() / base.flops(), "tokens_final": tokens_at_end(ir)}
        if engine_accuracy:
            engine = build_engine(ir, tmp / f"proxy-{name}", "openvino", "bf16", 120)
            out["top1_engine"] = evaluate_top1(lambda x: engine.run(x.numpy()), images, labels,
                                               batch_size=120)
        return out

    results = {"base": measure(base, "base")}
    log(f"proxy unreduced: top-1 {results['base']['top1']:.4f}")
    for index, (label, specs, _) in enumerate(rows):
        reduced, records = apply(base, specs)
        results[label] = measure(reduced, str(index))
        results[label]["schedule"] = records[-1].stats
        log(f"proxy {label}: top-1 {results[label]['top1']:.4f} "
            f"(FLOPs x{results[label]['flops_ratio']:.2f}; {records[-1].notes[0]})")
    return results


def speed(rows, model_name: str, batches, runs: int, rounds: int, tmp: Path, log):
    """{(label, batch): dict} of latencies against the unreduced engine, same run."""
    import timm

    from vitopt.frontend.trace import trace
    from vitopt.pipeline import PRESETS
    from vitopt.schedule import build_engine
    from vitopt.timing import measure_interleaved

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    started = time.perf_counter()
    base, _ = apply(trace(model, torch.randn(2, 3, 224, 224)), PRESETS["lossless"])
    base_engine = build_engine(base, tmp / "speed-base", "openvino", "bf16", max(batches))
    log(f"{model_name}: traced and built the unreduced engine in {time.perf_counter() - started:.0f}s")
    out = {}
    for index, (label, specs, which) in enumerate(rows):
        reduced, records = apply(base, specs)
        engine = build_engine(reduced, tmp / f"speed-{index}", "openvino", "bf16", max(batches))
        for batch in (batches if which == "all" else batches[-1:]):
            images = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224)).astype(np.float32)
            times = measure_interleaved({"base": lambda: base_engine.run(images),
                                         "reduced": lambda: engine.run(images)},
                                        runs=runs, rounds=rounds)
            b, r = times["base"], times["reduced"]
            out[(label, batch)] = {
                "flops_ratio": reduced.flops() / base.flops(), "notes": records[-1].notes,
                "schedule": records[-1].stats, "base_ms": b.median_ms, "base_p10_p90": [b.p10_ms, b.p90_ms],
                "reduced_ms": r.median_ms, "reduced_p10_p90": [r.p10_ms, r.p90_ms],
                "samples": r.runs, "speedup": b.median_ms / r.median_ms}
            log(f"{model_name} {label} batch {batch}: {b.median_ms:.1f} -> {r.median_ms:.1f} ms "
                f"({b.median_ms / r.median_ms:.2f}x, FLOPs x{reduced.flops() / base.flops():.2f})")
        del engine
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="balanced preset only, fewer runs (checks the script; not the report)")
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per round (default 10, quick 4)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 2)")
    parser.add_argument("--no-engine-accuracy", action="store_true",
                        help="proxy accuracy in the reference executor only")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args(argv)
    runs = args.runs or (4 if args.quick else 10)
    rounds = args.rounds or (2 if args.quick else 3)
    batches = sorted(int(b) for b in args.batches.split(","))
    rows = settings(args.quick)

    def log(message):
        print(message, flush=True)

    with tempfile.TemporaryDirectory(prefix="vitopt-token-bench-") as tmp:
        tmp = Path(tmp)
        accuracy = proxy_accuracy(rows, not (args.no_engine_accuracy or args.quick), tmp, log)
        timing = {} if args.skip_speed else speed(rows, args.model, batches, runs, rounds, tmp, log)

    base_top1 = accuracy["base"]["top1"]
    records = []
    for label, specs, _ in rows:
        acc = accuracy[label]
        common = {"setting": label, "passes": [{"name": s.name, "options": s.options} for s in specs],
                  "proxy_top1": acc["top1"], "proxy_top1_base": base_top1,
                  "proxy_delta_points": 100 * (acc["top1"] - base_top1),
                  "proxy_top1_engine_bf16": acc.get("top1_engine"),
                  "proxy_top1_engine_bf16_base": accuracy["base"].get("top1_engine"),
                  "proxy_flops_ratio": acc["flops_ratio"], "proxy_tokens_final": acc["tokens_final"],
                  "proxy_schedule": acc["schedule"]}
        batch_rows = [(b, t) for (name, b), t in timing.items() if name == label] or [(None, {})]
        for batch, t in batch_rows:
            records.append({**common, "model": args.model, "batch": batch, **t})
    table = markdown_table(records, [
        ("setting", "setting", "{}"), ("proxy_top1", "proxy top-1", "{:.4f}"),
        ("proxy_delta_points", "Δ points", "{:+.2f}"), ("proxy_top1_engine_bf16", "proxy top-1 OV bf16", "{:.4f}"),
        ("proxy_flops_ratio", "proxy FLOPs", "x{:.2f}"), ("flops_ratio", f"{args.model} FLOPs", "x{:.2f}"),
        ("batch", "batch", "{}"), ("base_ms", "unreduced ms", "{:.1f}"), ("reduced_ms", "reduced ms", "{:.1f}"),
        ("speedup", "speedup", "{:.2f}x")])
    mode = "quick check (not a report)" if args.quick else f"{runs} runs x {rounds} interleaved rounds"
    md = (f"# Token reduction: digits-proxy accuracy and {args.model} latency (OpenVINO bf16)\n\n"
          f"Proxy: builtin:digits-vit, held-out test split ({base_top1:.4f} unreduced); a proxy, not "
          f"ImageNet. Speed: {args.model} random init, OpenVINO bf16, medians ({mode}), the "
          f"unreduced engine (lossless preset) timed in the same run.\n"
          f"Command: `python benchmarks/token_reduction.py{' --quick' if args.quick else ''}`\n\n{table}")
    stem = "token_reduction" + ("_quick" if args.quick else "") + ("_accuracy" if args.skip_speed else "")
    out = write_results(stem, records, md,
                        {"args": vars(args)})
    print(md)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
