"""The peers run_all.py sets ptqkit beside, called as each documents: PyTorch FX post-training
quantization and NNCF (its PyTorch backend with defaults; its ONNX backend with full bias
correction). ONNX Runtime's ``quantize_static`` is in ``bench_export.py``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

NNCF_PATH = os.environ.get("PTQKIT_NNCF_PATH", "/tmp/nncf_pkg")  # a --target install, if any


def fx_quantize(model, calib, kind: str):
    from torch.ao.quantization import QConfig, QConfigMapping, get_default_qconfig_mapping
    from torch.ao.quantization.observer import MinMaxObserver, default_per_channel_weight_observer
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    if kind == "default":
        mapping = get_default_qconfig_mapping("x86")
    else:  # min/max activations (x86 keeps reduce_range), per-channel min/max weights
        act = MinMaxObserver.with_args(dtype=torch.quint8, reduce_range=True)
        mapping = QConfigMapping().set_global(
            QConfig(activation=act, weight=default_per_channel_weight_observer)
        )
    prepared = prepare_fx(model, mapping, example_inputs=(calib[0][:1],))
    with torch.no_grad():
        for b in calib:
            prepared(b)
    return convert_fx(prepared)


def import_nncf():
    if Path(NNCF_PATH).is_dir():
        sys.path.insert(0, NNCF_PATH)
    # its torch backend compiles a C++ extension on first use (cached afterwards); the default
    # 60 s limit is too short on a shared 2-core machine
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "600")
    import nncf

    return nncf


def nncf_quantize(model, calib):
    nncf = import_nncf()
    return nncf.quantize(model, nncf.Dataset(calib), subset_size=sum(len(b) for b in calib))


def nncf_onnx_quantize(fp32: Path, out: Path, calib: list[torch.Tensor]) -> Path:
    """NNCF's ONNX backend with its full (not fast) bias correction, from the FP32 ONNX file
    ONNX Runtime's rows start from; writes the QDQ model ONNX Runtime runs.

    Called as NNCF documents it: one sample per data item and the default ``subset_size``
    (300), so its range statistics see every calibration sample and its bias correction
    ``subset_size // 5`` = 60 of them. (The same 128 crops as batches of 32, with
    ``subset_size`` = 128 so that the bias correction sees all of them, measured on
    EfficientNet-Lite0 under load: the same agreement on 64 crops, 84.38%, KL 0.063 vs 0.064,
    but 362 s instead of 129 s, and 5.8 GiB of peak RSS instead of under 1.3: its bias correction
    keeps every layer's input for all its samples.)"""
    import onnx

    nncf = import_nncf()
    model = onnx.load(str(fp32))
    items = [x[None] for b in calib for x in b]
    data = nncf.Dataset(items, lambda x: {"input": x.numpy()})
    q = nncf.quantize(model, data, fast_bias_correction=False)
    onnx.save(q, str(out))
    return out
