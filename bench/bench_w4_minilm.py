"""all-MiniLM-L6-v2 with 4-bit group-wise weights: nearest rounding, AWQ, GPTQ and AWQ + GPTQ,
weights only (float activations) and with 8-bit static activations (issue 25).

Same sentences and metrics as ``bench_transformer.py`` (Python's own help text; every 5th
sentence calibrates, the others evaluate): mean / worst cosine with the FP32 embeddings and
top-1 retrieval agreement. MiniLM is a post-LN BERT: each LayerNorm output also feeds the
residual add, so AWQ cannot fold ``1/s`` into it; with static activations it goes into the
input quantizers (an explicit multiply), weights-only it has nowhere to go and AWQ records
every group as not scaled (the rows say how many layers it scaled). Writes bench/W4_MINILM.md.

    python bench/bench_w4_minilm.py [--calib 256] [--eval 1000] [--group 128]
    python bench/bench_w4_minilm.py --quick    # checks the script (not numbers)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _minilm import parser, start

import ptqkit
from ptqkit import PTQConfig, QuantSpec
from ptqkit.options import GPTQOptions
from ptqkit.zoo import text


def _configs(group: int) -> dict[str, PTQConfig]:
    w4 = QuantSpec(bits=4, symmetric=True, per_channel=True, group_size=group)
    base = PTQConfig(weights=w4, bias_correction=False, progress=False)
    out = {}
    for acts, label in ((None, "W4 weights only"), (base.activations, "W4A8 static")):
        cfg = base.replace(activations=acts)
        out[f"{label}, nearest"] = cfg
        out[f"{label}, AWQ"] = cfg.replace(techniques={"awq": True})
        out[f"{label}, GPTQ"] = cfg.replace(gptq=GPTQOptions())
        out[f"{label}, AWQ + GPTQ"] = cfg.replace(gptq=GPTQOptions(), techniques={"awq": True})
    return out


def _scaled(q: torch.nn.Module) -> str:
    rec = q.ptq_info.details.get("awq")
    if rec is None:
        return "-"
    layers = rec["layers"].values()
    return f"{sum(not r['how'].startswith('not') for r in layers)}/{len(rec['layers'])}"


def main() -> None:
    ap = parser(__doc__, calib=256, evals=1000, group=128)
    ap.add_argument("--out", default=str(Path(__file__).with_name("W4_MINILM.md")))
    args = ap.parse_args()
    if args.quick:
        args.calib, args.eval = 32, 100
    t_start = time.perf_counter()
    run = start(args)
    load0, calib_sents, eval_sents = run.load0, run.calib, run.evals
    model = text.minilm()
    ref = text.embed(model, eval_sents)
    calib = text.sentence_batches(calib_sents, 32)
    lines = [
        f"# all-MiniLM-L6-v2, 4-bit weights in groups of {args.group}: AWQ and GPTQ",
        "",
        f"`python bench/bench_w4_minilm.py{' --quick' if args.quick else ''}`: "
        f"{len(calib_sents)} calibration / {len(eval_sents)} evaluation sentences, symmetric "
        f"int4 weights per group of {args.group} input channels, no bias correction; "
        f"{args.threads} threads; load average {load0:.1f} at the start.",
        "",
        "| config | mean cos | min cos | top-1 retrieval | AWQ-scaled layers | quantize s |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for name, cfg in _configs(args.group).items():
        t0 = time.perf_counter()
        q = ptqkit.quantize(model, calib, cfg)
        tq = time.perf_counter() - t0
        r = text.embedding_agreement(ref, text.embed(q, eval_sents))
        row = (
            f"| {name} | {r['cosine']:.4f} | {r['min_cosine']:.4f} | {100 * r['top1']:.1f}% | "
            f"{_scaled(q)} | {tq:.1f} |"
        )
        lines.append(row)
        print(row, flush=True)
    lines += ["", f"Total {time.perf_counter() - t_start:.0f} s."]
    if not args.quick:
        Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
