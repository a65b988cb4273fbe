"""Text rendering of the encoder IR: the per-stage table used by `vitopt inspect` and IR dumps."""
from __future__ import annotations

from typing import Iterable, List


def format_table(rows: Iterable[dict], columns: List[tuple]) -> str:
    """A plain aligned text table; `columns` holds (key, title, format) triples."""
    rows = list(rows)
    cells = [[title for _, title, _ in columns]]
    for row in rows:
        cells.append([fmt.format(row.get(key, "")) if row.get(key) is not None else "-"
                      for key, _, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


STAGE_COLUMNS = [
    ("index", "#", "{}"), ("name", "stage", "{}"), ("tokens_in", "tokens in", "{}"),
    ("tokens_out", "out", "{}"), ("gflops", "GFLOPs", "{:.3f}"), ("params", "params", "{:,}"),
    ("precision", "precision", "{}"), ("detail", "detail", "{}"),
]


def format_stage_rows(rows: Iterable[dict]) -> str:
    return format_table(rows, STAGE_COLUMNS)


def format_ir(ir) -> str:
    meta = ir.meta
    head = (f"EncoderIR family={meta.family} image={meta.image_size[0]}x{meta.image_size[1]}x"
            f"{meta.in_chans} output={meta.output} blocks={ir.num_blocks} "
            f"prefix_tokens={ir.num_prefix_tokens} GFLOPs/image={ir.flops() / 1e9:.3f}")
    return head + "\n" + format_stage_rows(ir.table()) + "\n"
