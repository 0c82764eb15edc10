"""Model coverage on small models: every site form (nn.Linear, F.linear, aten.linear, x @ W.T + b,
pointwise convolutions as modules, F.conv2d and aten.conv2d) through both capture paths (symbolic
tracing, and torch.export where tracing fails or hides layers), with dict/ModelOutput results and
keyword inputs of dynamic batch and sequence; tied weights, computed biases and hidden layers.

Each form asserts the rewritten graph's node pattern, equality with the original at alpha = 1,
finalize against alpha = 0, and the kept fraction against the ratio."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from tests.models import TiedLanguageModel
from torch import fx, nn

import tunecomp_fx
from tunecomp_fx.errors import CaptureError
from tunecomp_fx.capture import LEAF_MODULES, dynamic_dims_of
from tunecomp_fx.export import to_onnx
from tunecomp_fx.forms import LAYOUTS, site_input
from tunecomp_fx.sites import Blend, student_nodes

RATIO = 0.4
# alpha = 1 computes 1 * teacher + 0 * student: exact up to float32 rounding. finalize folds beta
# and slices ranks, which re-associates float32 sums.
ALPHA_ONE_ATOL = 1e-5
FINALIZE_ATOL = 1e-4


def _branch_on_shape(x: torch.Tensor) -> torch.Tensor:
    # A Python branch on a traced size: symbolic tracing cannot evaluate it, torch.export can.
    return x * 2 if x.shape[-1] > 4 else x


class Linears(nn.Module):
    """Two nn.Linear sites on token features."""

    def __init__(self, branch: bool = False) -> None:
        super().__init__()
        self.branch = branch
        self.fc1, self.fc2 = nn.Linear(48, 64), nn.Linear(64, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _branch_on_shape(x) if self.branch else x
        return self.fc2(torch.relu(self.fc1(x)))


class FunctionalLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(64, 48) / 7)
        self.bias = nn.Parameter(torch.randn(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.linear(x, self.weight, self.bias))


class HandWrittenLinear(nn.Module):
    """x @ W.T + b and x @ W.t() (no bias): linear maps written out by hand."""

    def __init__(self, branch: bool = False) -> None:
        super().__init__()
        self.branch = branch
        self.w1, self.b1 = nn.Parameter(torch.randn(64, 48) / 7), nn.Parameter(torch.randn(64))
        self.w2 = nn.Parameter(torch.randn(40, 64) / 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _branch_on_shape(x) if self.branch else x
        h = torch.relu(x @ self.w1.T + self.b1)
        return torch.matmul(h, self.w2.t())


class PointwiseCNN(nn.Module):
    """Pointwise convolutions, one strided (sites), among a 3x3, a depthwise and a padded 1x1
    convolution (not sites)."""

    def __init__(self, branch: bool = False) -> None:
        super().__init__()
        self.branch = branch
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.expand = nn.Conv2d(32, 96, 1, bias=False)
        self.norm = nn.BatchNorm2d(96)
        self.depthwise = nn.Conv2d(96, 96, 3, padding=1, groups=96)
        self.project = nn.Conv2d(96, 48, 1)
        self.downsample = nn.Conv2d(48, 128, 1, stride=2)
        self.padded = nn.Conv2d(128, 128, 1, padding=1)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _branch_on_shape(x) if self.branch else x
        x = torch.relu(self.norm(self.expand(self.stem(x))))
        x = self.padded(self.downsample(self.project(torch.relu(self.depthwise(x)))))
        return self.head(x.mean((2, 3)))


class FunctionalPointwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(64, 32, 1, 1) / 6)
        self.bias = nn.Parameter(torch.randn(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(F.conv2d(x, self.weight, self.bias))


class PointwiseConv1d(nn.Module):
    """Pointwise 1-d convolutions over (N, C, L), one strided (sites), and a kernel-3 one (not a site),
    as in speech and point-cloud models; `functional` writes one with F.conv1d on parameters."""

    def __init__(self, branch: bool = False, functional: bool = False) -> None:
        super().__init__()
        self.branch, self.functional = branch, functional
        self.expand = nn.Conv1d(16, 64, 1)
        self.context = nn.Conv1d(64, 64, 3, padding=1)
        self.project_weight = nn.Parameter(torch.randn(48, 64, 1) / 8)
        self.project = nn.Conv1d(64, 48, 1, bias=False)
        self.downsample = nn.Conv1d(48, 96, 1, stride=2)
        self.head = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _branch_on_shape(x) if self.branch else x
        x = self.context(torch.relu(self.expand(x)))
        x = F.conv1d(x, self.project_weight) if self.functional else self.project(x)
        return self.head(self.downsample(torch.relu(x)).mean(-1))


class InputMajorLinear(nn.Module):
    """Layers holding their weights (in, out) and applying them with addmm, as Hugging Face's Conv1D
    (GPT-2) does."""

    def __init__(self, branch: bool = False) -> None:
        super().__init__()
        self.branch = branch
        self.w1, self.b1 = nn.Parameter(torch.randn(48, 96) / 7), nn.Parameter(torch.randn(96) / 10)
        self.w2, self.b2 = nn.Parameter(torch.randn(96, 48) / 10), nn.Parameter(torch.randn(48) / 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _branch_on_shape(x) if self.branch else x
        h = torch.relu(torch.addmm(self.b1, x.reshape(-1, 48), self.w1))
        return torch.addmm(self.b2, h, self.w2).reshape(x.shape)


def _sequences() -> tuple[torch.Tensor]:
    return (torch.randn(4, 16, 20),)


def _tokens() -> tuple[torch.Tensor]:
    return (torch.randn(4, 12, 48),)


def _images(channels: int = 3) -> tuple[torch.Tensor]:
    return (torch.randn(4, channels, 8, 8),)


FORMS = {
    # id: (model factory, inputs, capture path, forms of the compressed sites, layout)
    "nn.Linear": (Linears, _tokens, "symbolic_trace", {"call_module"}, "linear"),
    "F.linear": (FunctionalLinear, _tokens, "symbolic_trace", {"F.linear"}, "linear"),
    "aten.linear": (lambda: Linears(branch=True), _tokens, "torch.export", {"aten.linear"}, "linear"),
    "matmul": (HandWrittenLinear, _tokens, "symbolic_trace", {"matmul"}, "linear"),
    "aten.matmul": (lambda: HandWrittenLinear(branch=True), _tokens, "torch.export", {"matmul"}, "linear"),
    "conv1x1": (PointwiseCNN, _images, "symbolic_trace", {"call_module"}, "conv1x1"),
    "F.conv2d": (FunctionalPointwise, lambda: _images(32), "symbolic_trace", {"F.conv2d"}, "conv1x1"),
    "aten.conv2d": (lambda: PointwiseCNN(branch=True), _images, "torch.export", {"aten.conv2d"}, "conv1x1"),
    "addmm": (InputMajorLinear, _tokens, "symbolic_trace", {"F.linear"}, "linear"),
    "aten.addmm": (lambda: InputMajorLinear(branch=True), _tokens, "torch.export", {"aten.linear"}, "linear"),
    "conv1d": (PointwiseConv1d, _sequences, "symbolic_trace", {"call_module"}, "pointwise_conv1d"),
    "F.conv1d": (lambda: PointwiseConv1d(functional=True), _sequences, "symbolic_trace", {"call_module", "F.conv1d"}, "pointwise_conv1d"),
    "aten.conv1d": (lambda: PointwiseConv1d(branch=True), _sequences, "torch.export", {"aten.conv1d"}, "pointwise_conv1d"),
}


def _prepare(factory, inputs):
    torch.manual_seed(0)
    model = factory().eval()
    return model, tunecomp_fx.prepare(model, inputs, ratio=RATIO)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_site_form_rewrite_equivalence_and_budget(form):
    factory, make_inputs, path, forms, layout = FORMS[form]
    inputs = make_inputs()
    model, prepared = _prepare(factory, inputs)
    state = prepared.meta["tunecomp"]
    assert state.capture_path == path
    sites = [site for site in state.context.sites if site.layout == layout]
    assert sites and {site.form for site in sites} == forms
    assert all(site.status == "compress" for site in sites)
    sites = [site for site in state.context.factorized_sites() if site.layout == layout]
    assert sites
    student_type = LAYOUTS[layout].module_type

    # The rewritten pattern: teacher (the original output node) and down -> mask -> up, blended.
    nodes = student_nodes(prepared)
    for site in sites:
        roles = nodes[site.key]
        teacher, down, mask, masked, up, blend = (roles[r] for r in ("teacher", "down", "rank_mask", "masked", "up", "blend"))
        entry = next(node for node in prepared.graph.nodes if node.name == site.entry_node)
        assert teacher.name == site.node and down.args[0] is site_input(entry)
        assert masked.target is operator.mul and masked.args == (down, mask)
        assert up.args == (masked,) and blend.args == (teacher, up)
        assert list(teacher.users) == [blend]
        assert isinstance(prepared.get_submodule(blend.target), Blend)
        down_module, up_module = prepared.get_submodule(down.target), prepared.get_submodule(up.target)
        assert type(down_module) is student_type and type(up_module) is student_type
        rank = down_module.weight.shape[0]
        expected_mask = {"linear": (rank,), "conv1x1": (rank, 1, 1), "pointwise_conv1d": (rank, 1)}[layout]
        assert tuple(prepared.get_buffer(mask.target).shape) == expected_mask
        if layout != "linear":
            assert down_module.kernel_size == up_module.kernel_size == (1,) * (len(expected_mask) - 1)

    fresh = tuple(torch.randn_like(x) for x in inputs)
    with torch.no_grad():
        torch.testing.assert_close(prepared(*fresh), model(*fresh), atol=ALPHA_ONE_ATOL, rtol=0)
        tunecomp_fx.set_blend(prepared, 0.0)
        at_zero = prepared(*fresh)
        compact = tunecomp_fx.finalize(prepared)
        torch.testing.assert_close(compact(*fresh), at_zero, atol=FINALIZE_ATOL, rtol=1e-4)
        # Dynamic batch: the compact graph runs at another batch size.
        bigger = tuple(torch.cat([x, x[:1]]) for x in fresh)
        assert compact(*bigger).shape[0] == fresh[0].shape[0] + 1

    # The compact pattern: each factorized site is down -> up of its layout, the teacher is gone.
    compact_nodes = student_nodes(compact)
    assert all(
        type(compact.get_submodule(compact_nodes[site.key]["down" if "down" in compact_nodes[site.key] else "dense"].target))
        is student_type
        for site in sites
    )
    for key, roles in compact_nodes.items():
        assert set(roles) in ({"down", "up"}, {"dense"})
        if "down" in roles:
            assert roles["up"].args == (roles["down"],)
            assert type(compact.get_submodule(roles["down"].target)) is type(compact.get_submodule(roles["up"].target))
    assert not any(isinstance(m, Blend) for m in compact.modules())
    teacher_weights = {site.weight_target for site in sites}
    assert not teacher_weights & {name for name, _ in compact.named_parameters()}
    report = tunecomp_fx.get_report(compact)
    assert 1 - RATIO - 0.05 <= report.kept_fraction <= 1 - RATIO + 1e-9


def test_pointwise_cnn_sites_and_the_strided_one():
    _, prepared = _prepare(PointwiseCNN, _images())
    sites = {site.name: site for site in prepared.meta["tunecomp"].context.sites}
    assert set(sites) == {"expand", "project", "downsample", "head"}  # not stem (3x3), depthwise, padded
    assert sites["downsample"].stride == 2 and sites["project"].stride == 1
    student = prepared.get_submodule(f"lowrank.{sites['downsample'].key}")
    assert student.down.stride == (2, 2) and student.up.stride == (1, 1)


class Asserting(Linears):
    """torch._assert on a size: fx records it as a call, symbolic tracing goes through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.shape[-1] == 48, "expects 48 features")
        return super().forward(x)


class IteratingProxy(Linears):
    """Iterates over a traced value: symbolic tracing cannot, torch.export unrolls the loop."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([part * (index + 1) for index, part in enumerate(x.split(24, dim=-1))], dim=-1)
        return super().forward(x)


@pytest.mark.parametrize("factory, path", [(Asserting, "symbolic_trace"), (IteratingProxy, "torch.export")])
def test_capture_path_of_untraceable_constructs(factory, path):
    inputs = _tokens()
    model, prepared = _prepare(factory, inputs)
    state = prepared.meta["tunecomp"]
    assert state.capture_path == path
    assert {site.name for site in state.context.compressed_sites} == {"fc1", "fc2"}
    with torch.no_grad():
        torch.testing.assert_close(prepared(*inputs), model(*inputs), atol=ALPHA_ONE_ATOL, rtol=0)


def test_a_linear_applied_twice_is_one_site_and_an_excluded_tied_head_stays_tied():
    """(A tied head compressed with its embedding lookup: tests/test_tied_embeddings.py.)"""
    torch.manual_seed(0)
    model = TiedLanguageModel().eval()
    ids = torch.randint(0, 100, (4, 10))
    compact = tunecomp_fx.compress(model, (ids,), ratio=RATIO, exclude=("head",))
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["head"].decision == "excluded"
    assert rows["mix"].decision == "rank" and "one student for the weight's 2 linear calls" in rows["mix"].reason
    assert rows["mix"].macs_before == 2 * 10 * 32 * 32  # one site for both calls
    assert {rows["fc"].decision, rows["back"].decision} == {"rank"}
    assert compact.head.weight is compact.embed.weight  # still tied, still dense
    assert {row.name for row in tunecomp_fx.get_report(compact).compressed_rows} == {"mix", "fc", "back"}


class ComputedBias(nn.Module):
    """BEiT's attention: F.linear with a bias concatenated from parameters and a zero buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(32, 96, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(32)), nn.Parameter(torch.randn(32))
        self.register_buffer("k_bias", torch.zeros(32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        return F.linear(input=x, weight=self.qkv.weight, bias=bias)


def test_bias_computed_from_parameters_is_folded_and_compressed():
    inputs = _tokens()
    inputs = (inputs[0][..., :32],)
    model, prepared = _prepare(ComputedBias, inputs)
    (site,) = prepared.meta["tunecomp"].context.sites
    assert site.status == "compress" and site.form == "F.linear"
    student = prepared.get_submodule(f"lowrank.{site.key}")
    expected_bias = torch.cat((model.q_bias, model.k_bias, model.v_bias))
    torch.testing.assert_close(student.up.bias, expected_bias)
    with torch.no_grad():
        torch.testing.assert_close(prepared(*inputs), model(*inputs), atol=ALPHA_ONE_ATOL, rtol=0)
        tunecomp_fx.set_blend(prepared, 0.0)
        at_zero = prepared(*inputs)
        compact = tunecomp_fx.finalize(prepared)
        torch.testing.assert_close(compact(*inputs), at_zero, atol=FINALIZE_ATOL, rtol=1e-4)
    assert not any("q_bias" in name or "folded" in name for name, _ in compact.named_parameters())


class Gate(nn.Module):
    """A block that holds linears and branches on a tensor's value (data-dependent control flow)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) if bool(x.sum() > -1e9) else x


class ShapeGate(Gate):
    """Like Gate, but the branch is on a size, which torch.export resolves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) if x.shape[-1] == 32 else x


class WithLeaf(nn.Module):
    def __init__(self, block: type[nn.Module]) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.block = block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(torch.relu(self.fc(x)))


def test_leaf_hiding_layers_makes_capture_use_torch_export(monkeypatch):
    monkeypatch.setitem(LEAF_MODULES, ShapeGate, "test: a leaf that torch.export can trace")
    inputs = (torch.randn(4, 6, 32),)
    _, prepared = _prepare(lambda: WithLeaf(ShapeGate), inputs)
    state = prepared.meta["tunecomp"]
    assert state.capture_path == "torch.export"
    assert "hides 1 compressible layers (inside leaf module block" in state.capture_reason
    assert {site.name for site in state.context.compressed_sites} == {"fc", "block.inner"}


def test_layers_in_a_leaf_neither_path_opens_are_reported_hidden(monkeypatch):
    monkeypatch.setitem(LEAF_MODULES, Gate, "test: data-dependent control flow")
    inputs = (torch.randn(4, 6, 32),)
    compact = tunecomp_fx.compress(WithLeaf(Gate).eval(), inputs, ratio=RATIO)
    report = tunecomp_fx.get_report(compact)
    assert report.capture_path == "symbolic_trace"
    assert "torch.export failed" in report.capture_reason and "so they stay dense" in report.capture_reason
    rows = {row.name: row for row in report.sites}
    assert rows["block.inner"].decision == "hidden"
    assert rows["block.inner"].reason == "inside leaf module block (Gate: test: data-dependent control flow)"
    assert [row.name for row in report.compressed_rows] == ["fc"]


class TinyTextClassifier(nn.Module):
    """A Hugging Face style classifier: keyword inputs, a ModelOutput result, a length check that
    symbolic tracing cannot evaluate."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.position = nn.Parameter(torch.randn(64, 32) / 4)
        self.fc = nn.Linear(32, 64)
        self.out = nn.Linear(64, 32)
        self.classifier = nn.Linear(32, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        if input_ids.shape[1] > self.position.shape[0]:
            raise ValueError("sequence too long")
        h = self.embed(input_ids) + self.position[: input_ids.shape[1]]
        h = h + self.out(F.gelu(self.fc(h)))
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1)
        return SequenceClassifierOutput(logits=self.classifier(pooled))


def _text(batch: int, length: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch * 100 + length)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2 :] = 0
    return {"input_ids": torch.randint(0, 50, (batch, length), generator=generator), "attention_mask": mask}


def test_keyword_inputs_export_with_dynamic_batch_and_sequence():
    pytest.importorskip("transformers")
    from transformers.modeling_outputs import SequenceClassifierOutput

    inputs = _text(2, 12)
    model, prepared = _prepare(TinyTextClassifier, inputs)
    state = prepared.meta["tunecomp"]
    assert state.capture_path == "torch.export"
    assert "dynamic batch and sequence dimensions" in state.capture_reason
    assert {site.form for site in state.context.compressed_sites} == {"aten.linear"}
    with torch.no_grad():
        for batch, length in ((3, 7), (5, 20)):
            other = _text(batch, length)
            torch.testing.assert_close(prepared(**other).logits, model(**other).logits, atol=ALPHA_ONE_ATOL, rtol=0)
        tunecomp_fx.set_blend(prepared, 0.0)
        other = _text(3, 7)
        at_zero = prepared(**other).logits
        compact = tunecomp_fx.finalize(prepared)
        result = compact(**other)
    assert isinstance(result, SequenceClassifierOutput) and result.logits.shape == (3, 2)
    torch.testing.assert_close(result.logits, at_zero, atol=FINALIZE_ATOL, rtol=1e-4)


class FixedLength(nn.Module):
    """Runs at any length, but branches on the example's exact length: torch.export specializes it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 16)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.fc(self.embed(input_ids))
        return h * 2 if input_ids.shape[1] == 12 else h


def test_export_that_fixes_a_dynamic_axis_is_refused_with_the_axis_named():
    with pytest.raises(tunecomp_fx.CaptureError, match="does not run at a new sequence size"):
        tunecomp_fx.prepare(FixedLength().eval(), {"input_ids": torch.randint(0, 50, (2, 12))}, ratio=RATIO)


def test_dynamic_dims_defaults_and_overrides():
    ids = torch.zeros(2, 8, dtype=torch.long)
    assert dynamic_dims_of((torch.randn(2, 3, 8, 8),)) == {0: {0: "batch"}}
    assert dynamic_dims_of({"input_ids": ids, "pixel_values": torch.randn(2, 3, 4, 4)}) == {
        "input_ids": {0: "batch", 1: "sequence"},
        "pixel_values": {0: "batch"},
    }
    assert dynamic_dims_of((torch.randn(2, 5, 8),), {0: {1: "sequence"}}) == {0: {0: "batch", 1: "sequence"}}
    with pytest.raises(tunecomp_fx.InputError, match="'mask'"):
        dynamic_dims_of({"input_ids": ids}, {"mask": {1: "sequence"}})


def test_dict_and_tuple_results_are_compressed():
    class DictResult(Linears):
        def forward(self, x: torch.Tensor):
            h = self.fc1(x)
            return {"features": h, "pair": (self.fc2(torch.relu(h)), x.sum())}

    torch.manual_seed(0)
    model = DictResult().eval()
    inputs = _tokens()
    compact = tunecomp_fx.compress(model, inputs, ratio=RATIO)
    with torch.no_grad():
        result = compact(*inputs)
    assert set(result) == {"features", "pair"} and result["pair"][0].shape == (4, 12, 40)
    assert isinstance(compact, fx.GraphModule)


def _labelled_images(count: int = 64, batch: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(count, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 10, (count,), generator=generator)
    return [(images[i : i + batch], labels[i : i + batch]) for i in range(0, count, batch)]


def _conv_students(compact: fx.GraphModule) -> dict[str, tuple[nn.Module, nn.Module]]:
    return {
        key: (compact.get_submodule(roles["down"].target), compact.get_submodule(roles["up"].target))
        for key, roles in student_nodes(compact).items()
        if "down" in roles and isinstance(compact.get_submodule(roles["down"].target), nn.Conv2d)
    }


def test_joint_training_prunes_pointwise_convolution_ranks_to_the_budget():
    torch.manual_seed(0)
    data = _labelled_images()
    compact = tunecomp_fx.compress(PointwiseCNN().eval(), (data[0][0],), ratio=RATIO, data=data, steps=8, rank_slack=0.5)
    report = tunecomp_fx.get_report(compact)
    assert 1 - RATIO - 0.05 <= report.kept_fraction <= 1 - RATIO + 1e-9
    students = _conv_students(compact)
    assert students  # the pointwise convolutions stay two 1x1 convolutions after pruning
    ranks = {row.name.replace(".", "_"): row.rank for row in report.sites if row.rank is not None}
    for key, (down, up) in students.items():
        assert down.kernel_size == (1, 1) and down.out_channels == up.in_channels == ranks[key]
    with torch.no_grad():
        assert compact(data[1][0]).shape == (16, 10)


def test_union_method_on_pointwise_convolutions():
    torch.manual_seed(0)
    data = _labelled_images()
    model = PointwiseCNN().eval()
    prepared = tunecomp_fx.prepare(model, (data[0][0],), ratio=RATIO, method="union", calib=data[:2])
    cores = [prepared.get_submodule(f"lowrank.{site.key}.core") for site in prepared.meta["tunecomp"].context.factorized_sites()]
    assert any(isinstance(core, nn.Conv2d) for core in cores)
    x = data[2][0]
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), atol=ALPHA_ONE_ATOL, rtol=0)
        tunecomp_fx.set_blend(prepared, 0.0)
        at_zero = prepared(x)
        compact = tunecomp_fx.finalize(prepared)
        torch.testing.assert_close(compact(x), at_zero, atol=FINALIZE_ATOL, rtol=1e-4)
    assert _conv_students(compact)


def test_union_gradient_covariance_of_a_pointwise_convolution_is_over_channels():
    from tunecomp_fx.capture import capture
    from tunecomp_fx.config import CompressionConfig
    from tunecomp_fx.passes.calibrate_output_gradients import CalibrateOutputGradients
    from tunecomp_fx.passes.find_linear_sites import FindLinearSites
    from tunecomp_fx.pipeline import PassContext, run_passes

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv2d(8, 16, 1), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    model, x, targets = Net().eval(), torch.randn(4, 8, 5, 5), torch.tensor([0, 1, 2, 0])
    context = PassContext(config=CompressionConfig(method="union"), calibration=[(x,)], calibration_targets=[targets])
    run_passes(capture(model, (x,)).graph_module, [FindLinearSites(), CalibrateOutputGradients()], context)
    # By hand: the gradient of the summed loss at the convolution's output, one row per pixel.
    y = model.conv(x)
    y.retain_grad()
    (F.cross_entropy(model.head(torch.tanh(y).mean((2, 3))), targets) * len(targets)).backward()
    rows = y.grad.permute(0, 2, 3, 1).reshape(-1, 16).double()
    found = context.gradient_covariances["conv"]
    assert found.rows == 4 * 5 * 5
    torch.testing.assert_close(found.gram, rows.T @ rows, rtol=1e-5, atol=1e-12)


def test_pointwise_conv1d_sites_and_the_strided_one_export_to_onnx(tmp_path):
    model, prepared = _prepare(PointwiseConv1d, _sequences())
    sites = {site.name: site for site in prepared.meta["tunecomp"].context.sites}
    assert set(sites) == {"expand", "project", "downsample", "head"}  # not context (kernel 3)
    assert sites["downsample"].stride == 2 and sites["expand"].layout == "pointwise_conv1d"
    tunecomp_fx.set_blend(prepared, 0.0)
    compact = tunecomp_fx.finalize(prepared)
    result = to_onnx(compact, _sequences(), tmp_path / "conv1d.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


def test_gpt2s_input_major_conv1d_layers_are_sites():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    model, inputs = transformers.GPT2Model(config).eval(), {"input_ids": torch.randint(0, 100, (2, 12))}
    with pytest.raises(CaptureError, match=r"returns its key/value cache .* set model.config.use_cache = False"):
        tunecomp_fx.prepare(model, inputs, 0.4)
    model.config.use_cache = False
    prepared = tunecomp_fx.prepare(model, inputs, 0.4)
    sites = {site.name: (site.status, site.in_features, site.out_features) for site in prepared.meta["tunecomp"].context.sites}
    assert sites == {
        name: ("compress", *shape)
        for i in range(2)
        for name, shape in ((f"h.{i}.attn.c_attn", (64, 192)), (f"h.{i}.attn.c_proj", (64, 64)), (f"h.{i}.mlp.c_fc", (64, 256)), (f"h.{i}.mlp.c_proj", (256, 64)))
    }
    assert not [node for node in prepared.graph.nodes if node.target is torch.ops.aten.addmm.default]
    with torch.no_grad():
        torch.testing.assert_close(prepared(**inputs)[0], model(**inputs)[0], rtol=1e-5, atol=1e-5)  # alpha = 1: the teacher alone
    assert model.h[0].attn.c_attn.weight.shape == (64, 192)  # the user's model keeps its (in, out) weights
