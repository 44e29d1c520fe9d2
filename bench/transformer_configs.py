"""The configs bench_transformer.py measures on all-MiniLM-L6-v2, and how it quantizes and prints
one (shared by its accuracy and ONNX Runtime sections)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ptqkit

FFN_DOWN = "*layer.?.output.dense"  # the 6 FFN down-projections (not attention.output.dense)
PER_TENSOR = ptqkit.QuantSpec(8, symmetric=True, per_channel=False)
#: dynamic per-token activations (issue 25): a scale and zero point per row of each Linear input
PER_TOKEN = ptqkit.QuantSpec(8, symmetric=False, per_channel=True, dynamic=True)
#: SmoothQuant alpha of the configs that use it
ALPHA = 0.5


def configs(quick: bool) -> dict[str, dict]:
    """name -> PTQConfig keyword arguments (W8A8: activations 8-bit asymmetric per tensor, or
    per token at run time where the name says dynamic)."""
    full = {
        "weights only (W8, float activations)": {"activations": None},
        "per-tensor W, minmax": {"weights": PER_TENSOR},
        "per-channel W, minmax": {},
        "per-channel W, percentile 99.99": {"calibration": "percentile"},
        "per-channel W, mse": {"calibration": "mse"},
        "per-channel W, kl": {"calibration": "kl"},
        "per-channel W, auto": {"calibration": "auto"},
        f"per-tensor W, minmax, SmoothQuant {ALPHA}": {"weights": PER_TENSOR, "smoothquant": ALPHA},
        "per-channel W, minmax, SmoothQuant 0.3": {"smoothquant": 0.3},
        f"per-channel W, minmax, SmoothQuant {ALPHA}": {"smoothquant": ALPHA},
        "per-channel W, minmax, SmoothQuant 0.7": {"smoothquant": 0.7},
        f"per-channel W, mse, SmoothQuant {ALPHA}": {"calibration": "mse", "smoothquant": ALPHA},
        "per-channel W, minmax, FFN down-proj float": {"skip": (FFN_DOWN,)},
        f"per-channel W, minmax, SmoothQuant {ALPHA}, FFN down-proj float": {
            "smoothquant": ALPHA,
            "skip": (FFN_DOWN,),
        },
        # every Linear on a dynamic per-token grid, the attention matmuls float (the ops ONNX
        # Runtime's quantize_dynamic quantizes); then the same Linears beside static grids
        "per-channel W, dynamic per-token A8 (Linears)": {"activations": PER_TOKEN},
        "per-channel W, dynamic per-token A8 (Linears), static mse elsewhere": {
            "scopes": [("Linear", {"activations": PER_TOKEN})],
        },
    }
    if not quick:
        return full
    return {k: full[k] for k in ("per-channel W, minmax", BEST_W8A8, BEST_MIXED)}


BEST_W8A8 = f"per-channel W, minmax, SmoothQuant {ALPHA}"
BEST_MIXED = f"per-channel W, minmax, SmoothQuant {ALPHA}, FFN down-proj float"


def quantize(model, calib, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ptqkit.PTQWarning)
        cfg = ptqkit.PTQConfig(**{"bias_correction": False, "progress": False, **kw})
        return ptqkit.quantize(model, calib, cfg)


def fmt(r: dict) -> str:
    return f"{r['cosine']:.4f} | {r['min_cosine']:.4f} | {100 * r['top1']:.1f}%"
