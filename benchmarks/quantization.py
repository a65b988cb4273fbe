"""int8 quantization: vitopt's method vs naive min/max on the digits proxy, and DeiT-S speed.

Accuracy (default): the digits proxy (builtin:digits-vit; a PROXY, not ImageNet), calibrated on
the `calib` split (180 images), top-1 on the held-out `test` split (360 images), in the IR's
reference executor (the fake-quant model) and, with --engine-accuracy, on the OpenVINO and ORT
int8 engines. Rows: fp32; vitopt int8 (defaults: LayerNorm balancing, MSE ranges, int8
q.K^T); the same without balancing; percentile ranges; float attention; u8 q, k, v; and NAIVE
min/max (no balancing, min/max ranges, q/k/v and the softmax output quantized min/max); then the
balanced preset's token merging alone and followed by vitopt int8 (calibrated on the merged IR,
the pipeline's order: the bound on the two losses together). Beside
top-1: logit SQNR vs fp32 (dB) and agreement with fp32 predictions. The small proxy has no
LayerNorm outlier channels (large trained ViTs do), so every row also runs on the same network
rewritten with one outlier channel per LayerNorm (x300, compensated in the next linear: the
same fp32 function), where min/max without balancing breaks.

Speed (--speed): DeiT-S/16 224 (random init; ranges from the digits calib images resized to 224
with ImageNet normalization, the same images for every quantizer), at each batch, timed in
interleaved rounds in one run:
  OpenVINO: bf16 of the plain model | vitopt int8 | NNCF int8 (nncf.quantize(model, dataset,
            model_type=nncf.ModelType.TRANSFORMER) on the plain torch-exported model) |
            vitopt int8 + balanced merging, with int8 q.K^T (default) and attention=float
  ORT:      fp32 of the plain model | vitopt int8 | quantize_static (QDQ, per-channel)
plus what each OpenVINO engine really runs (linears and fused attention by precision).
Every engine above is compiled for a dynamic batch 1..max (as vitopt's artifacts are). OpenVINO
also runs faster on a static input shape (its docs recommend reshaping when the shape is known;
with static shapes it fuses elementwise chains into JIT subgraphs, which helps NNCF's graph most),
so the int8 OpenVINO engines are timed again per batch, each compiled for exactly that batch, in
their own group ("openvino static"), beside NNCF's and balanced's dynamic-batch engines: that
group compares each engine in its best setup (NNCF gains more from static shapes than vitopt).
The issue-4 bar (NNCF int8 / vitopt int8 + balanced, >= 2 at batch 8) is reported three ways:
dynamic vs dynamic, static vs static, and the faster setup of each.

    python benchmarks/quantization.py                     # accuracy, ~2 minutes
    python benchmarks/quantization.py --speed --skip-accuracy --batches 1,8
    python benchmarks/quantization.py --speed --skip-accuracy --lock /tmp/vitopt-bench.lock
    python benchmarks/quantization.py --speed --skip-accuracy --batches 8 --speed-backends openvino --runs 5 --rounds 2
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

OUTLIER = 300.0
WARMUP = 3  # untimed calls per engine before the timed rounds
NAIVE = {"smooth": False, "method": "minmax", "attention": "qkv", "quantize_softmax": True}
SETTINGS = [
    ("fp32", None),
    ("vitopt int8 (default)", {}),
    ("vitopt int8, no LayerNorm balancing", {"smooth": False}),
    ("vitopt int8, percentile ranges", {"method": "percentile"}),
    ("vitopt int8, float attention (attention=float)", {"attention": "float"}),
    ("vitopt int8, u8 q, k, v (attention=qkv)", {"attention": "qkv"}),
    ("naive min/max (no balancing, softmax quantized)", NAIVE),
]
#: The issue-4 total bound: int8 after the balanced preset's token merging (calibrated on the
#: merged IR, the pipeline's order), beside the merging alone.
PRESET_SETTINGS = [
    ("balanced merging (fp32)", "balanced", []),
    ("balanced merging + vitopt int8", "balanced", ["quantize_int8"]),
]


def build_engine(ir, tmp: Path, backend_name: str, precision: str, max_batch: int):
    from vitopt.lower.onnx_export import export_onnx
    h, w = ir.meta.image_size
    onnx_path = export_onnx(ir, torch.randn(2, ir.meta.in_chans, h, w), tmp / "model.onnx")
    return load_onnx(onnx_path, tmp / backend_name, backend_name, precision, max_batch)


def load_onnx(onnx_path: Path, out: Path, backend_name: str, precision: str, max_batch: int):
    from vitopt.backends import get_backend
    backend = get_backend(backend_name)
    files = backend.build(onnx_path, out, precision=precision, max_batch=max_batch)
    return backend.load(out, files, precision=precision), out / files[0]


def accuracy(engine_accuracy: bool, tmp: Path, log) -> list:
    from vitopt.data.digits import load_digits_split
    from vitopt.data.proxy import build_digits_vit
    from vitopt.frontend.trace import trace

    images, labels = load_digits_split("test")
    calib, _ = load_digits_split("calib")
    rows = []
    plain = trace(build_digits_vit(), images[:2])
    for model_label, ir in (("proxy", plain), (f"proxy, LayerNorm outliers x{OUTLIER}",
                                              with_outlier_channels(plain, OUTLIER))):
        rows += accuracy_rows(model_label, ir, images, labels, calib, engine_accuracy, tmp, log)
    return rows


def with_outlier_channels(ir, factor: float):
    """The same fp32 function with one outlier channel per pre-norm LayerNorm (as large trained
    ViTs have): LayerNorm channel 0 x factor, the next linear's input column 0 / factor."""
    ir = ir.clone()
    with torch.no_grad():
        for stage in ir.blocks():
            stage.norm.weight[0] *= factor
            stage.norm.bias[0] *= factor
            (stage.qkv if hasattr(stage, "qkv") else stage.fc1).weight[:, 0] /= factor
    return ir


def accuracy_rows(model_label, ir, images, labels, calib, engine_accuracy, tmp, log) -> list:
    from vitopt.data.proxy import evaluate_top1
    from vitopt.pipeline import PassContext, PassSpec, Pipeline, resolve_pipeline
    with torch.no_grad():
        ref = ir(images)
    runs = [(label, [PassSpec("quantize_int8", options)] if options is not None else [], options)
            for label, options in SETTINGS]
    runs += [(label, resolve_pipeline(preset, extra), preset)
             for label, preset, extra in PRESET_SETTINGS]
    rows = []
    for label, specs, options in runs:
        started = time.perf_counter()
        model, stats = ir, {}
        if specs:
            result = Pipeline(specs).run(
                ir, context=PassContext(calib=calib, calib_source="builtin:digits calib"))
            model = result.ir
            stats = next((r.stats for r in result.records if r.name == "quantize_int8"), {})
        with torch.no_grad():
            out = model(images)
        row = {"model": model_label, "setting": label, "options": options,
               "top1": evaluate_top1(model, images, labels, batch_size=120),
               "sqnr_db": float(10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum().clamp_min(1e-30))),
               "agree": float((out.argmax(1) == ref.argmax(1)).float().mean()),
               "min_layer_sqnr_db": min((v["sqnr_db"] for v in stats.get("layers", {}).values()), default=None)}
        if engine_accuracy and any(spec.name == "quantize_int8" for spec in specs):
            for backend_name in ("openvino", "onnxruntime"):
                engine, _ = build_engine(model, tmp / f"acc{model_label[:5]}{len(rows)}", backend_name,
                                         "int8", 120)
                row[f"top1_{backend_name}"] = evaluate_top1(lambda x: engine.run(x.numpy()), images,
                                                            labels, batch_size=120)
        rows.append(row)
        log(f"{model_label} / {label}: top-1 {row['top1']:.4f}, logit SQNR {row['sqnr_db']:.1f} dB "
            f"({time.perf_counter() - started:.0f}s)")
    return rows


# --- speed ------------------------------------------------------------------------------------
def calibration_images(count: int) -> torch.Tensor:
    from vitopt.data.folder import resolve_dataset
    images, _, _ = resolve_dataset("builtin:digits", "calib", 224, (0.485, 0.456, 0.406),
                                   (0.229, 0.224, 0.225), 3, limit=count)
    return images


def static_openvino_engine(xml: Path, batch: int):
    """The OpenVINO model `xml` compiled for exactly `batch` images (static input shape), with
    the same properties as vitopt's int8 engines."""
    import openvino as ov
    from vitopt.backends.openvino import DEVICE, OpenVINOBackend, OpenVINOEngine
    core = ov.Core()
    model = core.read_model(str(xml))
    shape = model.inputs[0].get_partial_shape()
    shape[0] = batch
    model.reshape({model.inputs[0]: shape})
    return OpenVINOEngine(core.compile_model(model, DEVICE, OpenVINOBackend().config("int8")), "int8")


def nncf_engine(plain_onnx: Path, calib: torch.Tensor, out: Path, max_batch: int):
    import nncf
    import openvino as ov
    from vitopt.backends import get_backend
    backend = get_backend("openvino")
    files = backend.build(plain_onnx, out / "plain", precision="fp32", max_batch=max_batch)
    model = ov.Core().read_model(str(out / "plain" / files[0]))
    dataset = nncf.Dataset([calib[i:i + 1].numpy() for i in range(calib.shape[0])])
    quantized = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=calib.shape[0])
    (out / "nncf").mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(out / "nncf" / "model.xml"), compress_to_fp16=False)
    return backend.load(out / "nncf", ["model.xml", "model.bin"], precision="int8"), out / "nncf" / "model.xml"


def ort_static_engine(plain_onnx: Path, calib: torch.Tensor, out: Path, max_batch: int):
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"images": calib[i:i + 1].numpy()} for i in range(calib.shape[0])])

        def get_next(self):
            return next(self.items, None)

    out.mkdir(parents=True, exist_ok=True)
    path = out / "ort_qdq.onnx"
    quantize_static(str(plain_onnx), str(path), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return load_onnx(path, out / "engine", "onnxruntime", "int8", max_batch)


def speed(model_name, batches, backends, calib_count, runs, rounds, tmp: Path, log,
          lock=None) -> tuple:
    import timm
    from vitopt.backends.openvino import int8_summary
    from vitopt.frontend.trace import trace
    from vitopt.lower.onnx_export import export_onnx
    from vitopt.pipeline import PassContext, PassSpec, Pipeline, resolve_pipeline

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    calib = calibration_images(calib_count)
    max_batch = max(batches)
    started = time.perf_counter()
    plain = export_onnx(model, torch.randn(2, 3, 224, 224), tmp / "plain.onnx")
    ir = trace(model, torch.randn(2, 3, 224, 224))
    specs = resolve_pipeline("lossless", ["quantize_int8"])
    quantized = Pipeline(specs).run(ir, context=PassContext(calib=calib, calib_source="digits@224")).ir
    vitopt_onnx = export_onnx(quantized, torch.randn(2, 3, 224, 224), tmp / "vitopt_int8.onnx")
    # int8 after token merging: calibrated on the already-reduced IR, as the pipeline orders it.
    merged = Pipeline(resolve_pipeline("balanced", ["quantize_int8"])).run(
        ir, context=PassContext(calib=calib, calib_source="digits@224")).ir
    merged_onnx = export_onnx(merged, torch.randn(2, 3, 224, 224), tmp / "vitopt_int8_balanced.onnx")
    # the same with float attention (attention=float; the default is int8 q.K^T), OpenVINO only
    merged_fa = Pipeline(resolve_pipeline("balanced", ["quantize_int8:attention=float"])).run(
        ir, context=PassContext(calib=calib, calib_source="digits@224")).ir
    merged_fa_onnx = export_onnx(merged_fa, torch.randn(2, 3, 224, 224), tmp / "vitopt_int8_fa_balanced.onnx")
    log(f"{model_name}: traced, quantized (vitopt) and exported in {time.perf_counter() - started:.0f}s")
    engines, kernels, static, references = {}, {}, {}, {}
    if "openvino" in backends:
        nncf, nncf_xml = nncf_engine(plain, calib, tmp / "ov_nncf", max_batch)
        vitopt, vitopt_xml = load_onnx(vitopt_onnx, tmp / "ov_vitopt", "openvino", "int8", max_batch)
        merged_engine, merged_xml = load_onnx(merged_onnx, tmp / "ov_vitopt_merged", "openvino",
                                              "int8", max_batch)
        merged_fa_engine, merged_fa_xml = load_onnx(merged_fa_onnx, tmp / "ov_vitopt_fa_merged",
                                                    "openvino", "int8", max_batch)
        engines["openvino"] = {
            "OV bf16 (plain)": load_onnx(plain, tmp / "ov_bf16", "openvino", "bf16", max_batch)[0],
            "OV vitopt int8": vitopt, "OV NNCF int8": nncf, "OV vitopt int8 + balanced": merged_engine,
            "OV vitopt int8 + balanced, float attention": merged_fa_engine}
        static = {"OV vitopt int8": vitopt_xml, "OV NNCF int8": nncf_xml,
                  "OV vitopt int8 + balanced": merged_xml,
                  "OV vitopt int8 + balanced, float attention": merged_fa_xml}
        references = {f"{name} (dynamic batch)": engines["openvino"][name]
                      for name in ("OV NNCF int8", "OV vitopt int8 + balanced")}
        for name, engine in engines["openvino"].items():
            kernels[name] = int8_summary(engine)
            log(f"{name}: {kernels[name]}")
    if "onnxruntime" in backends:
        engines["onnxruntime"] = {
            "ORT fp32 (plain)": load_onnx(plain, tmp / "ort_fp32", "onnxruntime", "fp32", max_batch)[0],
            "ORT vitopt int8": load_onnx(vitopt_onnx, tmp / "ort_vitopt", "onnxruntime", "int8", max_batch)[0],
            "ORT quantize_static int8": ort_static_engine(plain, calib, tmp / "ort_static", max_batch)[0],
            "ORT vitopt int8 + balanced": load_onnx(merged_onnx, tmp / "ort_vitopt_merged", "onnxruntime",
                                                    "int8", max_batch)[0]}
    log(f"built engines in {time.perf_counter() - started:.0f}s")
    with timing_lock(lock):
        return time_engines(model_name, engines, kernels, static, references, batches, runs,
                            rounds, log)


def timing_lock(path):
    """Hold an exclusive flock on `path` while timing (no lock when path is None): the builds
    above need no lock, so other benchmarks are not kept waiting for them."""
    import contextlib
    if path is None:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def held():
        import fcntl
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    return held()


def time_engines(model_name, engines, kernels, static, references, batches, runs, rounds,
                 log) -> tuple:
    """Time each backend's engines per batch in interleaved rounds; `static` ({name: OpenVINO
    xml}) adds the "openvino static" group, compiled for each batch in turn, with the
    dynamic-batch `references` ({name: engine}) timed in the same rounds. Returns (rows, bars):
    a row per engine and batch, and the issue-4 bar's ratios."""
    rows, bars = [], []
    for backend_name, group in engines.items():
        for batch in batches:
            more, bar = time_group(model_name, backend_name, group, kernels, batch, runs, rounds, log)
            rows += more
            bars += bar
    for batch in batches if static else ():
        group = {f"{name} (static)": static_openvino_engine(xml, batch) for name, xml in static.items()}
        group.update(references)
        more, bar = time_group(model_name, "openvino static", group, {}, batch, runs, rounds, log)
        rows += more
        bars += bar
    return rows, bars


def time_group(model_name, backend_name, group, kernels, batch, runs, rounds, log) -> tuple:
    """Rows for one group of engines at one batch, timed in interleaved rounds; the ratios are
    against the group's fastest non-vitopt engine: of the medians, and paired by round
    (vitopt.timing.paired_ratio: the median of per-round ratios, robust to drift). Also returns
    the issue-4 bar's ratios that this group's engines give (`bar_ratios`)."""
    from vitopt.timing import measure_rounds, paired_ratio, summarize_rounds
    images = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    by_round = measure_rounds({n: (lambda e=e: e.run(images)) for n, e in group.items()},
                              warmup=WARMUP, runs=runs, rounds=rounds)
    times = summarize_rounds(by_round, WARMUP)
    base = min((n for n in group if "vitopt" not in n), key=lambda n: times[n].median_ms)
    rows = []
    for name, t in times.items():
        paired = paired_ratio(by_round[name], by_round[base])
        rows.append({"model": model_name, "backend": backend_name, "engine": name, "batch": batch,
                     "median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms,
                     "samples": t.runs, "kernels": kernels.get(name),
                     "vs_best_peer": t.median_ms / times[base].median_ms,
                     "paired_vs_best_peer": paired["median"],
                     "paired_vs_best_peer_p10_p90": [paired["p10"], paired["p90"]]})
        log(f"{name} batch {batch}: {t.median_ms:.1f} ms (p10-p90 {t.p10_ms:.1f}-{t.p90_ms:.1f})")
    bars = bar_ratios(backend_name, times, by_round, batch)
    for bar in bars:
        log(f"issue-4 bar, batch {batch}, {bar['comparison']}: {bar['nncf']} / {bar['vitopt']} = "
            f"{bar['ratio_of_medians']:.2f}x (ratio of medians), {bar['paired']:.2f}x paired by "
            f"round (p10-p90 {bar['paired_p10']:.2f}-{bar['paired_p90']:.2f}); must be >= 2")
    return rows, bars


BAR_NNCF, BAR_VITOPT = "OV NNCF int8", "OV vitopt int8 + balanced"


def bar_ratios(backend_name, times, by_round, batch) -> list:
    """The issue-4 bar (NNCF int8 of the plain model / vitopt int8 + balanced merging) from one
    group's timings: dynamic vs dynamic ("openvino"), or static vs static and the faster setup
    of each ("openvino static", which also times the dynamic-batch engines)."""
    from vitopt.timing import paired_ratio
    if backend_name == "openvino":
        pairs = [("dynamic batch", BAR_NNCF, BAR_VITOPT)]
    elif backend_name == "openvino static":
        def best(name):
            return min((n for n in times if n in (f"{name} (static)", f"{name} (dynamic batch)")),
                       key=lambda n: times[n].median_ms, default=None)
        pairs = [("static batch", f"{BAR_NNCF} (static)", f"{BAR_VITOPT} (static)"),
                 ("faster setup of each", best(BAR_NNCF), best(BAR_VITOPT))]
    else:
        return []
    bars = []
    for comparison, nncf, vitopt in pairs:
        if nncf not in times or vitopt not in times:
            continue
        paired = paired_ratio(by_round[nncf], by_round[vitopt])
        bars.append({"comparison": comparison, "batch": batch, "nncf": nncf, "vitopt": vitopt,
                     "ratio_of_medians": times[nncf].median_ms / times[vitopt].median_ms,
                     "paired": paired["median"], "paired_p10": paired["p10"],
                     "paired_p90": paired["p90"], "rounds": paired["rounds"]})
    return bars


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", action="store_true", help="also time DeiT-S/16 engines")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--engine-accuracy", action="store_true",
                        help="proxy top-1 on the OpenVINO and ORT int8 engines too")
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--speed-backends", default="openvino,onnxruntime")
    parser.add_argument("--calib-images", type=int, default=32)
    # Few runs per round and many rounds: drift on this shared host then hits every engine
    # alike (3 x 12 = 36 samples per engine and batch).
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--lock", default=None,
                        help="build first, then time while holding this flock file (instead of "
                             "running the whole script under `flock FILE`), e.g. "
                             "/tmp/vitopt-bench.lock")
    args = parser.parse_args(argv)
    batches = sorted(int(b) for b in args.batches.split(","))

    def log(message):
        print(message, flush=True)

    with tempfile.TemporaryDirectory(prefix="vitopt-quant-bench-") as tmp:
        tmp = Path(tmp)
        acc = [] if args.skip_accuracy else accuracy(args.engine_accuracy, tmp, log)
        timing, bars = (speed(args.model, batches, args.speed_backends.split(","),
                              args.calib_images, args.runs, args.rounds, tmp, log, args.lock)
                        if args.speed else ([], []))
    md = "# int8 quantization: vitopt vs naive min/max (digits proxy) and DeiT-S speed\n\n"
    md += f"Command: `python benchmarks/quantization.py {' '.join(argv or sys.argv[1:])}`\n\n"
    if acc:
        md += ("Proxy: builtin:digits-vit (a PROXY, not ImageNet), calibrated on `calib` (180 images), "
               "top-1 on held-out `test` (360 images), reference executor (fake quant).\n\n")
        md += markdown_table(acc, [("model", "model", "{}"), ("setting", "setting", "{}"), ("top1", "top-1", "{:.4f}"),
                                   ("top1_openvino", "top-1 OV int8", "{:.4f}"),
                                   ("top1_onnxruntime", "top-1 ORT int8", "{:.4f}"),
                                   ("sqnr_db", "logit SQNR dB", "{:.1f}"),
                                   ("agree", "agrees with fp32", "{:.4f}"),
                                   ("min_layer_sqnr_db", "worst layer SQNR dB", "{:.1f}")]) + "\n"
    if timing:
        md += (f"Speed: {args.model} random init, medians of {args.runs} runs x {args.rounds} "
               f"interleaved rounds, same run; time ratio vs the best non-vitopt engine of that "
               f"backend (< 1: faster), of the medians and paired by round (median of the "
               f"per-round ratios).\n\n")
        md += markdown_table(timing, [("backend", "backend", "{}"), ("engine", "engine", "{}"),
                                      ("batch", "batch", "{}"), ("median_ms", "median ms", "{:.1f}"),
                                      ("p10_ms", "p10", "{:.1f}"), ("p90_ms", "p90", "{:.1f}"),
                                      ("vs_best_peer", "vs best peer", "x{:.2f}"),
                                      ("paired_vs_best_peer", "paired by round", "x{:.2f}")])
    if bars:
        md += ("\nThe issue-4 bar: OpenVINO + NNCF int8 of the plain model / vitopt int8 + balanced "
               "merging, must be >= 2 at batch 8 (paired: median and p10-p90 of the per-round "
               "ratios).\n\n")
        md += markdown_table(bars, [("comparison", "engines", "{}"), ("batch", "batch", "{}"),
                                    ("nncf", "NNCF engine", "{}"), ("vitopt", "vitopt engine", "{}"),
                                    ("ratio_of_medians", "ratio of medians", "{:.2f}x"),
                                    ("paired", "paired", "{:.2f}x"),
                                    ("paired_p10", "p10", "{:.2f}"), ("paired_p90", "p90", "{:.2f}")])
    stem = "quantization" + ("_speed" if timing and not acc else "")
    out = write_results(stem, acc + timing, md, {"args": vars(args), "issue4_bar": bars})
    print(md)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
