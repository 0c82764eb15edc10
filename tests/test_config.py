"""The configuration: user exclusions stay dense and are reported; the config round-trips through
a dict. (Bad configuration values are rows of tests/test_bad_inputs_table.py.)"""

from __future__ import annotations

import pytest
import torch

import tunecomp_fx
from tests.models import MLP


def test_excluded_site_stays_dense_and_is_reported():
    compact = tunecomp_fx.compress(MLP().eval(), (torch.randn(4, 64),), ratio=0.4, exclude=("fc2",))
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["fc2"].decision == "excluded" and rows["fc2"].params_after == rows["fc2"].params_before
    assert rows["fc2"].macs_before == rows["fc2"].macs_after == rows["fc2"].in_features * rows["fc2"].out_features  # one row per example
    assert type(compact.get_submodule("fc2")) is torch.nn.Linear


def test_config_round_trips_through_dict():
    config = tunecomp_fx.CompressionConfig(ratio=0.3, init="asvd", allocation="global", exclude=("head",))
    assert tunecomp_fx.CompressionConfig.from_dict(config.to_dict()) == config
    with pytest.raises(tunecomp_fx.ConfigError, match="unknown configuration keys"):
        tunecomp_fx.CompressionConfig.from_dict({"ratio": 0.3, "speed": "fast"})
