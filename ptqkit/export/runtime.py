"""Run an exported model in ONNX Runtime and check what ONNX Runtime made of it.

* :class:`OrtModule` wraps an ``onnxruntime.InferenceSession`` as an ``nn.Module`` that takes
  and returns torch tensors, so the deployed model drops in wherever a model goes:
  ``ptqkit.evaluate(fp32_model, OrtModule("model.int8.onnx"), data)``.
* :func:`kernel_report` builds the graph ONNX Runtime actually runs (after its QDQ fusions) and
  counts the integer kernels and the float compute ops left.
* :func:`parity` compares the simulation with ONNX Runtime on the same inputs.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ExportError

#: ONNX Runtime ops that compute on integers (what a fused ``DQ → op → Q`` becomes)
INT_KERNELS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "MatMulIntegerToFloat",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeMatMul",
        "QLinearAdd",
        "QLinearMul",
        "QLinearGlobalAveragePool",
        "QLinearAveragePool",
        "QLinearConcat",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearSoftmax",
        "QLinearConvTranspose",
    }
)
#: float ops that do the heavy arithmetic (a quantized layer left in one of these runs in float)
FLOAT_KERNELS = frozenset(
    {"Conv", "FusedConv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm", "FusedGemm"}
)

_LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def session_options(threads: int = 2, level: str = "all", spinning: bool = True) -> Any:
    """``SessionOptions`` with ``threads`` intra-op threads, one inter-op thread, quiet logs.
    ``spinning=False`` makes idle worker threads sleep instead of spin (kinder to a shared
    machine, and then the process CPU time measures the work done)."""
    import onnxruntime as ort

    if level not in _LEVELS:
        raise ValueError(f"level must be one of {sorted(_LEVELS)}, got {level!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    so.log_severity_level = 3
    # ONNX Runtime fuses DequantizeLinear(block_size) + MatMul into MatMulNBits with
    # accuracy_level 4 by default (A quantized to int8: measured 3.5e-3 off the simulation on a
    # W4 g32 MLP); 0 keeps A in float32, what weight-only export means (export/onnx_nbits.py)
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class OrtModule(nn.Module):
    """An ONNX model run by ONNX Runtime (CPU), called like the torch model it came from.

    ``OrtModule(path)(x)`` feeds the tensors to the model's inputs (positionally, or by input
    name as keywords; float inputs as float32 numpy arrays, any batch size when exported with a
    dynamic batch) and returns a tensor, or a tuple of tensors for several outputs. The session
    is created on first use and dropped when the module is pickled or deep-copied.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads of the session (inter-op: 1).
        level: graph optimization level, ``"basic"``, ``"extended"`` or ``"all"`` (default;
            the QDQ → integer-kernel fusions need at least ``"extended"``).
        providers: ONNX Runtime execution providers (default: CPU).
        spinning: let idle worker threads spin (ONNX Runtime's default; lower latency on an
            idle machine). ``False`` is kinder to a shared machine.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        threads: int = 2,
        level: str = "all",
        providers: list[str] | None = None,
        spinning: bool = True,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"no ONNX file at {self.path}")
        self.threads, self.level, self.spinning = threads, level, spinning
        self.providers = list(providers or ["CPUExecutionProvider"])
        self._session: Any = None

    @property
    def session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            try:
                self._session = ort.InferenceSession(
                    str(self.path),
                    session_options(self.threads, self.level, self.spinning),
                    self.providers,
                )
            except Exception as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ExportError(f"ONNX Runtime cannot load {self.path}: {msg}") from None
        return self._session

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_session"] = None
        return state

    def extra_repr(self) -> str:
        return f"{str(self.path)!r}, threads={self.threads}, level={self.level!r}"

    @property
    def size_bytes(self) -> int:
        """Size of the ONNX file (what :func:`ptqkit.evaluate` reports as the model's size)."""
        return self.path.stat().st_size

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        inputs = self.session.get_inputs()
        names = [m.name for m in inputs]
        values = dict(zip(names, args))
        unknown = sorted(set(kwargs) - set(names))
        if len(args) > len(names) or unknown:
            raise ExportError(
                f"{self.path.name} takes inputs {names}, got {len(args)} positional and "
                f"keyword(s) {sorted(kwargs)}"
            )
        values.update(kwargs)
        if len(values) != len(names):
            missing = [n for n in names if n not in values]
            raise ExportError(f"{self.path.name}: missing input(s) {missing}")
        feeds = {}
        for meta in inputs:
            a = values[meta.name]
            arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
            dtype = np.float32 if meta.type == "tensor(float)" else arr.dtype
            feeds[meta.name] = np.ascontiguousarray(arr, dtype=dtype)
        outs = [torch.from_numpy(o) for o in self.session.run(None, feeds)]
        return outs[0] if len(outs) == 1 else tuple(outs)


# -- what ONNX Runtime runs ----------------------------------------------------------------------
@dataclass
class KernelReport:
    """Op counts of the graph ONNX Runtime runs after its optimizations."""

    ops: Counter = field(default_factory=Counter)
    #: ``(op type, node name)`` of float Conv/MatMul/Gemm nodes left
    float_nodes: list[tuple[str, str]] = field(default_factory=list)

    @property
    def int_kernels(self) -> int:
        return sum(c for op, c in self.ops.items() if op in INT_KERNELS)

    @property
    def float_kernels(self) -> int:
        return len(self.float_nodes)

    def summary(self) -> str:
        ints = {op: c for op, c in sorted(self.ops.items()) if op in INT_KERNELS}
        floats = Counter(op for op, _ in self.float_nodes)
        return f"integer kernels {ints}; float conv/matmul/gemm {dict(floats)}"


def optimized_model(path: str | os.PathLike, level: str = "extended") -> Any:
    """The ``onnx.ModelProto`` ONNX Runtime runs for ``path`` at optimization ``level``
    (``"extended"`` keeps the graph portable; ``"all"`` adds layout transforms for this CPU)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        so = session_options(1, level)
        so.optimized_model_filepath = os.path.join(d, "optimized.onnx")
        ort.InferenceSession(str(path), so, ["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath)


def kernel_report(path: str | os.PathLike, level: str = "extended") -> KernelReport:
    """Count the integer kernels and the float Conv/MatMul/Gemm ops in the optimized graph."""
    model = optimized_model(path, level)
    rep = KernelReport(ops=Counter(n.op_type for n in model.graph.node))
    rep.float_nodes = [(n.op_type, n.name) for n in model.graph.node if n.op_type in FLOAT_KERNELS]
    return rep


# -- simulation vs runtime -----------------------------------------------------------------------
@dataclass
class Parity:
    """Simulation vs ONNX Runtime on the same inputs.

    ``max_steps`` is the largest output difference in units of the output's quantization step:
    the scale of the model's last activation quantizer when the output is quantized, else one
    8-bit step of the simulated output's range, ``(max - min) / 255``.
    """

    samples: int
    top1_agreement: float  # percent
    max_abs_diff: float
    step: float

    @property
    def max_steps(self) -> float:
        return self.max_abs_diff / self.step if self.step > 0 else float("inf")


@torch.no_grad()
def parity(
    qmodel: nn.Module, ort_model: nn.Module, data: Iterable[Any], step: float | None = None
) -> Parity:
    """Run ``qmodel`` (the ptqkit simulation) and ``ort_model`` (an :class:`OrtModule`) on each
    batch of ``data`` (tensors or ``(input, target)`` tuples) and compare the outputs."""
    sims, orts = [], []
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        sims.append(qmodel(x).float())
        orts.append(ort_model(x).float())
    if not sims:
        raise ExportError("parity needs at least one batch of data")
    sim, rt = torch.cat(sims), torch.cat(orts)
    if step is None:
        step = float(sim.max() - sim.min()) / 255.0
    agree = (sim.argmax(-1) == rt.argmax(-1)).float().mean().item() if sim.dim() > 1 else 1.0
    return Parity(len(sim), 100.0 * agree, float((sim - rt).abs().max()), step)
