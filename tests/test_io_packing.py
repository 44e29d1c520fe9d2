"""4-bit (and lower) weights packed two per byte in a saved file; group-wise W4 models saved
and loaded bit for bit (ptqkit.io.packing, ptqkit.save / ptqkit.load)."""

import math

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.config import GPTQOptions, PTQConfig, QuantSpec
from ptqkit.errors import LoadError
from ptqkit.io import container
from ptqkit.io.packing import pack, unpack
from ptqkit.quant.modules import quant_layers
from ptqkit.quant.primitives import storage_dtype


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("n", [1, 7, 64])
def test_pack_round_trips_every_grid_value(bits: int, symmetric: bool, n: int) -> None:
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    grid = torch.arange(spec.qmin, spec.qmax + 1)
    q = grid[torch.randint(len(grid), (n, 3), generator=torch.Generator().manual_seed(n))]
    q = q.to(storage_dtype(spec))
    p = pack(q, spec)
    assert p.dtype == torch.uint8 and p.numel() == math.ceil(q.numel() / 2)
    back = unpack(p, spec, tuple(q.shape))
    assert back.dtype == q.dtype and torch.equal(back, q)
    both = pack(grid.to(storage_dtype(spec)), spec)  # low nibble first
    assert int(both[0]) == (grid[0] - spec.qmin) | ((grid[1] - spec.qmin) << 4)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(96, 128)
        self.down = nn.Linear(128, 33)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x)))


@pytest.mark.parametrize(
    ("weights", "gptq"),
    [
        (QuantSpec(bits=4, per_channel=True, group_size=32), None),
        (QuantSpec(bits=4, symmetric=False, per_channel=True, group_size=40), GPTQOptions()),
        (QuantSpec(bits=3, per_channel=True), GPTQOptions(act_order=True)),
    ],
)
def test_groupwise_w4_save_load_bit_identical(tmp_path, weights, gptq) -> None:
    torch.manual_seed(0)
    model = _MLP().eval()
    data = [torch.randn(16, 96) for _ in range(4)]
    cfg = PTQConfig(weights=weights, activations=None, gptq=gptq, progress=False)
    q = ptqkit.quantize(model, data, cfg)
    path = tmp_path / "m.ptq"
    ptqkit.save(q, path)
    tensors, doc = container.read(path)
    for name, layer in quant_layers(q).items():
        stored = tensors[f"{name}.weight_int"]
        assert stored.dtype == torch.uint8 and stored.numel() == math.ceil(
            layer.weight_int.numel() / 2
        )
        assert doc["layers"][name]["packed"] == "nibbles"
    back = ptqkit.load(path, _MLP())
    x = torch.randn(8, 96)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    for name, layer in quant_layers(back).items():
        mine = quant_layers(q)[name]
        for attr in ("weight_int", "weight_scale", "weight_zero_point"):
            a, b = getattr(layer, attr), getattr(mine, attr)
            assert a.dtype == b.dtype and torch.equal(a, b)
    with torch.no_grad():
        ref = model(x)
        assert (
            float((back(x) - ref).pow(2).mean()) < float(ref.pow(2).mean()) * 0.5
        )  # compared with FP32


def test_bad_packed_entry_is_a_load_error(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = PTQConfig(
        weights=QuantSpec(bits=4, per_channel=True, group_size=32),
        activations=None,
        progress=False,
    )
    q = ptqkit.quantize(_MLP().eval(), [torch.randn(8, 96)], cfg)
    path = tmp_path / "m.ptq"
    ptqkit.save(q, path)
    tensors, doc = container.read(path)
    tensors = dict(tensors)
    tensors["up.weight_int"] = tensors["up.weight_int"][:-1].clone()  # one byte short, re-signed
    container.write(tmp_path / "bad.ptq", tensors, doc)
    with pytest.raises(LoadError, match=r"up\.weight_int.*packed"):
        ptqkit.load(tmp_path / "bad.ptq", _MLP())
