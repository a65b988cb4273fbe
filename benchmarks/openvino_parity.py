"""vitopt's OpenVINO engine vs OpenVINO on the plain torch-exported ONNX of the same model.

Issue 2's bar: with no lossy passes, vitopt's engine is within 10 % of the plain export,
fp32 and bf16, at batch 1 and 8, DeiT-S/16 224 (random init: static passes do not care).
Both engines get the same OpenVINO properties (precision hint, LATENCY hint) and the
same images; timings are interleaved rounds (see vitopt.timing.measure_interleaved).

    python benchmarks/openvino_parity.py [--model deit_small_patch16_224] [--runs 10 --rounds 3]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, write_results  # noqa: E402


def plain_onnx(model, path: Path) -> Path:
    """What a user would do without vitopt: torch.onnx.export(dynamo=True) of the model itself."""
    from vitopt.lower.onnx_export import export_onnx
    return export_onnx(model, torch.randn(2, 3, 224, 224), path)


def openvino_engine(onnx_path: Path, out: Path, precision: str, max_batch: int):
    from vitopt.backends import get_backend
    backend = get_backend("openvino")
    files = backend.build(onnx_path, out, precision=precision, max_batch=max_batch)
    return backend.load(out, files, precision=precision)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    import timm
    import vitopt
    from vitopt.timing import measure_interleaved

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    batches = [int(b) for b in args.batches.split(",")]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        onnx_path = plain_onnx(model, tmp / "plain.onnx")
        for precision in ("fp32", "bf16"):
            peer = openvino_engine(onnx_path, tmp / f"peer-{precision}", precision, max(batches))
            artifact = tmp / f"vitopt-{precision}.vitopt"
            vitopt.compile(model, artifact, backend="openvino", precision=precision, preset="lossless",
                           max_batch=max(batches), measure=False, image_size=224)
            ours = vitopt.load(artifact).engine
            for batch in batches:
                images = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224)).astype(np.float32)
                timings = measure_interleaved({"peer": lambda: peer.run(images),
                                               "vitopt": lambda: ours.run(images)},
                                              runs=args.runs, rounds=args.rounds)
                ratio = timings["vitopt"].median_ms / timings["peer"].median_ms
                records.append({"model": args.model, "precision": precision, "batch": batch,
                                "plain_onnx_openvino_ms": timings["peer"].median_ms,
                                "plain_p10_p90": [timings["peer"].p10_ms, timings["peer"].p90_ms],
                                "vitopt_openvino_ms": timings["vitopt"].median_ms,
                                "vitopt_p10_p90": [timings["vitopt"].p10_ms, timings["vitopt"].p90_ms],
                                "samples": timings["vitopt"].runs, "vitopt_over_plain": ratio,
                                "within_10_percent": ratio <= 1.10})
                print(f"{precision} batch {batch}: plain {timings['peer'].median_ms:.1f} ms, "
                      f"vitopt {timings['vitopt'].median_ms:.1f} ms, ratio {ratio:.3f}", flush=True)
    table = markdown_table(records, [
        ("precision", "precision", "{}"), ("batch", "batch", "{}"),
        ("plain_onnx_openvino_ms", "plain ONNX on OpenVINO (ms)", "{:.1f}"),
        ("vitopt_openvino_ms", "vitopt engine (ms)", "{:.1f}"),
        ("vitopt_over_plain", "vitopt / plain", "{:.3f}"), ("within_10_percent", "within 10 %", "{}")])
    md = (f"# vitopt engine vs plain torch-exported ONNX, both on OpenVINO\n\n"
          f"Model {args.model} (random init), preset `lossless`, medians of {records[0]['samples']} "
          f"runs in {args.rounds} interleaved rounds after warm-up.\n"
          f"Command: `python benchmarks/openvino_parity.py`\n\n{table}")
    out = write_results("openvino_parity", records, md)
    print(md)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
