"""HTML building blocks of the report: the stylesheet, an embedded PNG, a table."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from typing import Any

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1180px;
padding:16px 24px;color:#222;background:#fff}
h1{font-size:1.6em;margin-bottom:0}
h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:10px}.grid figure{margin:0;border:1px solid #eee;padding:4px}
figcaption{font-size:0.75em;color:#555;max-width:528px;word-break:break-all}
.warning{background:#fff4e5;border-left:4px solid #f0a020;padding:6px 10px;margin:6px 0}
.tip{background:#eef6ff;border-left:4px solid #3080e0;padding:6px 10px;margin:6px 0}
.practice{color:#666;font-size:0.85em}.muted{color:#777;font-size:0.85em}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:0.8em}
"""


def embed_png(png: bytes, alt: str) -> str:
    """An ``<img>`` holding ``png`` inline (base64): the report fetches nothing."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def html_table(head: Sequence[str], rows: Iterable[Sequence[Any]], id_: str = "") -> str:
    """An HTML table (cells escaped; floats with 2 decimals, 3 significant digits when small)."""
    out = [f"<table{f' id={chr(34)}{id_}{chr(34)}' if id_ else ''}><thead><tr>"]
    out += [f"<th>{html.escape(str(h))}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for r in rows:
        cells = []
        for v in r:
            if isinstance(v, float):
                cells.append(
                    f'<td class="num">{v:.3g}</td>'
                    if abs(v) < 1e-2 and v
                    else f'<td class="num">{v:.2f}</td>'
                )
            elif isinstance(v, int) and not isinstance(v, bool):
                cells.append(f'<td class="num">{v}</td>')
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)



__all__ = ["CSS", "embed_png", "html_table"]
