"""What the all-MiniLM-L6-v2 weight-only benchmarks share (``bench_w4_minilm.py``,
``bench_w4_onnx.py``): their common command-line options and the start of a run (threads,
warnings off, the load average, and the sentences: Python's own help text, as in
``bench_transformer.py``; every 5th sentence calibrates, the others evaluate)."""

from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import dataclass

import torch

from ptqkit.zoo import text


def parser(doc: str, calib: int, evals: int, group: int) -> argparse.ArgumentParser:
    """The options both scripts take (``--calib``, ``--eval``, ``--group``, ``--threads``,
    ``--quick``), with their defaults; the caller adds its own."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--calib", type=int, default=calib)
    ap.add_argument("--eval", type=int, default=evals)
    ap.add_argument("--group", type=int, default=group)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    return ap


@dataclass
class Run:
    """The start of a run: the load average then, and the sentences."""

    load0: float
    calib: list[str]  # the first ``--calib`` of every 5th sentence
    evals: list[str]  # the first ``--eval`` of the others


def start(args: argparse.Namespace) -> Run:
    """Set ``--threads`` torch threads, silence warnings, and split the sentences."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    load0 = os.getloadavg()[0]
    pool = text.sentences()
    evals = [s for i, s in enumerate(pool) if i % 5][: args.eval]
    return Run(load0, pool[::5][: args.calib], evals)
