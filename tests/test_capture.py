"""Capture keeps the batch dimension dynamic on the torch.export path even when the example inputs
hold a single example (torch.export would otherwise specialize the size-1 batch to a constant), and
captures nn.TransformerEncoder's padded batches without its eval-mode fast path, and a copy of the
model (unwrapped from torch.compile or DataParallel) with its parametrized weights baked; a function
registered with register_wrapped_function stays one call that runs at run time."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

import tunecomp_fx
from tests.models import AttentionBlock
from tunecomp_fx.capture import capture, hidden_layers, without_attention_fast_path


class BranchingAttention(AttentionBlock):
    """Python control flow on a shape sends capture down the torch.export path; the block reshapes
    by its batch size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 8:
            x = x * 2
        return super().forward(x)


def test_batch_of_one_on_the_export_path_still_gives_a_dynamic_batch():
    torch.manual_seed(0)
    model = BranchingAttention().eval()
    prepared = tunecomp_fx.prepare(model, (torch.randn(1, 10, 64),), ratio=0.4)
    assert prepared.meta["tunecomp"].capture_path == "torch.export"
    x = torch.randn(3, 10, 64)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), atol=1e-6, rtol=0)
        tunecomp_fx.set_blend(prepared, 0.0)
        expected = prepared(x)
        compact = tunecomp_fx.finalize(prepared)
        torch.testing.assert_close(compact(x), expected, atol=1e-5, rtol=1e-5)



class PaddedEncoder(nn.Module):
    """Two nn.TransformerEncoderLayers over sequences with a key padding mask, mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 2)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, src_key_padding_mask=padding).mean(1)


def test_an_encoder_with_a_padding_mask_is_captured_in_eval_mode_without_the_fast_path():
    # in eval mode the encoder's fast path runs padded batches as nested tensors, which no graph reproduces
    torch.manual_seed(0)
    model, x = PaddedEncoder().eval(), torch.randn(4, 10, 64)
    padding = torch.zeros(4, 10, dtype=torch.bool)
    padding[::2, 7:] = True
    captured = capture(model, (x, padding))
    assert (captured.path, hidden_layers(captured.graph_module)) == ("torch.export", [])
    assert len(tunecomp_fx.prepare(model, (x, padding), 0.5).meta["tunecomp"].context.compressed_sites) == 8
    assert torch.backends.mha.get_fastpath_enabled()  # back on after the capture
    with torch.no_grad():
        with without_attention_fast_path():
            expected = model(x, padding)
        assert not torch.allclose(model(x, padding), expected)  # the fast path's zeros at the padding move the mean
        torch.testing.assert_close(captured.graph_module(x, padding), expected, rtol=1e-5, atol=1e-5)


def test_a_parametrized_weight_is_baked_into_a_site_of_the_copy_and_the_model_keeps_it():
    # weight_norm computes the weight from two parameters: the site holds the weight it computes
    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(32, 64)), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = torch.randn(4, 32)
    prepared = tunecomp_fx.prepare(model, x, 0.4)
    sites = {site.name: site.status for site in prepared.meta["tunecomp"].context.sites}
    assert sites == {"0": "compress", "2": "compress"}
    assert parametrize.is_parametrized(model[0], "weight")  # the user's model is as it was
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-6)  # alpha = 1: the teacher alone
        torch.testing.assert_close(prepared.get_parameter("0.weight"), model[0].weight, rtol=0, atol=0)


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel, lambda m: torch.compile(nn.DataParallel(m))], ids=["compiled", "data_parallel", "both"])
def test_a_wrapped_model_is_captured_as_the_module_it_wraps(wrap: Callable[[nn.Module], nn.Module]):
    # torch.compile's wrapper has no forward for fx to trace, DataParallel's scatter cannot be traced
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    prepared = tunecomp_fx.prepare(wrap(model), torch.randn(4, 32), 0.4)
    assert prepared.meta["tunecomp"].capture_path == "symbolic_trace"
    assert [site.name for site in prepared.meta["tunecomp"].context.sites] == ["0", "2"]  # not _orig_mod.0


SIGNED_DOUBLE_CALLS: list[torch.Size] = []  # the shapes signed_double was called with


def signed_double(x: torch.Tensor) -> torch.Tensor:
    """Python control flow on a tensor's value: neither symbolic tracing nor torch.export can follow it."""
    SIGNED_DOUBLE_CALLS.append(x.shape)
    return x * 2 if x.sum() > 0 else -x


class CallsSignedDouble(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(signed_double(self.up(x)))


def test_a_registered_function_stays_one_call_and_the_layers_around_it_compress(monkeypatch: pytest.MonkeyPatch):
    inputs = (torch.randn(4, 32),)
    with pytest.raises(tunecomp_fx.CaptureError, match=r"register_wrapped_function\(function, reason\)"):
        tunecomp_fx.compress(CallsSignedDouble().eval(), inputs, ratio=0.5)
    monkeypatch.setattr(tunecomp_fx.capture, "WRAPPED_FUNCTIONS", {})
    tunecomp_fx.capture.register_wrapped_function(signed_double, "test: branches on the sum")
    compact = tunecomp_fx.compress(CallsSignedDouble().eval(), inputs, ratio=0.5)
    report = tunecomp_fx.get_report(compact)
    assert report.capture_path == "symbolic_trace"
    assert [row.name for row in report.compressed_rows] == ["up", "down"]
    assert [node.op for node in compact.graph.nodes if node.target is signed_double] == ["call_function"]
    SIGNED_DOUBLE_CALLS.clear()
    with torch.no_grad():
        compact(torch.randn(3, 32))
    assert SIGNED_DOUBLE_CALLS == [torch.Size([3, 64])]  # called at run time, its branch not baked in
