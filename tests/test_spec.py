"""DataSpec: the datamodule's arguments, validated before any data is opened."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from xr_datamodule import XarrayDataModule
from xr_datamodule.spec import DataSpec


def test_the_spec_has_exactly_the_constructor_arguments():
    # Configs (YAML, CLI) name the constructor's arguments: the spec must take each of them.
    parameters = list(inspect.signature(XarrayDataModule.__init__).parameters)[1:]
    assert sorted(parameters) == sorted(f.name for f in dataclasses.fields(DataSpec))
    for name in parameters:
        given = inspect.signature(XarrayDataModule.__init__).parameters[name].default
        field = DataSpec.__dataclass_fields__[name]
        expected = field.default if field.default is not dataclasses.MISSING else inspect._empty
        assert given == expected, name


def test_defaults_are_filled_without_opening_the_data(tmp_path):
    store = tmp_path / "not_read.zarr"
    store.mkdir()  # exists, but holds nothing: a spec never opens it
    spec = DataSpec(str(store), input_vars=["a"], input_dims={"time": 3}, stats={"mean": {}})
    assert spec.targets == ["a"] and spec.target_dims == {"time": 3}
    assert spec.normalize == "zscore"  # explicit statistics mean normalising with them
    assert spec.splits == {"train": 0.7, "val": 0.15, "test": 0.15}
    assert spec.all_vars == ["a"]


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        (dict(num_workers="many"), TypeError, r"num_workers must be an integer >= 0 or 'auto'"),
        (dict(style="stream"), ValueError, r"style must be one of \('map', 'iterable'\)"),
        (dict(shuffle="random"), ValueError, r"shuffle must be one of"),
        (dict(input_overlap={"time": 3}), ValueError, r"input_overlap\['time'\] = 3 must be"),
        (dict(nan_mask=True), ValueError, r"nan_mask=True needs nan_policy='fill'"),
        (dict(multiprocessing_context="thread"), ValueError, r"multiprocessing_context must"),
    ],
)
def test_bad_arguments_are_named(settings, error, message):
    with pytest.raises(error, match=message):
        DataSpec("synthetic://weather", input_vars=["t2m"], input_dims={"time": 3}, **settings)


def test_lead_times_that_are_not_consecutive_get_a_recipe():
    with pytest.raises(TypeError) as caught:
        DataSpec(
            "synthetic://weather",
            input_vars=["t2m"],
            input_dims={"time": 2, "lat": 8, "lon": 8},
            target_dims={"time": 1, "lat": 8, "lon": 8},
            target_offset={"time": [8, 26]},  # +6 h and +24 h after a 2-step input
        )
    message = str(caught.value)
    assert "target_offset['time'] must be one integer, got [8, 26]" in message
    assert "target_offset={'time': 8} and target_dims={'time': 19}" in message
    assert "keep positions [0, 18] of y's 'time' axis" in message


def test_every_constructor_argument_is_documented_once():
    # The argument docs live in the datamodule's docstring (LightningCLI's help reads them).
    parameters = list(inspect.signature(XarrayDataModule.__init__).parameters)[1:]
    args = (inspect.getdoc(XarrayDataModule) or "").split("Args:")[1].split("Example:")[0]
    starts = [line[4:] for line in args.splitlines() if line[:4] == " " * 4 and line[4] != " "]
    documented = [line.split(":")[0] for line in starts]
    assert sorted(documented) == sorted(parameters)
    assert len(set(documented)) == len(documented)
