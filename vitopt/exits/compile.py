"""The compile steps for early exits, called by vitopt.compiler in its straight line:

    plan_exits        --train / --exit-rule add or configure the insert_exit_heads pass
    run_passes        the pipeline up to insert_exit_heads, head training, then the rest
                      (so quantize_int8 and anything after it see trained heads)
    calibrate         thresholds on the calibration split, on the final IR
    build             one engine per segment -> a SegmentedEngine
    check             the engine never exiting vs the IR (tolerance table), and each exit's
                      logits vs the IR's heads
    manifest_entry    what the artifact records (segments, rule, thresholds, distributions)
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from vitopt.errors import ConfigError
from vitopt.ir.exits import exit_stages

PASS = "insert_exit_heads"
HEADS_FILE = "exit_heads.safetensors"


def plan_exits(specs: list, train: Optional[str], rule: Optional[str]) -> list:
    """Add insert_exit_heads (before quantize_int8) when --train or --exit-rule asks for exits."""
    from vitopt.pipeline import PassSpec
    has = any(s.name == PASS for s in specs)
    if not has and (train or rule):
        at = next((i for i, s in enumerate(specs) if s.name == "quantize_int8"), len(specs))
        specs = specs[:at] + [PassSpec(PASS)] + specs[at:]
    if rule:
        specs = [PassSpec(s.name, {**s.options, "rule": rule}) if s.name == PASS else s for s in specs]
    for spec in specs:
        spec.config()
    return specs


def run_passes(specs: list, ir, options, context, log):
    """Run the pipeline; when it inserts exits, train them (on --train) right after that pass."""
    from vitopt.pipeline import Pipeline, PipelineResult
    at = next((i for i, s in enumerate(specs) if s.name == PASS), None)
    if at is None:
        return Pipeline(specs).run(ir, dump_dir=options.dump_ir, log=log, context=context), None
    first = Pipeline(specs[:at + 1]).run(ir, dump_dir=options.dump_ir, log=log, context=context)
    training = None
    if exit_stages(first.ir):
        if not options.train:
            raise ConfigError("exit heads need training data: give --train builtin:digits or a "
                              "folder of class subfolders (train/ and calib/ when it has splits)")
        from vitopt.exits.data import exit_datasets
        from vitopt.exits.train import train_heads
        (images, labels), _ = exit_datasets(options.train, first.ir.meta,
                                            exit_stages(first.ir)[0].num_classes)
        training = train_heads(first.ir, images, labels, epochs=options.exit_epochs,
                               seed=options.exit_seed, log=log)
        training["data"] = options.train
    dump = str(Path(options.dump_ir) / "after_exit_training") if options.dump_ir else None
    rest = Pipeline(specs[at + 1:]).run(first.ir, dump_dir=dump, log=log, context=context)
    return PipelineResult(rest.ir, first.records + rest.records), training


def calibrate(ir, options, log) -> dict:
    from vitopt.exits.calibrate import calibrate_thresholds
    from vitopt.exits.data import exit_datasets
    _, (images, labels) = exit_datasets(options.train, ir.meta, exit_stages(ir)[0].num_classes)
    result = calibrate_thresholds(ir, images, labels, options.exit_accuracy_drop)
    result["data"] = f"{options.train} (calibration split)"
    if all(h.fixed_threshold for h in exit_stages(ir)):
        log("exit thresholds were given to insert_exit_heads: kept, not calibrated")
    log(f"exit thresholds ({result['rule']}) {[round(t, 4) for t in result['thresholds']]} on "
        f"{result['images']} calibration images: compute {result['compute_fraction']:.1%} of the "
        f"model, {result['changed_points']:.2f} points of predictions changed (budget "
        f"{options.exit_accuracy_drop}), exits taken {_fractions(result['distribution'])}")
    return result


def build(ir, backend, example, build_dir: Path, precision: str, options, log):
    """(SegmentedEngine, every engine file name, segment records)."""
    from vitopt.exits.lower import build_segment_engines
    from vitopt.exits.segments import heads_config
    from vitopt.segmented import SegmentedEngine
    segments, _ = build_segment_engines(ir, backend, example, build_dir, precision=precision,
                                        max_batch=options.max_batch, threads=options.threads, log=log)
    engines = [backend.load(build_dir, s["files"], precision=precision, threads=options.threads)
               for s in segments]
    rule, thresholds = heads_config(ir)
    files = [f for s in segments for f in s["files"]]
    return SegmentedEngine(engines, rule, thresholds), files, segments


def check(ir, engine, example: torch.Tensor, precision: str, backend_name: str, log):
    """The engine with never-exit thresholds against the IR's output (the model without
    exits), and every exit's logits against the IR's heads, with the tolerance table."""
    from vitopt.exits.segments import all_exit_logits
    from vitopt.tolerances import require_close
    exits, final, _ = all_exit_logits(ir, example)
    array = example.numpy()
    result = require_close(engine.never_exiting().run(array), final.numpy(), precision,
                           backend_name, what=f"the segmented {backend_name} {precision} engine")
    for k, (actual, expected) in enumerate(zip(engine.run_all_exits(array), exits)):
        require_close(actual, expected.numpy(), precision, backend_name,
                      what=f"exit {k} of the segmented {backend_name} {precision} engine")
    log(f"segmented engine matches the IR (never exiting, and every exit's logits): max abs "
        f"diff {result.max_abs:.2e}, cosine {result.cos_sim:.6f}")
    return result


def eval_distribution(ir, engine, options) -> Optional[dict]:
    """Exit distribution and top-1 of the deployed engine on the --eval data (held out)."""
    if not options.eval:
        return None
    from vitopt.data.folder import resolve_dataset
    meta = ir.meta
    images, labels, _ = resolve_dataset(options.eval, "test", meta.image_size[0], meta.mean,
                                        meta.std, meta.in_chans, limit=options.eval_limit)
    outputs, taken = [], []
    for start in range(0, images.shape[0], options.max_batch):
        out, exits = engine.run_with_exits(images[start:start + options.max_batch].numpy())
        outputs.append(out)
        taken.append(exits)
    taken = np.concatenate(taken)
    from vitopt.exits.segments import compute_per_exit
    costs, total = compute_per_exit(ir)
    counts = np.bincount(taken, minlength=len(engine.engines))
    return {"data": options.eval, "images": int(len(taken)),
            "top1": float((np.concatenate(outputs).argmax(1) == labels.numpy()).mean()),
            "distribution": (counts / len(taken)).tolist(),
            "compute_fraction": float((np.asarray(costs)[taken] / total).mean())}


def heads_file(ir) -> bytes:
    """The trained heads' weights (safetensors), keyed exit{k}.<parameter>."""
    from safetensors.torch import save
    tensors = {f"exit{k}.{name}": value.detach().contiguous().clone()
               for k, head in enumerate(exit_stages(ir)) for name, value in head.state_dict().items()}
    return save(tensors)


def manifest_entry(ir, segments: List[dict], calibration: dict, training: Optional[dict],
                   evaluation: Optional[dict]) -> dict:
    from vitopt.exits.segments import compute_per_exit, heads_config
    rule, thresholds = heads_config(ir)
    costs, total = compute_per_exit(ir)
    return {"rule": rule, "thresholds": thresholds,
            "heads": [{"block": h.block, "kind": h.head, "pool": h.pool, "classes": h.num_classes}
                      for h in exit_stages(ir)],
            "heads_file": HEADS_FILE, "segments": segments,
            "compute_per_exit": [c / total for c in costs], "calibration": calibration,
            "training": training, "eval": evaluation}


def _fractions(values) -> str:
    return " / ".join(f"{v:.0%}" for v in values)


def verify_int8(backend_name: str, engine, build_dir: Path, segments: List[dict], ir, log) -> dict:
    """vitopt.compiler.verify_int8 over every segment engine: the quantized linears of the
    whole IR must run int8 kernels somewhere in the segments."""
    from vitopt.errors import LoweringError
    from vitopt.ir.quant import quant_layers
    expected, found, floats = len(quant_layers(ir)), 0, 0
    for segment, part in zip(segments, engine.engines):
        if backend_name == "openvino":
            from vitopt.backends.openvino import int8_summary
            summary = int8_summary(part)
        elif backend_name == "onnxruntime":
            from vitopt.backends.onnxruntime import int8_summary
            summary = int8_summary(build_dir / next(f for f in segment["files"] if f.endswith(".onnx")))
        else:
            raise ConfigError(f"vitopt cannot check int8 kernels on {backend_name}; use openvino "
                              f"or onnxruntime for --precision int8")
        found, floats = found + summary["int8_linears"], floats + summary["float_linears"]
    if found < expected:
        raise LoweringError(f"{backend_name} runs only {found} of the {expected} quantized linears "
                            f"of the segments in int8; the rest fell back to float. Compile with "
                            f"--precision fp32/bf16")
    log(f"int8 check: {backend_name} runs {found} linears in int8 over {len(segments)} segments "
        f"({floats} float: heads, attention matmuls)")
    return {"int8_linears": found, "float_linears": floats, "segments": len(segments)}
