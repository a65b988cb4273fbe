"""Human-readable reports: the end-of-compile summary and `vitopt inspect`."""
from __future__ import annotations

from typing import List, Optional

from vitopt.ir.printer import format_stage_rows, format_table


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def format_compile_report(report) -> str:
    m = report.manifest
    lines = [
        "",
        f"vitopt compile report: {m['source']['name']}",
        f"  artifact   {report.artifact}",
        f"  target     {m['target']}  backend {m['backend']['name']} {m['backend']['version']}  "
        f"precision {m['precision']}",
        f"  passes     {', '.join(p['name'] + ('' if p['modified'] else ' (declined)') for p in m['passes']) or 'none'}",
        f"  model      {m['model']['blocks']} blocks, tokens {m['token_schedule'][1]}, "
        f"{m['model']['gflops_per_image']:.2f} GFLOPs/image",
        f"  check      {m['checks']['cross_compiled']} (no engine check)" if m['checks'].get('cross_compiled') else
        f"  check      engine vs IR max abs diff {m['checks']['engine_vs_ir_max_abs']:.2e}, "
        f"cosine {m['checks']['engine_vs_ir_cosine']:.6f}",
    ]
    if report.accuracy_before is not None:
        change = (report.accuracy_after - report.accuracy_before) * 100
        lines.append(f"  accuracy   top-1 on {m['accuracy']['eval']} (held-out): "
                     f"{_pct(report.accuracy_before)} eager -> {_pct(report.accuracy_after)} engine "
                     f"({change:+.2f} points)")
    if m.get("exits"):
        from vitopt.exits.report import format_exits
        lines.extend(format_exits(m["exits"]))
    if report.latency:
        rows = [{"batch": r.batch, "eager": r.eager.median_ms if r.eager else None,
                 "engine": r.engine.median_ms, "spread": f"{r.engine.p10_ms:.2f}-{r.engine.p90_ms:.2f}",
                 "speedup": r.speedup} for r in report.latency]
        table = format_table(rows, [("batch", "batch", "{}"), ("eager", "eager torch ms", "{:.2f}"),
                                    ("engine", "engine ms", "{:.2f}"), ("spread", "engine p10-p90", "{}"),
                                    ("speedup", "speedup", "{:.2f}x")])
        lines.append("  latency    median of %d runs after warm-up, this machine:" % report.latency[0].engine.runs)
        lines.extend("    " + line for line in table.splitlines())
    lines.append(f"  time       {report.seconds:.1f}s")
    return "\n".join(lines) + "\n"


def format_manifest(manifest: dict, path: str) -> str:
    hw = manifest.get("hardware") or {}
    inp, out = manifest["input"], manifest["output"]
    lines = [
        f"artifact     {path}",
        f"format       v{manifest['format_version']}, vitopt {manifest.get('vitopt_version', '?')}, "
        f"created {manifest.get('created', '?')}",
        f"source       {manifest.get('source', {}).get('name')} (sha256 "
        f"{(manifest.get('source', {}).get('sha256') or '-')[:16]})",
        f"backend      {manifest['backend']['name']} {manifest['backend'].get('version', '')}, "
        f"precision {manifest['precision']}, target {manifest.get('target', '?')}",
        f"built on     {hw.get('cpu', '?')} ({hw.get('machine', '?')})",
        f"input        {inp['layout']} {inp['shape']} {inp['dtype']}, max batch {inp['max_batch']}, "
        f"mean {inp['mean']}, std {inp['std']}",
        f"output       {out['kind']}" + (f", {len(out['labels'])} labels" if out.get("labels") else ""),
        f"passes       " + (", ".join(p["name"] for p in manifest.get("passes", [])) or "none"),
    ]
    accuracy = manifest.get("accuracy") or {}
    if accuracy.get("after") is not None:
        lines.append(f"accuracy     {_pct(accuracy['before'])} -> {_pct(accuracy['after'])} top-1 on "
                     f"{accuracy['eval']}")
    for row in manifest.get("latency") or []:
        eager = row["eager"]["median_ms"] if row.get("eager") else None
        lines.append(f"latency      batch {row['batch']}: engine {row['engine']['median_ms']:.2f} ms"
                     + (f", eager torch {eager:.2f} ms" if eager else ""))
    if manifest.get("exits"):
        from vitopt.exits.report import format_exits
        lines.extend(line[2:] for line in format_exits(manifest["exits"], curve=False))
    quant = manifest.get("quantization")
    if quant:
        layers = quant.get("layers") or {}
        worst = min(layers.items(), key=lambda kv: kv[1]["sqnr_db"]) if layers else None
        lines.append(f"quantization int8 {quant.get('quantized')}/{len(layers)} linears, ranges by "
                     f"{quant.get('method')} on {quant.get('calib_images')} images "
                     f"({quant.get('calib_source')})"
                     + (f", lowest SQNR {worst[0]} {worst[1]['sqnr_db']:.1f} dB" if worst else ""))
        for name, why in (quant.get("fallback") or {}).items():
            lines.append(f"  kept fp32  {name}: {why}")
        engine = quant.get("engine") or {}
        lines.append(f"  engine     {engine.get('int8_linears')} int8 linears, "
                     f"{engine.get('float_linears')} float"
                     + (f", fused attention {engine['fused_attention']}"
                        if engine.get("fused_attention") else ""))
    stages: List[dict] = manifest.get("stages") or []
    if stages:
        lines += ["", format_stage_rows(stages)]
    lines += ["", "files        " + ", ".join(sorted(manifest["files"]))]
    return "\n".join(lines) + "\n"
