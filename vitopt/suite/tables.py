"""Markdown from suite results: the per-model tables, the headline table, and the README's
headline section (regenerated between markers from a results file, never typed by hand)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from vitopt.errors import ConfigError

README_START = "<!-- bench:headline:start -->"
README_END = "<!-- bench:headline:end -->"
HEADLINE_PEERS = (("torch-eager-fp32", "torch eager fp32"), ("ov-bf16", "OpenVINO bf16"),
                  ("ov-nncf-int8", "OpenVINO + NNCF int8"))


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _table(rows: List[dict], columns: List[Tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(key), fmt) for key, _, fmt in columns) + " |"
            for r in rows]
    return "\n".join([head, rule, *body]) + "\n"


def _by(records: List[dict], *keys) -> Dict[tuple, List[dict]]:
    groups: Dict[tuple, List[dict]] = {}
    for record in records:
        groups.setdefault(tuple(record[k] for k in keys), []).append(record)
    return groups


def _median(record: dict) -> Optional[float]:
    return record["latency_ms"]["median"] if record["status"] == "ok" else None


def _flat(record: dict) -> dict:
    lat = record["latency_ms"] or {}
    return {**record, "median": lat.get("median"),
            "spread": f"{lat['p10']:.2f}-{lat['p90']:.2f}" if lat else None,
            "size_mb": record["artifact_bytes"] / 2**20 if record["artifact_bytes"] else None,
            "status_text": "ok" if record["status"] == "ok" else f"error: {record['error']}"}


CELL_COLUMNS = [("cell", "cell", "{}"), ("engine", "engine", "{}"), ("precision", "precision", "{}"),
                ("median", "median ms", "{:.2f}"), ("spread", "p10-p90", "{}"),
                ("throughput_ips", "images/s", "{:.1f}"),
                ("speedup_vs_best_peer", "vs best peer", "{:.2f}x"),
                ("speedup_vs_torch_eager", "vs torch eager", "{:.2f}x"),
                ("compile_s", "compile s", "{:.1f}"), ("size_mb", "size MB", "{:.1f}"),
                ("rss_delta_mb", "RSS delta MB", "{:.0f}"),
                ("gflops_per_image", "GFLOPs/img", "{:.3f}"),
                ("cosine_vs_eager", "cosine vs eager", "{:.4f}"), ("top1", "top-1 (proxy)", "{:.4f}")]


def results_markdown(doc: dict) -> str:
    """The whole report: headline, then per model and batch every cell, then how each was set up."""
    suite, machine, method = doc["suite"], doc["machine"], doc["method"]
    cpu = machine["cpu"]
    gpu = machine.get("gpu")
    lines = [f"# vitopt benchmark suite: {suite['name']}", "",
             suite["description"], "",
             f"Command: `{suite['command']}` ({suite['seconds']:.0f} s)", "",
             f"Machine: {cpu['model']}, {cpu['cores_available']} cores available "
             f"(ISA: {', '.join(cpu['isa_flags'])}), {cpu['memory_gb']} GB"
             + (f"; GPU {gpu['name']} (driver {gpu.get('driver', '?')}, CUDA {gpu.get('cuda')})"
                if gpu else "") + f"; {machine['threads']} threads for every engine; "
             f"{machine['date']}. A shared, contended machine: compare ratios within one run.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v), "",
             f"Method: {method['warmup']} warm-up calls, then {method['runs_per_round']} timed "
             f"calls x {method['rounds']} rounds per cell (interleaved: {method['interleaved']}); "
             f"{method['statistic']}. Memory: {method['memory']}. FLOPs: {method['flops']}. "
             f"Accuracy: {method['accuracy']}. Calibration: {method['calibration']}."
             + (f" Isolation: {method['isolation']}." if method.get("isolation") else ""), "",
             *([] if suite.get("complete", True) else
               ["**Partial results: this run had not finished when this file was written "
                "(it was still running, or it was killed).**", ""]),
             "## Headline", "", headline_markdown(doc["records"]), ""]
    for (model,), records in _by(doc["records"], "model").items():
        lines += [f"## {model}", "", records[0]["model_description"], ""]
        for (batch,), rows in _by(records, "batch").items():
            ok = sorted((r for r in rows if r["status"] == "ok"), key=_median)
            failed = [r for r in rows if r["status"] != "ok"]
            lines += [f"### batch {batch}", "", _table([_flat(r) for r in ok], CELL_COLUMNS)]
            lines += [f"- {r['cell']}: **error**: {r['error']}" for r in failed]
            lines.append("")
        lines += ["How each cell was set up:", ""]
        seen = set()
        for r in records:
            if r["cell"] not in seen and r["how"]:
                seen.add(r["cell"])
                lines.append(f"- `{r['cell']}` ({r['engine']} {r['engine_version']}): {r['how']}")
        lines.append("")
    return "\n".join(lines)


def best_preset(rows: List[dict]) -> Optional[dict]:
    """vitopt's fastest preset cell (config_kind preset) that ran."""
    presets = [r for r in rows if r["kind"] == "vitopt" and r["config_kind"] == "preset"
               and r["status"] == "ok"]
    return min(presets, key=_median) if presets else None


def _exact_passes() -> set:
    """The registered exact passes (fuse_qkv, fold_layer_scale, trim_last_block, ...)."""
    from vitopt.pipeline import registry
    return {name for name, info in registry().items() if info.exact}


def _without_token_reduction(rows: List[dict]) -> List[dict]:
    """vitopt cells whose passes are all exact, apart from int8 quantization."""
    exact = _exact_passes() | {"quantize_int8"}
    return [r for r in rows if r["kind"] == "vitopt" and r["status"] == "ok"
            and set(r["passes_applied"] or ()) <= exact]


def headline_rows(records: List[dict]) -> List[dict]:
    rows = []
    for (model, batch), group in _by(records, "model", "batch").items():
        cells = {r["cell"]: r for r in group}
        best = best_preset(group)
        plain = min(_without_token_reduction(group), key=_median, default=None)
        peer = next((cells[r["best_peer"]] for r in group if r["best_peer"] in cells), None)
        row = {"model": model, "batch": batch,
               "best_peer": f"{peer['cell']} {peer['latency_ms']['median']:.2f}" if peer else None,
               "vitopt": (f"{best['cell']} {best['latency_ms']['median']:.2f}" if best else None),
               "ratio": best["speedup_vs_best_peer"] if best else None,
               "plain": (f"{plain['cell']} {plain['latency_ms']['median']:.2f} "
                         f"({plain['speedup_vs_best_peer']:.2f}x)" if plain else None),
               "top1": (f"{best['top1']:.4f}" if best and best["top1"] is not None else None)}
        for name, _ in HEADLINE_PEERS:
            record = cells.get(name)
            row[name] = _median(record) if record else None
        rows.append(row)
    return rows


def headline_markdown(records: List[dict]) -> str:
    columns = [("model", "model", "{}"), ("batch", "batch", "{}")]
    columns += [(name, f"{title} ms", "{:.2f}") for name, title in HEADLINE_PEERS]
    columns += [("best_peer", "best peer, ms", "{}"), ("vitopt", "vitopt best preset, ms", "{}"),
                ("ratio", "vitopt best / best peer (speed-up)", "{:.2f}x"),
                ("top1", "vitopt best top-1 (proxy)", "{}"),
                ("plain", "vitopt best without token reduction, ms (speed-up)", "{}")]
    return (_table(headline_rows(records), columns) +
            "\nMedian latency per call (whole batch). Speed-up = best peer's median / vitopt's "
            "best preset's median, measured in the same interleaved run (> 1: vitopt is faster). "
            "`balanced`/`fast` merge tokens and int8 quantizes (both lossy): see top-1 on the digits "
            "proxy; the last column leaves token reduction out (exact passes, any precision).\n")


def _load_text(machine: dict) -> str:
    load = machine.get("load_average")
    return f" (load average {load[0]:.1f} on {machine['cpu']['cores_available']} cores at the start)" if load else ""


def update_readme(readme: Union[str, Path], results: Union[str, Path],
                  repo_root: Optional[Union[str, Path]] = None) -> str:
    """Replace the README's headline section (between the markers) with the table made from
    the results file `results` (suite.json); returns the new section."""
    readme, results = Path(readme), Path(results)
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ConfigError(f"{readme} has no headline markers; add the lines {README_START} and "
                          f"{README_END} where the table should go")
    doc = json.loads(results.read_text())
    shown = results
    if repo_root is not None:
        shown = results.resolve().relative_to(Path(repo_root).resolve())
    machine = doc["machine"]
    section = (f"{README_START}\n"
               f"Generated from `{shown}` by `python benchmarks/suite.py --update-readme "
               f"{readme.name} --from {shown}` (do not edit by hand). {machine['cpu']['model']}, "
               f"{machine['threads']} threads, {machine['date'][:10]}; command: "
               f"`{doc['suite']['command']}`. Taken on a shared machine while other work ran"
               f"{_load_text(machine)}: absolute times are inflated and noisy; the ratios come "
               f"from interleaved timing in one run.\n\n{headline_markdown(doc['records'])}"
               f"{README_END}")
    before, rest = text.split(README_START, 1)
    after = rest.split(README_END, 1)[1]
    readme.write_text(before + section + after)
    return section
