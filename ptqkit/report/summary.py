"""The rows of the report's summary table: the evaluation result, latency and how the model
was quantized (from its ``ptq_info``); and what a job's ``summary.json`` holds
(:func:`job_summary`)."""

from __future__ import annotations

import math
from typing import Any

from torch import nn


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _spec(d: dict[str, Any] | None) -> str:
    if not d:
        return "float (not quantized)"
    kind = "symmetric" if d.get("symmetric") else "asymmetric"
    gran = "per-channel" if d.get("per_channel") else "per-tensor"
    return f"{d.get('bits')}-bit {kind} {gran}"


def cost_text(result: Any) -> list[str]:
    """``["0.04 points"]``: the expected top-1 cost (label-free), shown where the metric is
    agreement and the cost is known; ``[]`` otherwise."""
    cost = getattr(result, "expected_cost", math.nan)
    if result.metric != "agreement" or not math.isfinite(cost):
        return []
    return [f"{cost:.2f} points"]


def summary_rows(
    qmodel: nn.Module, result: Any = None, latency: dict[str, float] | None = None
) -> list[tuple[str, str]]:
    """The summary table's rows (label, value)."""
    rows: list[tuple[str, str]] = []
    if result is not None:
        unit = "%" if result.metric in ("top1", "top5", "agreement") else ""
        rows += [
            (f"FP32 {result.metric}", f"{result.fp32:.2f}{unit}"),
            (f"INT8 {result.metric}", f"{result.quantized:.2f}{unit}"),
            ("degradation", f"{result.degradation:+.2f} points"),
            ("top-1 agreement with FP32", f"{result.agreement:.2f}%"),
            *[("expected top-1 cost (FP32's probabilities)", c) for c in cost_text(result)],
            ("KL(FP32 ‖ INT8) per sample", f"{result.kl:.4g} nats"),
            ("evaluation samples", str(result.samples)),
            ("size FP32", _fmt_bytes(result.size_bytes_fp32)),
            ("size quantized", _fmt_bytes(result.size_bytes_quantized)),
        ]
        if result.compression is not None:
            rows.append(("compression", f"{result.compression:.2f}×"))
    for k, v in (latency or {}).items():
        rows.append((f"latency {k}", f"{v:.2f} ms" if isinstance(v, float) else str(v)))
    info = getattr(qmodel, "ptq_info", None)
    if info is not None:
        c = info.config
        rows += [
            ("weights", _spec(c.get("weights"))),
            ("activations", _spec(c.get("activations"))),
            ("calibrator", str(c.get("calibration"))),
            ("CLE / bias correction", f"{c.get('cle')} / {c.get('bias_correction')}"),
            (
                "calibration samples",
                f"{info.calibration_samples} in {info.calibration_batches} batches",
            ),
            (
                "quantized layers / activation quantizers",
                f"{len(info.layers)} / {len(info.quantizers) - len(info.disabled)}",
            ),
        ]
        rows += _scope_rows(c, info.layer_settings)
        if info.skipped:
            rows.append(("layers left in float", ", ".join(info.skipped)))
        if info.stages:
            rows.append(
                ("time per stage", ", ".join(f"{k} {v:.2f} s" for k, v in info.stages.items()))
            )
    return rows


def _scope_sets(sc: dict[str, Any]) -> str:
    """What one scope (its ``to_dict``) sets: float, or its weight spec, dynamic activations and
    the techniques it turns off (or on again)."""
    if sc.get("float"):
        return "float"
    parts = [_spec(sc["weights"])] if sc.get("weights") else []
    if sc.get("activations"):
        parts.append(f"dynamic activations {_spec(sc['activations'])}")
    switches = sc.get("techniques") or {}
    off = [n for n, on in switches.items() if not on]
    back = [n for n, on in switches.items() if on]
    if off:
        parts.append(f"{', '.join(off)} off")
    if back:
        parts.append(f"{', '.join(back)} on again")
    return "; ".join(parts) or "nothing"


def _scope_rows(
    config: dict[str, Any], settings: dict[str, dict[str, Any]]
) -> list[tuple[str, str]]:
    """One row per scope (``PTQConfig.scopes``): what it set and on how many layers it won."""
    rows = []
    for sc in config.get("scopes") or []:
        label = sc["pattern"]
        won = [n for n, s in settings.items() if s.get("scopes") and s["scopes"][-1] == label]
        hit = [n for n, s in settings.items() if label in s.get("scopes", [])]
        what = _scope_sets(sc)
        shown = ", ".join(won[:6]) + (f", ... ({len(won)})" if len(won) > 6 else "")
        text = f"{what}: matches {len(hit)} layer(s), the last match of {len(won)}: {shown}"
        rows.append((f"scope {label!r}", text))
    return rows


def job_summary(
    version: str, command: str, qmodel: Any, res: Any, extra: dict[str, Any]
) -> dict[str, Any]:
    """What ``summary.json`` holds (:func:`ptqkit.run_job`): the ptqkit ``version``, the
    ``command``, the config, the evaluation result ``res``, how the model was quantized (its
    ``ptq_info``), the recipe, then ``extra`` (latencies, the int8 runtimes, files, advice)."""
    info = qmodel.ptq_info
    return {
        "ptqkit": version,
        "command": command,
        "config": qmodel.ptq_config.to_dict(),
        "evaluation": res.to_dict() if res is not None else None,
        "quantization": {
            "traced": info.traced,
            "layers": len(info.layers),
            "skipped": info.skipped,
            "activation_quantizers": len(info.quantizers),
            "float_quantizers": info.disabled,
            "calibration_samples": info.calibration_samples,
            "stages_s": info.stages,
            "warnings": info.warnings,
        },
        # ptqkit.tune: the choice in one line and every recipe tried (empty when not tuned)
        "recipe": {"summary": info.recipe, **info.details.get("recipe", {})},
        **extra,
    }


__all__ = ["cost_text", "job_summary", "summary_rows"]
