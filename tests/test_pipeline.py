"""``ptqkit.quantize`` end to end on a small real model (a CNN trained on scikit-learn's digits):
the user's model is left alone, the result is close to float with integer weights, batches come
in every supported form, and bad input fails with an error that says what is wrong."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptqkit
from ptqkit import CalibrationError, ConfigError, DataError, ModelError, PTQConfig, QuantSpec
from ptqkit.quant import sqnr_db
from ptqkit.quant.modules import act_quants, quant_layers

CFG = PTQConfig(progress=False)


# -- the user's model ----------------------------------------------------------------------------
def _snapshot(model: nn.Module) -> dict:
    """Everything about a model a quantizer could disturb, as bytes and plain values."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)  # parameters and buffers, byte for byte
    hook_dicts = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_state_dict_hooks",
        "_load_state_dict_pre_hooks",
    )
    return {
        "state": buf.getvalue(),
        "tensors": {
            n: (t.data_ptr(), t.dtype, t.device, t.requires_grad, t.grad is None)
            for n, t in [*model.named_parameters(), *model.named_buffers()]
        },
        "modules": [(n, type(m), m.training) for n, m in model.named_modules()],
        "hooks": {
            n: {d: list(getattr(m, d, {}).items()) for d in hook_dicts}
            for n, m in model.named_modules()
        },
        "attrs": {n: sorted(vars(m)) for n, m in model.named_modules()},
    }


@pytest.mark.parametrize("train_mode", [False, True])
def test_user_model_is_untouched_byte_for_byte(digits_cnn, calib_batches, train_mode):
    model = digits_cnn.train(train_mode)
    calls = []
    model.conv1.register_forward_hook(lambda m, i, o: calls.append(1))
    model.register_forward_pre_hook(lambda m, i: None)
    before = _snapshot(model)
    qmodel = ptqkit.quantize(model, calib_batches, CFG)
    assert _snapshot(model) == before  # BN statistics too: calibration runs in eval mode
    assert model.training is train_mode
    assert qmodel is not model and not qmodel.training
    assert not any(p is q for p in model.parameters() for q in qmodel.parameters())


def test_quantized_model_is_close_to_float(digits_cnn, quantized_digits, digits_data):
    _, _, x_test, y_test = digits_data
    with torch.no_grad():
        want, got = digits_cnn(x_test), quantized_digits(x_test)
    assert sqnr_db(want, got) > 25
    assert (want.argmax(1) == got.argmax(1)).float().mean() >= 0.98
    acc_f = (want.argmax(1) == y_test).float().mean()
    acc_q = (got.argmax(1) == y_test).float().mean()
    assert acc_f > 0.9 and acc_f - acc_q <= 0.01


def test_weights_are_stored_as_integers(quantized_digits):
    layers = quant_layers(quantized_digits)
    assert sorted(layers) == ["conv1", "conv2", "conv3", "fc"]
    for name, layer in layers.items():
        q = layer.weight_int
        assert q.dtype == torch.int8 and q.shape == layer.weight_fp.shape, name
        assert int(q.min()) >= -128 and int(q.max()) <= 127
        assert layer.weight_scale.shape == (q.shape[0],)  # per channel by default
        assert layer.weight_zero_point.dtype == torch.int32 and not layer.weight_zero_point.any()
        shape = (-1,) + (1,) * (q.dim() - 1)
        torch.testing.assert_close(
            layer.weight, q.float() * layer.weight_scale.reshape(shape), rtol=0, atol=0
        )
        assert layer.bias.dtype == torch.float32  # biases stay float
    state = quantized_digits.state_dict()
    assert not any(k.endswith(".weight") for k in state), "no float weight is stored"


@pytest.mark.parametrize(
    ("spec", "dtype", "lo", "hi"),
    [
        (QuantSpec(bits=4, per_channel=True), torch.int8, -8, 7),
        (QuantSpec(bits=12, per_channel=False), torch.int16, -2048, 2047),
        (QuantSpec(bits=8, symmetric=False, per_channel=True), torch.uint8, 0, 255),
    ],
)
def test_weight_storage_dtype_follows_the_spec(digits_cnn, calib_batches, spec, dtype, lo, hi):
    q = ptqkit.quantize(digits_cnn, calib_batches, CFG.replace(weights=spec))
    for layer in quant_layers(q).values():
        w = layer.weight_int
        assert w.dtype == dtype and lo <= int(w.min()) and int(w.max()) <= hi
        assert layer.weight_scale.dim() == (1 if spec.per_channel else 0)


def test_every_activation_quantizer_is_calibrated(quantized_digits):
    info = quantized_digits.ptq_info
    assert info.calibration_batches == 4 and info.calibration_samples == 256
    assert not info.disabled and not info.warnings
    quants = act_quants(quantized_digits)
    assert set(quants) == set(info.quantizers)
    assert all(q.calibrated and q.mode == "quant" for q in quants.values())


def test_weights_only_config_places_no_activation_quantizer(digits_cnn, calib_batches):
    q = ptqkit.quantize(digits_cnn, calib_batches, CFG.replace(activations=None))
    assert not act_quants(q) and all(layer.quantized for layer in quant_layers(q).values())


# -- batch forms ---------------------------------------------------------------------------------
def _ranges(qmodel: nn.Module) -> dict[str, list[float]]:
    return {n: q.range.tolist() for n, q in act_quants(qmodel).items()}


def test_tensor_tuple_list_and_dict_batches_calibrate_the_same(digits_cnn, digits_data):
    x, y = digits_data[0][:256], digits_data[1][:256]
    chunks = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    forms = {
        "tensor": [xb for xb, _ in chunks],
        "tuple": chunks,
        "list": [[xb, yb] for xb, yb in chunks],
        "dict": [{"x": xb} for xb, _ in chunks],
        "loader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), 64),
    }
    ranges = {k: _ranges(ptqkit.quantize(digits_cnn, v, CFG)) for k, v in forms.items()}
    assert all(r == ranges["tensor"] for r in ranges.values())


def test_generator_data_is_consumed_in_one_pass(digits_cnn, calib_batches):
    q = ptqkit.quantize(digits_cnn, (b for b in calib_batches), CFG)
    assert q.ptq_info.calibration_samples == 256


def test_empirical_bias_correction_serves_one_shot_data(digits_cnn, calib_batches):
    """It takes its float means and batches during the calibration pass (its tap): a generator
    gives the same model as a list."""
    cfg = CFG.replace(bias_correction="empirical")
    once = ptqkit.quantize(digits_cnn, (b for b in calib_batches), cfg)
    listed = ptqkit.quantize(digits_cnn, calib_batches, cfg)
    x = calib_batches[0]
    with torch.no_grad():
        assert torch.equal(once(x), listed(x))
    assert once.ptq_info.details["bias_correction"]["corrected"]


@pytest.mark.parametrize("changes", [{"calibration": "auto"}, {"max_degradation": 1.0}])
def test_one_shot_data_for_a_stage_that_needs_two_passes_is_a_data_error(
    digits_cnn, calib_batches, changes
):
    with pytest.raises(DataError, match="more than once, but it is a one-shot generator"):
        ptqkit.quantize(digits_cnn, (b for b in calib_batches), CFG.replace(**changes))


def test_num_batches_limits_calibration(digits_cnn, calib_batches):
    q = ptqkit.quantize(digits_cnn, calib_batches * 3, CFG.replace(num_batches=2))
    assert q.ptq_info.calibration_batches == 2 and q.ptq_info.calibration_samples == 128


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("data", [[], iter(()), torch.utils.data.TensorDataset(torch.zeros(0, 1))])
def test_empty_data_is_a_data_error(digits_cnn, data):
    with pytest.raises(DataError, match="empty"):
        ptqkit.quantize(digits_cnn, data, CFG)


def test_single_tensor_instead_of_batches_is_a_data_error(digits_cnn, calib_batches):
    with pytest.raises(DataError, match="wrap it in a list"):
        ptqkit.quantize(digits_cnn, calib_batches[0], CFG)


def test_batch_the_model_rejects_names_its_index(digits_cnn, calib_batches):
    bad = torch.zeros(8, 3, 8, 8)  # 3 channels for a 1-channel model
    with pytest.raises(DataError, match=r"batch 2 \(input shapes \[\(8, 3, 8, 8\)\]\)"):
        ptqkit.quantize(digits_cnn, [*calib_batches[:2], bad, calib_batches[3]], CFG)


def test_batch_of_an_unsupported_type_names_its_index(digits_cnn, calib_batches):
    with pytest.raises(DataError, match="batch 1 is a str"):
        ptqkit.quantize(digits_cnn, [calib_batches[0], "oops"], CFG)


def test_model_without_quantizable_layer_is_a_model_error(calib_batches):
    with pytest.raises(ModelError, match="no quantizable layer"):
        ptqkit.quantize(nn.Sequential(nn.ReLU(), nn.Flatten()), calib_batches, CFG)


def test_model_whose_layers_are_all_skipped_is_a_model_error(digits_cnn, calib_batches):
    with pytest.raises(ModelError, match="left after `skip`"):
        ptqkit.quantize(digits_cnn, calib_batches, CFG.replace(skip=("*",)))


def test_not_a_module_is_a_model_error(calib_batches):
    with pytest.raises(ModelError, match=r"torch\.nn\.Module"):
        ptqkit.quantize(lambda x: x, calib_batches, CFG)


def test_num_batches_zero_is_a_config_error():
    with pytest.raises(ConfigError, match="num_batches"):
        PTQConfig(num_batches=0)


def test_config_of_the_wrong_type_is_a_config_error(digits_cnn, calib_batches):
    with pytest.raises(ConfigError, match="PTQConfig"):
        ptqkit.quantize(digits_cnn, calib_batches, {"calibration": "kl"})


class LogNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 2)

    def forward(self, x):
        return self.dec(torch.log(self.enc(x)))  # log of negative values: NaN


def test_nan_activations_are_a_calibration_error_naming_the_layer():
    data = [torch.randn(32, 4) for _ in range(4)]
    with pytest.raises(CalibrationError, match=r"input of dec \(log\).*NaN"):
        ptqkit.quantize(LogNet().eval(), data, CFG)


def test_nan_in_the_input_data_is_a_calibration_error(digits_cnn, calib_batches):
    bad = calib_batches[1].clone()
    bad[3, 0, 2, 2] = float("nan")
    with pytest.raises(CalibrationError, match=r"input of conv1 \(x\).*NaN"):
        ptqkit.quantize(digits_cnn, [calib_batches[0], bad], CFG)


def test_few_calibration_samples_warn(digits_cnn, calib_batches):
    with pytest.warns(ptqkit.PTQWarning, match="only 10 samples: .* at least 100-1000"):
        q = ptqkit.quantize(digits_cnn, [calib_batches[0][:10]], CFG)
    assert q.ptq_info.calibration_samples == 10


# -- a model with dropout and train-only behaviour -----------------------------------------------
def test_train_mode_behaviour_is_not_used_for_calibration(digits_data):
    class DropNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(64, 32)
            self.drop = nn.Dropout(0.5)
            self.fc2 = nn.Linear(32, 10)

        def forward(self, x):
            return self.fc2(self.drop(F.relu(self.fc1(x.flatten(1)))))

    torch.manual_seed(0)
    model = DropNet().train()
    x = digits_data[0][:256]
    q1 = ptqkit.quantize(model, [x[:128], x[128:]], CFG)
    q2 = ptqkit.quantize(copy.deepcopy(model).eval(), [x[:128], x[128:]], CFG)
    assert _ranges(q1) == _ranges(q2)  # no dropout noise in the calibrated ranges
    assert model.training


def test_a_copy_of_the_quantized_model_keeps_its_record(quantized_digits, digits_data):
    q = copy.deepcopy(quantized_digits)
    assert q.ptq_config == quantized_digits.ptq_config
    assert q.ptq_info.quantizers == quantized_digits.ptq_info.quantizers
    x = digits_data[2]
    with torch.no_grad():
        assert torch.equal(q(x), quantized_digits(x))
