"""``compile_int8``: a program from :func:`~ptqkit.export.pt2.export_pt2` compiled by
``torch.compile`` (Inductor, ``freezing=True``), and a count of the kernels it really runs.

Inductor's x86 int8 lowering ships with PyTorch (``torch/_inductor/fx_passes/quantization.py``;
no torchao needed in torch 2.13): with freezing on, it matches ``DQ(x) → conv/linear(DQ(w_int8))
[→ unary] [→ Q]`` and replaces it by oneDNN's ``onednn.qconv_pointwise`` /
``onednn.qlinear_pointwise`` (weights prepacked once), a residual add by the ``.binary`` variant.
A pattern it does not match stays a float ``convolution``/``mm`` on dequantized tensors — still
right, but not int8. :class:`KernelCount` reads the generated code
(``torch._inductor.utils.run_and_get_code``) and counts both, so a caller can say how many
conv/linear layers ran on integer kernels, as :func:`~ptqkit.export.kernel_report` does for
ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch

from ...errors import ExportError, PTQWarning
from ..onnx import _first_line
from .modules import qd_ops
from .program import program_report

#: oneDNN int8 conv/linear kernels in Inductor's generated code
INT8_KERNEL = re.compile(r"torch\.ops\.onednn\.(q(?:conv|linear)\w*)(?:\.\w+)?\(")
#: float conv/linear kernels (Inductor's extern kernels, mkldnn/mkl packed float ops; a conv fused
#: with a following add is the in-place ``mkldnn._convolution_pointwise_.binary``)
FLOAT_KERNEL = re.compile(
    r"(extern_kernels\.(?:convolution|mm|addmm|bmm)|torch\.ops\.mkldnn\._(?:convolution|linear)"
    r"_pointwise_?|torch\.ops\.mkl\._mkl_linear|torch\.ops\.aten\.(?:convolution|mm|addmm))"
    r"(?:\.\w+)?\("
)


@dataclasses.dataclass(frozen=True)
class KernelCount:
    """What Inductor's code runs for the program's ``layers`` conv/linear nodes: ``int8`` oneDNN
    int8 conv/linear calls (``kernels``: how many of each), ``float`` float conv/linear calls."""

    layers: int
    int8: int
    float: int
    kernels: dict[str, int]

    @property
    def all_int8(self) -> bool:
        return self.layers > 0 and self.int8 >= self.layers and self.float == 0

    def summary(self) -> str:
        names = ", ".join(f"{k} ×{v}" for k, v in sorted(self.kernels.items())) or "none"
        return (
            f"Inductor: {self.int8}/{self.layers} conv/linear on oneDNN int8 kernels ({names}), "
            f"{self.float} float conv/linear kernels"
        )


def count_kernels(code: str, layers: int) -> KernelCount:
    """Count int8 and float conv/linear calls in Inductor's generated ``code`` (comments out)."""
    int8: Counter[str] = Counter()
    n_float = 0
    for line in code.splitlines():
        if line.lstrip().startswith("#"):
            continue
        int8.update(INT8_KERNEL.findall(line))
        n_float += len(FLOAT_KERNEL.findall(line))
    return KernelCount(layers, sum(int8.values()), n_float, dict(int8))


class Int8Compiled:
    """The compiled program as a callable; every call runs with Inductor's freezing on and
    autograd off (a new input shape recompiles under the same settings). ``kernels``: the
    :class:`KernelCount` of the first compilation."""

    def __init__(self, fn: Any, kernels: KernelCount) -> None:
        self._fn = fn
        self.kernels = kernels

    def __call__(self, *args: Any) -> Any:
        with torch._inductor.config.patch(freezing=True), torch.no_grad():
            return self._fn(*args)


def compile_int8(
    program: torch.export.ExportedProgram, example: Any = None, *, warn: bool = True
) -> Int8Compiled:
    """``torch.compile`` (Inductor, freezing) of ``program``, compiled now on ``example`` (default:
    the program's own example inputs) and its kernels counted.

    Warns (:class:`~ptqkit.errors.PTQWarning`) when a conv/linear did not get an int8 kernel (a
    CPU or an op without oneDNN int8 support): the outputs stay right, the speed is float's.

    Raises:
        ExportError: not an ExportedProgram, no example, or a compilation failure.
    """
    if not isinstance(program, torch.export.ExportedProgram):
        raise ExportError(
            f"compile_int8 takes a torch.export.ExportedProgram (ptqkit.export_pt2), got "
            f"{type(program).__name__}"
        )
    qd_ops()
    args = _example(program, example)
    fn = torch.compile(program.module(), backend="inductor")
    from torch._inductor.utils import run_and_get_code

    try:
        # (warnings: torch's own "To copy construct from a tensor", from its weight packing)
        with torch._inductor.config.patch(freezing=True), torch.no_grad(), _quiet():
            _, codes = run_and_get_code(fn, *args)
    except Exception as e:
        raise ExportError(f"torch.compile (Inductor) failed: {_first_line(e)}") from e
    kernels = count_kernels("\n".join(codes), len(program_report(program).layers))
    if warn and not kernels.all_int8:
        warnings.warn(
            f"not every conv/linear runs int8: {kernels.summary()}", PTQWarning, stacklevel=2
        )
    return Int8Compiled(fn, kernels)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "To copy construct", UserWarning)
        yield


def _example(program: torch.export.ExportedProgram, example: Any) -> tuple:
    if example is None:
        stored = getattr(program, "example_inputs", None)
        if not stored or stored[1]:
            raise ExportError("compile_int8 needs an example input (the program holds none)")
        example = stored[0]
    args = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise ExportError("example must be a tensor or a tuple of tensors")
    return args


__all__ = [
    "FLOAT_KERNEL",
    "INT8_KERNEL",
    "Int8Compiled",
    "KernelCount",
    "compile_int8",
    "count_kernels",
]
