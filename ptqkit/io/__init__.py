"""Save and load quantized models: one safetensors file, no pickle.

The file holds the tensors of the quantized model's state (integer weights, their scales and zero
points, float biases, activation scales / zero points / calibrated ranges, and any parameter left
in float), the float reference (each layer's float weight after BN folding, CLE and SmoothQuant,
and the float bias kept by bias correction), and, in the safetensors header's metadata under the
key ``"ptqkit"``, one JSON document: the :class:`~ptqkit.PTQConfig`, the ptqkit and file-format
versions, each layer's and each activation quantizer's spec, state and label, a summary of
:class:`~ptqkit.info.PTQInfo`, the structure and wiring of the graph, and one SHA-256 digest over
that document and every tensor (:mod:`ptqkit.io.container`): changing any byte of the file makes
it a :class:`~ptqkit.LoadError`. Saving the same model twice gives the same bytes.

The float reference costs 4 bytes per weight (an 8-bit model's file is about 5/4 of the float
model's size instead of 1/4): without it a loaded model in float mode would not be the float
network that was quantized, and ``sensitivity``, the report's histograms and the fallback's
float layers would compare against another network.

Why :func:`load` needs the model's architecture: a quantized model is the user's network with
quantizers in its graph. Its structure is Python code (the ``forward`` methods of the user's
classes, traced by ``torch.fx``); rebuilding it from a file would mean executing code stored in
that file (as ``torch.load`` of a pickle does), and ptqkit never executes code from files. So a
file stores data only, and :func:`load` rebuilds the structure by running ptqkit's own prepare
step on the float architecture the caller passes, then fills it with the stored integers and
ranges, each validated (:mod:`ptqkit.io.restore`): the loaded model computes bit-identical
outputs. Stages that change the structure after prepare (CLE's clamps, SmoothQuant's smoothing
quantizers) are replayed from data as well (:mod:`ptqkit.io.replay`).
"""

from .model import load, save

__all__ = ["load", "save"]
