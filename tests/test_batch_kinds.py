"""Batches the float model accepts are accepted by quantize and evaluate, or refused with a
DataError that names the real reason (issue 27, item 9): layouts (sparse, channels-last,
non-contiguous), dtypes (float64, integer token ids, bool masks, complex), structures (nested
tuples/dicts, lists of tensors, None)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.data import fresh_inputs, split_batch, to_device

CFG = ptqkit.PTQConfig(progress=False)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _xs(n: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(16, 8, generator=gen) for _ in range(n)]


def _quantize(model: nn.Module, data: list) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ptqkit.PTQWarning)
        return ptqkit.quantize(model, data, CFG)


def _sqnr(model: nn.Module, q: nn.Module, batch) -> float:
    args, kwargs = split_batch(batch)
    with torch.no_grad():
        f, g = model(*args, **kwargs), q(*args, **kwargs)
    return 10 * math.log10(float(f.pow(2).sum()) / max(float((f - g).pow(2).sum()), 1e-30))


class Dense(nn.Module):
    """An MLP whose forward accepts sparse input (made dense first), or casts to float32."""

    def __init__(self, cast: bool = False) -> None:
        super().__init__()
        self.net, self.cast = _mlp(), cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to_dense() if x.layout != torch.strided else x
        return self.net(x.float() if self.cast else x)


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_into_a_quantized_layer_names_the_layout_not_the_model(layout):
    sparse = [x.to_sparse() if layout == "coo" else x.to_sparse_csr() for x in _xs()]
    model = _mlp()
    model(sparse[0])  # the float model accepts it
    with pytest.raises(ptqkit.DataError, match=rf"ptqkit cannot run batch 0 .*sparse_{layout}"):
        _quantize(model, sparse)


@pytest.mark.parametrize(
    "kind",
    ["sparse_coo", "sparse_csr", "channels_last", "non_contiguous", "float64"],
)
def test_other_layouts_and_dtypes_give_the_model_of_the_plain_batch(kind):
    plain = _xs()
    if kind == "channels_last":  # a conv model, NCHW vs NHWC memory
        torch.manual_seed(0)
        model: nn.Module = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten()).eval()
        plain = [x.reshape(4, 2, 4, 4) for x in plain]
        odd = [x.contiguous(memory_format=torch.channels_last) for x in plain]
    else:
        model = Dense(cast=kind == "float64")
        odd = {
            "sparse_coo": lambda: [x.to_sparse() for x in plain],
            "sparse_csr": lambda: [x.to_sparse_csr() for x in plain],
            "non_contiguous": lambda: [x.t().contiguous().t() for x in plain],
            "float64": lambda: [x.double() for x in plain],
        }[kind]()
    q_odd, q_plain = _quantize(model, odd), _quantize(model, plain)
    with torch.no_grad():
        for a, b in zip(odd, plain):
            assert torch.allclose(q_odd(a), q_plain(b), rtol=1e-4, atol=1e-5)
    res = ptqkit.evaluate(model, q_odd, odd, metric="agreement", progress_bar=False)
    assert res.samples == len(odd) * plain[0].shape[0]


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(50, 16), nn.Linear(16, 4)

    def forward(self, ids, mask=None, extra=None):
        h = self.emb(ids)
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        return self.head(h).mean(1)


class Nest(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()

    def forward(self, pair):
        if isinstance(pair, list):  # a list of tensors
            return self.net(sum(pair))
        (x, y), d = pair
        return self.net(x + y * d["z"])


def _structured(kind: str) -> tuple[nn.Module, list]:
    gen = torch.Generator().manual_seed(2)
    if kind in ("ids", "ids_mask", "ids_none"):
        ids = [torch.randint(0, 50, (16, 7), generator=gen) for _ in range(4)]
        if kind == "ids":
            return Tokens().eval(), ids
        if kind == "ids_none":
            return Tokens().eval(), [{"ids": i, "mask": None, "extra": None} for i in ids]
        masks = [torch.rand(16, 7, generator=gen) > 0.3 for _ in ids]
        return Tokens().eval(), [{"ids": i, "mask": m} for i, m in zip(ids, masks)]
    if kind == "list":
        return Nest().eval(), [([x, 0.5 * x],) for x in _xs()]
    return Nest().eval(), [(((x, x), {"z": 0.5 * torch.ones(16, 1)}), None) for x in _xs()]


@pytest.mark.parametrize("kind", ["ids", "ids_mask", "ids_none", "list", "nested"])
def test_structured_batches_quantize_and_match_the_float_model(kind):
    model, data = _structured(kind)
    q = _quantize(model, data)
    assert _sqnr(model, q, data[0]) > 20.0  # W8A8 of these small nets: ~35-45 dB
    res = ptqkit.evaluate(model, q, data, metric="agreement", progress_bar=False)
    assert res.samples == 64 and res.agreement > 50.0


def test_nested_tensors_are_moved_and_copied_at_any_depth():
    x = torch.randn(2, 3)
    args, kwargs = ([(x, {"a": x})],), {"b": (x,)}
    (fa,), fk = fresh_inputs(args, kwargs)
    assert fa[0][0] is not x and torch.equal(fa[0][0], x) and fa[0][1]["a"] is not x
    assert fk["b"][0] is not x and isinstance(fk["b"], tuple)
    (da,), dk = to_device(args, kwargs, torch.device("cpu"))
    assert torch.equal(da[0][1]["a"], x) and torch.equal(dk["b"][0], x)
