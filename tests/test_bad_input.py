"""Bad input to the core API gets a clear error from the package's hierarchy."""

from __future__ import annotations

import pytest
import torch

import tunecomp_fx
from tests.models import MLP, NoLinear


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5, float("nan")])
def test_ratio_outside_open_interval(ratio):
    with pytest.raises(tunecomp_fx.ConfigError, match=r"outside \(0, 1\).*fraction"):
        tunecomp_fx.compress(MLP(), (torch.randn(4, 64),), ratio=ratio)


@pytest.mark.parametrize("ratio", ["0.4", None, True])
def test_ratio_not_a_number(ratio):
    with pytest.raises(tunecomp_fx.ConfigError, match="must be a number"):
        tunecomp_fx.CompressionConfig(ratio=ratio)


def test_model_without_linear_sites():
    with pytest.raises(tunecomp_fx.SiteError, match="no compressible linear site"):
        tunecomp_fx.compress(NoLinear(), (torch.randn(4, 8),), ratio=0.4)


def test_every_site_excluded():
    with pytest.raises(tunecomp_fx.SiteError, match="loosen `exclude`"):
        tunecomp_fx.compress(MLP(), (torch.randn(4, 64),), ratio=0.4, exclude=("fc*", "head*"))


def test_excluded_site_stays_dense_and_is_reported():
    compact = tunecomp_fx.compress(MLP().eval(), (torch.randn(4, 64),), ratio=0.4, exclude=("fc2",))
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["fc2"].decision == "excluded" and rows["fc2"].params_after == rows["fc2"].params_before
    assert type(compact.get_submodule("fc2")) is torch.nn.Linear


@pytest.mark.parametrize("inputs", [(torch.randn(4, 63),), (torch.randn(4, 64, dtype=torch.float64),), ()])
def test_example_inputs_that_do_not_fit(inputs):
    with pytest.raises(tunecomp_fx.InputError, match="example inputs do not fit the model"):
        tunecomp_fx.compress(MLP(), inputs, ratio=0.4)


def test_unknown_option():
    with pytest.raises(tunecomp_fx.ConfigError, match="unexpected keyword.*CompressionConfig"):
        tunecomp_fx.compress(MLP(), (torch.randn(4, 64),), ratio=0.4, rnak_multiple=8)


def test_nan_in_calibration_data():
    calib = [(torch.randn(4, 64),), (torch.full((4, 64), float("nan")),)]
    with pytest.raises(tunecomp_fx.CalibrationError, match="batch 1.*NaN"):
        tunecomp_fx.compress(MLP(), (torch.randn(4, 64),), ratio=0.4, calib=calib)


def test_config_round_trips_through_dict():
    config = tunecomp_fx.CompressionConfig(ratio=0.3, init="asvd", allocation="global", exclude=("head",))
    assert tunecomp_fx.CompressionConfig.from_dict(config.to_dict()) == config
    with pytest.raises(tunecomp_fx.ConfigError, match="unknown configuration keys"):
        tunecomp_fx.CompressionConfig.from_dict({"ratio": 0.3, "speed": "fast"})
