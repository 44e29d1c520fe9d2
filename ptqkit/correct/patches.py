"""Input patches of a conv at chosen output positions: the rows ``x`` of ``y[p] = W·x[p] + b``
that layer-wise reconstruction (AdaRound) optimizes on. A standard zero-padded ``nn.Conv2d``
is gathered by indexing; any other conv (a subclass with its own padding, 1-D or 3-D) by running
the layer itself with an identity kernel, so that whatever padding its ``forward`` applies is
respected. Memory is bounded by :data:`PATCH_BUDGET` floats at once."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ModelError

#: floats materialized at once when extracting conv patches (bounds memory)
PATCH_BUDGET = 4_000_000

#: the layers whose input patches :func:`patches` extracts
Conv = (
    nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d
)


def _conv(m: nn.Module) -> Conv:
    if not isinstance(m, Conv):
        raise ModelError(f"input patches need a convolution, got {type(m).__name__}")
    return m


def identity_kernel(conv: nn.Module) -> torch.Tensor:
    """Weight of a conv with the same geometry whose output channels are its input patches:
    output channel ``g·(cpg·K) + j·K + k`` copies input channel ``g·cpg + j`` at kernel tap
    ``k``."""
    conv = _conv(conv)
    g = conv.groups
    cpg = conv.weight.shape[1]
    k = tuple(conv.weight.shape[2:])
    n = cpg * math.prod(k)
    eye = torch.eye(n, dtype=conv.weight.dtype, device=conv.weight.device).reshape(n, cpg, *k)
    return eye.repeat(g, *([1] * (eye.dim() - 1)))


def gather_patches(conv: nn.Conv2d, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
    """Patches of a standard zero-padded ``nn.Conv2d`` by indexing (``None`` when the layer
    is not one: a subclass with its own ``forward``, string or non-zero padding)."""
    if (
        type(conv).forward is not nn.Conv2d.forward
        or conv.padding_mode != "zeros"
        or isinstance(conv.padding, str)
        or x.dim() != 4
    ):
        return None
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = (
        conv.kernel_size,
        conv.stride,
        conv.dilation,
        conv.padding,
    )
    h_out = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    hp, wp = xp.shape[2], xp.shape[3]
    # whole channel vectors by one index_select on the channels-last batch (a 4-index advanced
    # gather was 6-9x slower on 3x3 convs): row of tap (i, j) of output position (n, h, w) is
    # n·Hp·Wp + (h·sh + i·dh)·Wp + w·sw + j·dw
    flat = xp.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # [N·Hp·Wp, C]
    n, r = rows // (h_out * w_out), rows % (h_out * w_out)
    first = n * (hp * wp) + (r // w_out) * (sh * wp) + (r % w_out) * sw  # [P]
    dev = x.device
    taps = (torch.arange(kh, device=dev) * (dh * wp))[:, None] + torch.arange(kw, device=dev) * dw
    p = flat.index_select(0, (first[:, None] + taps.reshape(1, -1)).reshape(-1))
    return (
        p.reshape(len(rows), kh * kw, x.shape[1])
        .transpose(1, 2)
        .reshape(len(rows), conv.groups, -1)
    )


def patches(conv: nn.Module, x: torch.Tensor, rows: torch.Tensor, per_image: int) -> torch.Tensor:
    """The input patches ``[len(rows), groups, cpg·K]`` of output positions ``rows`` (row
    ``n·per_image + p`` = image ``n``, position ``p``): gathered directly for a standard
    ``nn.Conv2d``, otherwise by running ``conv`` itself with an identity kernel (any padding its
    ``forward`` applies, any dimensionality)."""
    if isinstance(conv, nn.Conv2d):
        got = gather_patches(conv, x, rows)
        if got is not None:
            return got
    conv = _conv(conv)
    kernel = identity_kernel(conv)
    width = kernel.shape[0]
    chunk = max(1, PATCH_BUDGET // max(1, width * per_image))
    saved_w, saved_b = conv._buffers["weight"], conv.bias
    out = []
    try:
        conv._buffers["weight"] = kernel
        conv.bias = None
        for a in range(0, x.shape[0], chunk):
            sel = rows[(rows >= a * per_image) & (rows < (a + chunk) * per_image)]
            if sel.numel() == 0:
                continue
            z = conv(x[a : a + chunk])
            z = z.movedim(1, -1).reshape(-1, width)
            out.append(z[sel - a * per_image])
    finally:
        conv._buffers["weight"] = saved_w
        conv.bias = saved_b
    return torch.cat(out).reshape(len(rows), conv.groups, -1)


def rows_of(y: torch.Tensor, linear: bool) -> tuple[torch.Tensor, int]:
    """``y`` as ``[rows, channels]`` and the number of rows per image."""
    if linear:
        flat = y.reshape(-1, y.shape[-1])
        return flat, flat.shape[0] // max(1, y.shape[0]) if y.dim() > 1 else 1
    flat = y.movedim(1, -1).reshape(-1, y.shape[1])
    return flat, flat.shape[0] // y.shape[0]


__all__ = ["gather_patches", "identity_kernel", "patches", "rows_of"]
