"""Report lines for early exits: rule and thresholds, exit distribution, accuracy/compute curve."""
from __future__ import annotations

from typing import List

from vitopt.ir.printer import format_table


def format_exits(entry: dict, curve: bool = True) -> List[str]:
    heads = ", ".join(f"block {h['block']} ({h['kind']})" for h in entry["heads"])
    names = [f"block {h['block']}" for h in entry["heads"]] + ["full"]
    cal = entry.get("calibration") or {}
    lines = [f"  exits      {len(entry['heads'])} heads after {heads}; rule {entry['rule']}, "
             f"thresholds {[round(t, 4) for t in entry['thresholds']]}; "
             f"{len(entry['segments'])} segment engines"]
    if cal:
        lines.append(f"             calibrated on {cal['images']} images of {cal.get('data', '?')}: "
                     f"budget {cal['budget_points']} points of changed predictions, "
                     f"{cal['changed_points']:.2f} used; compute {cal['compute_fraction']:.1%}")
        lines.append("             exits taken (calib): " + _dist(names, cal["distribution"]))
    ev = entry.get("eval")
    if ev:
        lines.append(f"             exits taken on {ev['images']} held-out images of {ev['data']}: "
                     + _dist(names, ev["distribution"])
                     + f"; compute {ev['compute_fraction']:.1%} of the model without exits "
                       f"({1 - ev['compute_fraction']:.1%} skipped)")
    if curve:
        lines.append("             (the latency table runs random probe images, on which exits "
                     "rarely fire; benchmarks/early_exit.py times real data)")
    if curve and cal.get("curve"):
        rows = [{"t": r["threshold"], "top1": 100 * r["top1"], "changed": 100 * r["changed"],
                 "compute": 100 * r["compute"]} for r in cal["curve"]]
        table = format_table(rows, [("t", "threshold", "{:.4g}"), ("top1", "top-1 %", "{:.2f}"),
                                    ("changed", "changed %", "{:.2f}"),
                                    ("compute", "compute %", "{:.1f}")])
        lines.append(f"             accuracy/compute on the calibration split (one threshold for "
                     f"every exit; the model without exits: {100 * cal['reference_top1']:.2f} %):")
        lines.extend("               " + line for line in table.splitlines())
    return lines


def _dist(names, values) -> str:
    return ", ".join(f"{n} {v:.1%}" for n, v in zip(names, values))
