"""``PTQInfo.details`` is typed (:mod:`ptqkit.records`) and saved as it was: a file written
before the records were typed loads with the same record, saves it again unchanged, and every
key a real run writes is one the types declare.

``tests/data/digits_records.safetensors`` was written by the ptqkit of the commit before the
records were typed, with this file run as a script from a checkout of it::

    PYTHONPATH=<that checkout> python tests/test_records.py
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

import torch

import ptqkit
from ptqkit.zoo.models import DigitsCNN

OLD_FILE = Path(__file__).parent / "data" / "digits_records.safetensors"
#: CLE, a range margin, affine bias correction and a fallback target: several records
CONFIG = dict(
    cle=True, range_margin=0.01, bias_correction="affine", min_sqnr_db=60.0, progress=False
)


def model_and_data() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """The model (seed 0, untrained: the file's format is what matters) and the seeded
    calibration batches the old file was made from."""
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    gen = torch.Generator().manual_seed(0)
    return model, [torch.randn(16, 1, 8, 8, generator=gen) for _ in range(8)]


def _saved_info(path: Path) -> dict:
    from ptqkit.io import container

    return container.read(path)[1]["info"]


def _declared(td: typing.Any) -> set[str]:
    return set(td.__required_keys__ | td.__optional_keys__)


def test_an_old_file_loads_with_the_same_record():
    saved = _saved_info(OLD_FILE)
    loaded = ptqkit.load(OLD_FILE, model_and_data()[0])
    assert loaded.ptq_info.details == saved["details"]
    assert {"cle", "range_margin", "bias_correction", "fallback"} <= set(saved["details"])


def test_saving_it_again_writes_the_same_info(tmp_path):
    loaded = ptqkit.load(OLD_FILE, model_and_data()[0])
    ptqkit.save(loaded, tmp_path / "again.safetensors")
    old, new = _saved_info(OLD_FILE), _saved_info(tmp_path / "again.safetensors")
    assert new["details"] == old["details"]
    # (the config is today's PTQConfig.to_dict of the same settings: fields may have been added)
    assert {k: v for k, v in new.items() if k != "config"} == {
        k: v for k, v in old.items() if k != "config"
    }


def test_every_key_a_run_writes_is_declared():
    """Today's run of the same recipe writes the records the old one did, each key of each
    one declared in :class:`ptqkit.records.Details` and the record's ``TypedDict``."""
    from ptqkit.records import Details

    model, data = model_and_data()
    details = ptqkit.quantize(model, data, ptqkit.PTQConfig(**CONFIG)).ptq_info.details
    assert set(details) == set(_saved_info(OLD_FILE)["details"])
    hints = typing.get_type_hints(Details)
    assert set(details) <= set(hints)
    for key, record in details.items():
        td = hints[key]
        if typing.is_typeddict(td):
            assert set(record) <= _declared(td), (key, set(record) - _declared(td))


if __name__ == "__main__":  # write the old file (see the module docstring)
    model, data = model_and_data()
    qmodel = ptqkit.quantize(model, data, ptqkit.PTQConfig(**CONFIG))
    ptqkit.save(qmodel, OLD_FILE)
    print(ptqkit.__file__, OLD_FILE, sorted(qmodel.ptq_info.details), file=sys.stderr)
