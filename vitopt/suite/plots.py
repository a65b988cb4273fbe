"""PNG plots of suite results (matplotlib, Agg backend: no display needed).

  pareto_<model>_b<batch>.png   top-1 on the digits proxy vs latency for every cell of a proxy
                                model, the Pareto front (no other cell both faster and at least
                                as accurate) drawn as a line
  speedup.png                   per model and batch, each vitopt configuration's speed-up over
                                the best peer (a bar per configuration; 1.0 marked)
"""
from __future__ import annotations

from pathlib import Path
from typing import List

from vitopt.suite.tables import _by


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def pareto_front(points: List[tuple]) -> List[tuple]:
    """(latency, accuracy, ...) points not dominated by a faster-or-equal, more-or-equally
    accurate other point; sorted by latency."""
    front, best = [], float("-inf")
    for point in sorted(points, key=lambda p: (p[0], -p[1])):
        if point[1] > best:
            front.append(point)
            best = point[1]
    return front


def plot_pareto(records: List[dict], out: Path) -> List[Path]:
    plt = _pyplot()
    written = []
    for (model, batch), rows in _by([r for r in records if r["proxy"]], "model", "batch").items():
        points = [(r["latency_ms"]["median"], r["top1"], r["cell"], r["kind"]) for r in rows
                  if r["status"] == "ok" and r["top1"] is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for kind, marker, color in (("peer", "s", "tab:gray"), ("vitopt", "o", "tab:blue")):
            mine = [p for p in points if p[3] == kind]
            ax.scatter([p[0] for p in mine], [p[1] * 100 for p in mine], marker=marker, c=color,
                       label=kind)
        for p in points:
            ax.annotate(p[2], (p[0], p[1] * 100), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
        front = pareto_front(points)
        ax.plot([p[0] for p in front], [p[1] * 100 for p in front], "--", c="tab:red",
                marker="o", mfc="none", ms=11, label="Pareto front", drawstyle="steps-post")
        ax.set_xscale("log")   # peers span two orders of magnitude on a shared CPU
        ax.set_xlabel(f"median latency, batch {batch} (ms, log scale)")
        ax.set_ylabel("top-1 on the digits proxy (%)")
        ax.set_title(f"{model}: accuracy vs latency (proxy, not ImageNet)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"pareto_{model}_b{batch}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_speedup(records: List[dict], out: Path) -> List[Path]:
    plt = _pyplot()
    groups = [(key, [r for r in rows if r["kind"] == "vitopt" and r["status"] == "ok"
                     and r["speedup_vs_best_peer"]])
              for key, rows in _by(records, "model", "batch").items()]
    groups = [(key, rows) for key, rows in groups if rows]
    if not groups:
        return []
    height = sum(0.8 + 0.28 * len(rows) for _, rows in groups)
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, max(2.5, height)), squeeze=False)
    for ax, ((model, batch), rows) in zip(axes[:, 0], groups):
        rows = sorted(rows, key=lambda r: r["speedup_vs_best_peer"])
        values = [r["speedup_vs_best_peer"] for r in rows]
        ax.barh([r["cell"] for r in rows], values,
                color=["tab:green" if v >= 1 else "tab:orange" for v in values])
        ax.axvline(1.0, c="k", lw=0.8)
        ax.set_title(f"{model} batch {batch}: speed-up over the best peer "
                     f"({rows[0]['best_peer']})", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("best peer median / vitopt median (> 1: vitopt faster)")
    fig.tight_layout()
    path = out / "speedup.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
