"""The report's section on ``ptqkit.tune``: the recipe chosen and every recipe tried, with its
held-out score, its time and why a recipe was skipped or failed."""

from __future__ import annotations

import html
from typing import Any

from .markup import html_table


def _changes(changes: Any) -> str:
    if not changes:
        return "(the base recipe)"
    return ", ".join(f"{k}={v}" for k, v in dict(changes).items())


def section_recipe(line: str, details: dict[str, Any]) -> str:
    """The recipe search of ``ptq_info`` (empty when the model was not tuned)."""
    if not details:
        return (
            '<p class="muted">Not run: the recipe was given. <code>ptqkit.tune</code> (or '
            "<code>--tune SECONDS</code>) tries calibrators, bias correction, CLE and AdaRound "
            "on held-out calibration samples and keeps the best.</p>"
        )
    rows = []
    for t in details.get("trials", []):
        ran = t.get("status") == "ran"
        rows.append(
            [
                t.get("name", ""),
                _changes(t.get("changes")),
                t.get("status", ""),
                t["agreement"] if ran and t.get("agreement") is not None else "",
                t["kl"] if ran and t.get("kl") is not None else "",
                t["sqnr_db"] if ran and t.get("sqnr_db") is not None else "",
                float(t["seconds"]) if ran else "",
                t.get("decision") or t.get("reason", "") if ran else t.get("reason", ""),
            ]
        )
    table = html_table(
        ["recipe", "changes", "status", "agreement %", "KL", "SQNR dB", "seconds", "note"],
        rows,
        "recipe",
    )
    held = details.get("held_out_samples", "?")
    score = html.escape(str(details.get("score")))
    head = (
        f'<p>{html.escape(line)}</p><p class="muted">Scored by {score}'
        f" against the FP32 model on {held} held-out calibration samples (no labels), within a "
        f"budget of {details.get('budget_s', '?')} s. A recipe is taken only when its per-sample "
        "losses are significantly lower (paired signed-rank test, 95 %) than the best so far's "
        "and not higher than the base recipe's: a tie keeps the earlier recipe.</p>"
    )
    return head + table


__all__ = ["section_recipe"]
