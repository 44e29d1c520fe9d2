"""``qB.load_state_dict(qA.state_dict())``: qB computes what qA does, bit for bit, or the load
fails naming the entry; a float reference the state dict does not carry is refused, not used."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit import ModelError, PTQConfig, QuantSpec
from ptqkit.quant.modules import act_quants, float_mode, quant_layers

CFG = PTQConfig(progress=False)


class Net(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8 * 8 * 8, 32), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def _data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, 3, 8, 8, generator=g) for _ in range(4)]


X = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(5))


def _q(seed: int, config: PTQConfig = CFG) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ptqkit.quantize(Net(seed).eval(), _data(), config)


def _out(m: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return m(X)


def _sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()))


def test_loading_another_models_state_computes_what_it_computes() -> None:
    qa, qb = _q(0), _q(1, CFG.replace(bias_correction=False))
    assert not torch.equal(_out(qa), _out(qb))
    qb.load_state_dict(qa.state_dict())
    assert torch.equal(_out(qb), _out(qa))  # bit for bit
    # and that is the quantized float model 0 (W8A8): close to it, far from model 1
    assert _sqnr(_out(Net(0).eval()), _out(qb)) > 25.0
    # qb's float weights are model 1's: not the reference of what it now computes
    with pytest.raises(ModelError, match=r"float reference of .*conv"), float_mode(qb):
        pass


def test_a_round_trip_through_bytes_keeps_float_layers_and_quantizer_modes() -> None:
    qa, qb = _q(0), _q(0)
    layer, aq = quant_layers(qa)["fc1"], next(iter(act_quants(qa).values()))
    layer.use_float()  # kept in float (as the accuracy fallback does)
    aq.mode = "off"
    buf = io.BytesIO()
    torch.save(qa.state_dict(), buf)
    buf.seek(0)
    qb.load_state_dict(torch.load(buf))
    assert not quant_layers(qb)["fc1"].quantized
    assert act_quants(qb)[next(iter(act_quants(qa)))].mode == "off"
    assert torch.equal(_out(qb), _out(qa))
    with float_mode(qb), float_mode(qa):  # the same float model: its reference holds
        assert torch.equal(_out(qb), _out(qa))


def test_per_channel_scales_into_a_per_tensor_model_are_refused() -> None:
    qa = _q(0)
    qb = _q(0, CFG.replace(weights=QuantSpec(bits=8, per_channel=False)))
    with pytest.raises(RuntimeError, match=r"conv\.weight_int/scale/zero_point: .*per tensor"):
        qb.load_state_dict(qa.state_dict())


def test_an_invalid_scale_is_refused() -> None:
    qa, qb = _q(0), _q(1)
    state = qa.state_dict()
    state["fc2.weight_scale"] = state["fc2.weight_scale"].clone()
    state["fc2.weight_scale"][0] = float("nan")
    with pytest.raises(RuntimeError, match=r"fc2\.weight_int/scale/zero_point: scale not finite"):
        qb.load_state_dict(state)


def test_ptqkit_save_and_load_still_carry_the_float_reference(tmp_path) -> None:
    qa = _q(0)
    ptqkit.save(qa, tmp_path / "q.safetensors")
    qb = ptqkit.load(tmp_path / "q.safetensors", Net(1))
    assert torch.equal(_out(qb), _out(qa))
    with float_mode(qb), float_mode(qa):
        assert torch.equal(_out(qb), _out(qa))
