"""Post-processing of the exported ONNX graph so that ONNX Runtime runs it on integer kernels.

The TorchScript exporter emits a correct QDQ graph, but one whose shape keeps ONNX Runtime's
QDQ fusions (``DQ → op → Q`` ⇒ ``QLinearConv`` / ``QGemm`` / ``QLinearAdd`` ...) from firing.
Each pass below rewrites one such pattern into an equivalent one; every rewrite is *exact*: the
graph computes the same numbers before and after (or, for the int32 bias, the numbers an integer
kernel computes anyway). Passes run in registry order; adding a rule is one
:func:`register_pass` entry.

==========================  ====================================================================
pass                        rewrite
==========================  ====================================================================
``inline_identities``       ``Identity(initializer)`` → the initializer itself
``scalar_qparams``          per-tensor Q/DQ scale and zero point of shape ``[1]`` → rank 0
                            (ORT only drops a Relu/Clip before ``Q``, and so fuses ``Conv →
                            ReLU6 → Q`` or ``Add → ReLU → Q``, with rank-0 parameters)
``uint8_activations``       signed activation grid (int8, zero point ``z``) → uint8 with
                            ``z + 128``: the same values (ORT's x86 ``QLinearConv`` wants uint8)
``fold_constants``          constant sub-graphs (the shape arithmetic of ``F.pad``) → initializers
``transpose_weights``       ``DQ(int W) → Transpose`` → ``DQ(int Wᵀ, axis permuted)``
``hoist_quantize``          ``X → Flatten/Reshape/MaxPool/Pad… → Q`` → ``X → Q → DQ → … → Q``
                            (``Q`` commutes with value-preserving ops: ``X`` gets its integer
                            kernel, e.g. ``QLinearGlobalAveragePool``)
``requantize_passthrough``  ``DQ → MaxPool/Flatten/Reshape/Pad… → op`` → ``… → Q → DQ → op``
                            (the values are on the grid already: ``Q∘DQ`` is the identity on them)
``fold_pad_into_conv``      ``Pad(constant 0) → Conv`` → ``Conv(pads += ...)`` (a conv pads with
                            real 0, which is the zero point: exact)
``bias_to_int32``           float bias of ``Conv``/``Gemm``/``MatMul+Add`` fed by ``DQ(x)`` and
                            ``DQ(W)`` → ``DQ(int32, scale = s_x·s_w, zero point 0)``
``tidy_names``              short tensor names (``aq_r1.q``, ``conv1.weight``, ``/conv1/Conv``)
``share_constants``         identical small initializers (zero points, scales) → one
``prune``                   nodes whose outputs nobody reads, initializers nobody uses
==========================  ====================================================================
"""

# registration order is run order: the pass modules are imported in this order
from .registry import PASSES, PassFn, register_pass, run_passes  # isort: split

from . import fusion  # isort: split

from . import bias  # isort: split

from . import tidy

__all__ = ["PASSES", "PassFn", "bias", "fusion", "register_pass", "run_passes", "tidy"]
