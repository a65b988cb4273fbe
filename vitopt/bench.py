"""`vitopt bench`: an artifact's engine against its source model in eager PyTorch, same run.

Both sides get the same images and the same number of warm-up and timed runs; the table
shows medians, the p10-p90 spread and the ratio. The source model is re-loaded from the
spec recorded in the manifest (or `--model`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from vitopt.errors import ConfigError
from vitopt.ir.printer import format_table
from vitopt.timing import Timing, measure


@dataclass
class BenchRow:
    batch: int
    eager: Timing
    engine: Timing

    @property
    def speedup(self) -> float:
        return self.eager.median_ms / self.engine.median_ms


def bench_artifact(path: str, *, batches: Sequence[int] = (1, 8), runs: int = 20,
                   model: Optional[str] = None, threads: Optional[int] = None,
                   log: Callable[[str], None] = lambda m: None) -> List[BenchRow]:
    import vitopt
    from vitopt.frontend.load import load_model
    from vitopt.frontend.trace import single_output

    runtime = vitopt.load(path, threads=threads)
    manifest = runtime.manifest
    spec = model or manifest.get("source", {}).get("spec")
    if not spec:
        raise ConfigError(f"{path} was compiled from a Python object, so vitopt cannot load its "
                          f"source model again; pass --model SPEC")
    options = (manifest.get("compile") or {}).get("options") or {}
    loaded = load_model(spec, arch=options.get("arch"), weights=options.get("weights"),
                        trust_pickle=bool(options.get("trust_pickle")))
    source = loaded.module if loaded.module is not None else loaded.exported.module()
    channels, height, width = runtime.input_shape
    probe = torch.randn(1, channels, height, width)
    source = single_output(source.eval(), probe, options.get("output"))[0]
    if threads:
        torch.set_num_threads(threads)
    rows = []
    for batch in batches:
        if batch < 1:
            raise ConfigError(f"batch sizes must be positive, got {batch}")
        images = torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(0))
        array = np.ascontiguousarray(images.numpy())
        with torch.no_grad():
            eager = measure(lambda: source(images), runs=runs)
        engine = measure(lambda: runtime(array), runs=runs)
        rows.append(BenchRow(batch, eager, engine))
        log(f"batch {batch}: eager {eager.median_ms:.2f} ms, engine {engine.median_ms:.2f} ms")
    return rows


def format_bench(rows: List[BenchRow]) -> str:
    table = [{"batch": r.batch, "eager": r.eager.median_ms, "engine": r.engine.median_ms,
              "eager_spread": f"{r.eager.p10_ms:.2f}-{r.eager.p90_ms:.2f}",
              "engine_spread": f"{r.engine.p10_ms:.2f}-{r.engine.p90_ms:.2f}",
              "speedup": r.speedup, "per_image": r.engine.median_ms / r.batch} for r in rows]
    return format_table(table, [
        ("batch", "batch", "{}"), ("eager", "eager torch ms", "{:.2f}"),
        ("eager_spread", "p10-p90", "{}"), ("engine", "engine ms", "{:.2f}"),
        ("engine_spread", "p10-p90", "{}"), ("per_image", "engine ms/image", "{:.2f}"),
        ("speedup", "speedup", "{:.2f}x")]) + f"\n(medians of {rows[0].engine.runs} runs after warm-up)" if rows else "no rows"
