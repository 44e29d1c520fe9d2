"""Weight-only quantization of the stdlib-trained byte-level GPT (``bench/lm.py``, issue 25):
held-out perplexity of FP32, and of ptqkit's nearest rounding (RTN), GPTQ, AWQ and AWQ + GPTQ
at W4 per-channel, W4 g128 and W3 g128 (symmetric), quantize time, the share of RTN's
perplexity gap GPTQ closes, ``(ppl_RTN - ppl_GPTQ) / (ppl_RTN - ppl_FP32)``, and the weight
bytes (integers at ``bits`` per weight + one float32 scale per channel or group; embeddings
float32). Every Linear, the tied ``lm_head`` included, is quantized (GPTQ/AWQ/NNCF keep the head
in 16 or 8 bits by default; here it is 0.9% of the weights). Calibration: 128 training-split
windows. Peers on the same model and windows: NNCF ``compress_weights`` (INT4_SYM, group 128,
as its documentation shows; data-free, and data-aware AWQ + scale estimation; NNCF keeps the
embedding and the tied head at int8 by default, which its row says); GPTQModel / AutoAWQ:
"not installed" where absent. Mixed precision (issue 25 item 6): ``ptqkit.mixed_precision`` with
widths {3, 4, 8}, group 128, at a 4.0-bit budget, RTN, beside uniform W4 g128 RTN.

    python bench/bench_lm_w4.py [--eval 256] [--threads 2] [--write]   # table -> bench/LM_W4.md
    python bench/bench_lm_w4.py --quick   # tiny model trained in seconds: checks the script
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lm

import ptqkit
from ptqkit import PTQConfig, QuantSpec
from ptqkit.analysis.mixed import plan_of
from ptqkit.options import GPTQOptions

SPECS = {
    "W4 per-channel": QuantSpec(bits=4, per_channel=True),
    "W4 g128": QuantSpec(bits=4, per_channel=True, group_size=128),
    "W3 g128": QuantSpec(bits=3, per_channel=True, group_size=128),
}
METHODS = {
    "RTN": {},
    "GPTQ": {"gptq": GPTQOptions()},
    "AWQ": {"techniques": {"awq": True}},
    "AWQ + GPTQ": {"gptq": GPTQOptions(), "techniques": {"awq": True}},
}


def weight_bytes(model: torch.nn.Module, spec: QuantSpec | None) -> int:
    """Linear weights at ``spec.bits`` plus float32 scales; everything else float32."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) and spec is not None:
            out, k = mod.weight.shape
            groups = 1 if spec.group_size is None else -(-k // spec.group_size)
            total += out * k * spec.bits // 8 + out * groups * 4
        elif isinstance(mod, (torch.nn.Embedding, torch.nn.Linear)):
            total += 0 if mod is getattr(model, "lm_head", None) else mod.weight.numel() * 4
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", type=int, default=256, help="held-out windows")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    cfg = lm.LMConfig()
    if args.quick:
        cfg = dataclasses.replace(cfg, d_model=64, n_layers=2, n_heads=2, ctx=64, steps=20)
        args.eval, args.calib = 16, 16
    load0 = os.getloadavg()[0]
    model, rec = lm.trained(cfg) if not args.quick else (lm.train(cfg, _train_data()), {})
    torch.set_num_threads(args.threads)
    _, held = lm.corpus()
    wins = lm.eval_windows(lm.as_tensor(held), cfg.ctx, args.eval)
    calib = lm.calibration(cfg, args.calib)
    fp = lm.perplexity(model, wins)
    lines = [
        "# Byte-level GPT (stdlib-trained), weight-only quantization",
        "",
        f"`python bench/bench_lm_w4.py{' --quick' if args.quick else ''}`: {rec} "
        f"{lm.n_params(model):,} parameters; {wins.shape[0]} held-out windows of {cfg.ctx} "
        f"bytes; {args.calib} calibration windows; {args.threads} threads; load {load0:.1f}.",
        "",
        "| config | ppl | bits/byte | GPTQ closes | weight MB | quantize s |",
        "|---|---|---|---|---|---|",
        f"| FP32 | {fp['ppl']:.3f} | {fp['bpb']:.4f} | | {weight_bytes(model, None) / 1e6:.2f} | |",
    ]
    print("\n".join(lines), flush=True)
    for sname, spec in SPECS.items():
        rtn = float("nan")
        for mname, extra in METHODS.items():
            c = PTQConfig(activations=None, weights=spec, bias_correction=False, progress=False)
            t0 = time.perf_counter()
            q = ptqkit.quantize(model, calib, c.replace(**extra))
            tq = time.perf_counter() - t0
            r = lm.perplexity(q, wins)
            rtn = r["ppl"] if mname == "RTN" else rtn
            closes = (rtn - r["ppl"]) / (rtn - fp["ppl"]) if mname != "RTN" else float("nan")
            row = (
                f"| {sname}, {mname} | {r['ppl']:.3f} | {r['bpb']:.4f} | "
                f"{'' if mname == 'RTN' else f'{100 * closes:.0f}%'} | "
                f"{weight_bytes(model, spec) / 1e6:.2f} | {tq:.1f} |"
            )
            lines.append(row)
            print(row, flush=True)
    for row in _mixed_rows(model, calib, wins) + _nncf_rows(model, calib, wins):
        lines.append(row)
        print(row, flush=True)
    for peer in ("gptqmodel", "awq"):
        if importlib.util.find_spec(peer) is None:
            lines.append(f"| {peer} | not installed | | | | |")
    if args.write and not args.quick:
        Path(__file__).with_name("LM_W4.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _mixed_rows(model: torch.nn.Module, calib: list, wins: torch.Tensor) -> list[str]:
    """ptqkit.mixed_precision at 4.0 bits per weight from {3, 4, 8} (g128, RTN)."""
    base = PTQConfig(activations=None, weights=SPECS["W4 g128"], bias_correction=False,
                     progress=False)
    t0 = time.perf_counter()
    cfg = ptqkit.mixed_precision(model, calib, budget_bits=4.0, choices=(3, 4, 8), base=base,
                                 group_size=128)
    q = ptqkit.quantize(model, calib, cfg)
    tq = time.perf_counter() - t0
    plan = plan_of(cfg)
    count = Counter(plan.bits.values())
    widths = ", ".join(f"{n}× {b}-bit" for b, n in sorted(count.items()))
    r = lm.perplexity(q, wins)
    note = f"; {plan.note}" if plan.note else ""
    return [
        f"| mixed {{3, 4, 8}} g128 at 4.0 bits (achieved {plan.average_bits:.2f}: {widths}"
        f"{note}), RTN | {r['ppl']:.3f} | {r['bpb']:.4f} | | | {tq:.1f} |"
    ]


def _nncf_rows(model: torch.nn.Module, calib: list, wins: torch.Tensor) -> list[str]:
    """NNCF compress_weights INT4_SYM g128: data-free, and AWQ + scale estimation."""
    if importlib.util.find_spec("nncf") is None:
        return ["| NNCF compress_weights | not installed (pip install nncf) | | | | |"]
    import copy

    import nncf

    items = [b[i : i + 1] for b in calib for i in range(b.shape[0])]
    rows = []
    for label, kw in (("data-free", {}), ("AWQ + scale estimation", {"awq": True,
                                                                      "scale_estimation": True})):
        t0 = time.perf_counter()
        try:
            cm = nncf.compress_weights(
                copy.deepcopy(model).eval(), mode=nncf.CompressWeightsMode.INT4_SYM,
                group_size=128, dataset=nncf.Dataset(items), **kw
            )
        except Exception as e:  # a peer's failure is a row, not a crash
            why = " ".join(str(e).split())[:240]
            rows.append(f"| NNCF W4 g128 {label} | failed: {type(e).__name__}: {why} | | | | |")
            continue
        tq = time.perf_counter() - t0
        r = lm.perplexity(cm, wins)
        rows.append(
            f"| NNCF {nncf.__version__} W4 g128 {label} (embedding and tied head int8) | "
            f"{r['ppl']:.3f} | {r['bpb']:.4f} | | | {tq:.1f} |"
        )
    return rows


def _train_data() -> torch.Tensor:
    return lm.as_tensor(lm.corpus()[0][:2_000_000])


if __name__ == "__main__":
    main()
