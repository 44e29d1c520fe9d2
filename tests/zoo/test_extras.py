"""The demo's packages are an extra: a core install is told the one command that adds them."""

from __future__ import annotations

import sys

import pytest

from ptqkit import LoadError
from ptqkit.cli import main
from ptqkit.zoo import data, models
from ptqkit.zoo.extras import EXTRA_OF, require


@pytest.fixture
def without(monkeypatch):
    """Make ``import name`` fail as it does where the package is not installed."""

    def hide(*names: str) -> None:
        for name in names:
            for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                monkeypatch.delitem(sys.modules, mod)
            monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError

    return hide


def test_require_names_package_and_extra(without):
    without("skimage")
    with pytest.raises(LoadError) as e:
        require("skimage.data", "the bundled photos")
    msg = str(e.value)
    assert "the bundled photos" in msg and "'scikit-image'" in msg
    assert "pip install 'ptqkit[demo]'" in msg


@pytest.mark.parametrize(
    ("hidden", "load"),
    [
        ("skimage", lambda: data._photo_uint8.__wrapped__("chelsea")),
        ("sklearn", lambda: data._digits_raw.__wrapped__()),
        ("efficientnet_lite_pytorch", models.efficientnet_lite0),
    ],
)
def test_zoo_loaders_say_which_extra(without, hidden, load):
    without(hidden)
    with pytest.raises(LoadError, match=r"ptqkit\[demo\]"):
        load()


def test_every_optional_module_has_an_extra_in_pyproject():
    from pathlib import Path

    import tomllib

    meta = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    core = " ".join(meta["project"]["dependencies"]).lower()
    extras = meta["project"]["optional-dependencies"]
    for module, extra in EXTRA_OF.items():
        from ptqkit.zoo.extras import PYPI_NAME

        name = PYPI_NAME.get(module, module).lower()
        assert name not in core, f"{name} must not be a core dependency"
        assert any(req.lower().startswith(name) for req in extras[extra]), (module, extra)


def test_demo_without_the_extra_says_the_command(without, tmp_path, monkeypatch, capsys):
    without("efficientnet_lite_pytorch")
    monkeypatch.chdir(tmp_path)
    rc = main(["demo", "--out", str(tmp_path / "demo-out")])
    err = capsys.readouterr().err
    assert rc != 0
    assert "efficientnet-lite-pytorch" in err and "pip install 'ptqkit[demo]'" in err
    assert not (tmp_path / "demo-out").exists()  # refused before anything was written
