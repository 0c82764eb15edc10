"""The exporter's translation of `embedding_bag` (export/embedding_bag.py): sum and mean bags become
one Gather and a ScatterND per sum (and per mean's count), with no Loop, where onnxscript's
translation loops over the bags (and over the ids with a padding index); the same four outputs as
PyTorch (atol 1e-6) at two sets of ids and offsets, with empty bags, padding ids, per-sample weights
and include_last_offset; and onnxscript's translation for mode max.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from tunecomp_fx.export import cpu_session, to_onnx

SUM, MEAN, MAX = 0, 1, 2


class RawBags(nn.Module):
    """aten's embedding_bag with all four outputs: the bags, each id's bag, bag sizes, max indices."""

    def __init__(self, mode: int, padding_idx: int, include_last_offset: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(50, 8))
        self.mode, self.padding_idx, self.include_last_offset = mode, padding_idx, include_last_offset

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        per_sample_weights = weights if self.mode == SUM else None  # PyTorch takes them in mode sum alone
        return torch.embedding_bag(self.weight, ids, offsets, False, self.mode, False, per_sample_weights, self.include_last_offset, self.padding_idx)


def _bags(include_last_offset: bool) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Two sets of (ids, offsets, per-sample weights): padding ids (0), an empty bag in the middle and at the end."""
    sets = [([1, 0, 3, 4, 0, 7, 9, 0, 2, 5], [0, 2, 2, 6, 10]), ([0, 0, 3, 4, 0, 8, 9, 0, 2, 5, 6, 7, 0], [0, 3, 3, 3, 9, 13, 13])]
    torch.manual_seed(0)
    return [
        (torch.tensor(ids), torch.tensor(offsets if include_last_offset else offsets[:-1]), torch.rand(len(ids)))
        for ids, offsets in sets
    ]  # with include_last_offset the last offset is the number of ids (CSR); without it, each offset opens a bag


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> Counter:
    to_onnx(model, inputs, path, verify=False)  # checked below on both sets of offsets, output by output (max: the bags alone)
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def _max_errors(model: nn.Module, path: Path, sets: list[tuple[torch.Tensor, ...]]) -> list[float]:
    session = cpu_session(path)
    names = [value.name for value in session.get_inputs()]
    errors = []
    for inputs in sets:
        feed = {name: value.numpy() for name, value in zip(("ids", "offsets", "weights"), inputs) if name in names}
        with torch.no_grad():
            expected = model(*inputs)
        errors += [float(np.abs(got - want.numpy()).max()) if want.numel() else 0.0 for got, want in zip(session.run(None, feed), expected)]
    return errors


@pytest.mark.parametrize("include_last_offset", [False, True], ids=["offsets", "last-offset"])
@pytest.mark.parametrize("padding_idx", [-1, 0], ids=["no-padding", "padding"])
@pytest.mark.parametrize("mode", [SUM, MEAN], ids=["sum", "mean"])
def test_a_sum_or_mean_bag_exports_without_a_loop_and_gives_pytorchs_four_outputs(tmp_path, mode, padding_idx, include_last_offset):
    model, sets = RawBags(mode, padding_idx, include_last_offset).eval(), _bags(include_last_offset)
    ops = _export(model, sets[0], tmp_path / "bags.onnx")
    assert "Loop" not in ops and ops["Gather"] == 1 and ops["ScatterND"] == (1 if mode == SUM else 2), ops
    assert max(_max_errors(model, tmp_path / "bags.onnx", sets)) < 1e-6


def test_int32_ids_and_offsets_export_alike(tmp_path):
    model, sets = RawBags(MEAN, 0, False).eval(), [(ids.int(), offsets.int(), weights) for ids, offsets, weights in _bags(False)]
    assert "Loop" not in _export(model, sets[0], tmp_path / "int32.onnx")
    assert max(_max_errors(model, tmp_path / "int32.onnx", sets)) < 1e-6


def test_an_embedding_bag_module_over_padded_texts_exports_at_new_batch_and_sequence_sizes(tmp_path):
    model = nn.EmbeddingBag(50, 8, mode="mean", padding_idx=0).eval()
    ids = torch.tensor([[3, 4, 5, 0], [7, 0, 0, 0], [0, 0, 0, 0]])  # the last text all padding: a zero bag
    result = to_onnx(model, (ids,), tmp_path / "texts.onnx", dynamic_dims={"input": {1: "sequence"}})  # checked against PyTorch at larger sizes
    assert all(error < 1e-5 for error in result.max_errors.values()), result.max_errors
    assert "Loop" not in Counter(node.op_type for node in onnx.load(str(tmp_path / "texts.onnx")).graph.node)


def test_a_max_bag_keeps_onnxscripts_translation(tmp_path):
    model, sets = RawBags(MAX, -1, False).eval(), _bags(False)
    ops = _export(model, sets[0], tmp_path / "max.onnx")
    assert "Loop" in ops and "ScatterND" not in ops, ops
    assert max(_max_errors(model, tmp_path / "max.onnx", sets)[0::4]) < 1e-6  # the bags (onnxscript's other outputs differ)
