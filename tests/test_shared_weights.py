"""A weight that several linear calls apply alike (ALBERT's shared layer, DeBERTa's key projection of
the relative embeddings) gets one student, called at each: calibrated over every call, blended at
each call's teacher, counted once in the budget and in the compact model; the widths of shared layers
are pruned with the same neurons kept at every call."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tests.graph_checks import finalize_from_student_path, first, full_rank_student_path_finalizes, hugging_face_prunes_exactly, silenced, tiny_hugging_face, train_with_hook
from tests.joint_task import single_thread  # noqa: F401
from tests.models import RelativeKeys, SharedLayerEncoder
from torch import nn

import tunecomp_fx
from tunecomp_fx import StepHook
from tunecomp_fx.capture import capture
from tunecomp_fx.config import CompressionConfig
from tunecomp_fx.export import to_onnx
from tunecomp_fx.inspect import site_subgraph
from tunecomp_fx.metrics import count_parameters
from tunecomp_fx.passes.calibrate_input_covariance import CalibrateInputCovariance
from tunecomp_fx.passes.calibrate_output_gradients import CalibrateOutputGradients
from tunecomp_fx.passes.find_linear_sites import FindLinearSites
from tunecomp_fx.pipeline import PassContext, run_passes
from tunecomp_fx.sites import Blend, student_calls, students_alone

pytestmark = pytest.mark.usefixtures("single_thread")

RATIO = 0.4
BLOCK_SITES = ("block.qkv", "block.proj", "block.fc1", "block.fc2")


def _encoder() -> tuple[SharedLayerEncoder, torch.Tensor]:
    torch.manual_seed(0)
    return SharedLayerEncoder(depth=3).eval(), torch.randn(4, 10, 64)


def _with_student_weights(model: nn.Module, prepared: torch.fx.GraphModule) -> nn.Module:
    """`model` with each compressed layer's weight and bias replaced by its student's map (up @ mask * down)."""
    reference = copy.deepcopy(model)
    for site in prepared.meta["tunecomp"].context.factorized_sites():
        student = prepared.get_submodule(f"lowrank.{site.key}")
        layer = reference.get_submodule(site.name)
        with torch.no_grad():
            layer.weight.copy_(student.up.weight @ (student.rank_mask[:, None] * student.down.weight))
            layer.bias.copy_(student.up.bias)
    return reference


def test_one_student_is_called_at_every_call_of_a_shared_weight():
    model, x = _encoder()
    prepared = tunecomp_fx.prepare(model, (x,), ratio=RATIO)
    sites = {site.name: site for site in prepared.meta["tunecomp"].context.compressed_sites}
    assert set(sites) == {*BLOCK_SITES, "head"}
    assert all(len(sites[name].calls) == 3 for name in BLOCK_SITES) and sites["head"].calls == [(sites["head"].node, sites["head"].entry_node)]
    calls = student_calls(prepared)
    nodes = {node.name: node for node in prepared.graph.nodes}
    for name in BLOCK_SITES:
        site = sites[name]
        assert len(calls[site.key]) == 3
        for (teacher, entry), roles in zip(site.calls, calls[site.key]):
            # each call: its own teacher (the shared layer) blended with the one student reading that call's input
            assert roles["teacher"] is nodes[teacher] and nodes[teacher].target == name
            assert roles["down"].args[0] is nodes[entry].args[0]
            assert list(nodes[teacher].users) == [roles["blend"]] and roles["blend"].args == (nodes[teacher], roles["up"])
            assert roles["down"].target == f"lowrank.{site.key}.down" and roles["up"].target == f"lowrank.{site.key}.up"
    assert dict(prepared.lowrank.named_children()).keys() == {site.key for site in map(sites.get, BLOCK_SITES)}  # one per weight (the head stays dense)
    shown = site_subgraph(prepared, "block.fc1")
    assert "3 calls of the weight" in shown.splitlines()[0] and shown.count("[teacher]") == shown.count("[blend]") == 3
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=0, atol=1e-6)  # alpha = 1: the teachers alone
        with students_alone(prepared):
            torch.testing.assert_close(prepared(x), _with_student_weights(model, prepared)(x), rtol=1e-5, atol=1e-5)


def _calibrated(model: nn.Module, x: torch.Tensor, targets: torch.Tensor | None = None) -> PassContext:
    """The analysis context after the input calibration (and, given targets, the gradient calibration)."""
    config = CompressionConfig(method="union") if targets is not None else CompressionConfig()
    context = PassContext(config=config, calibration=[(x,)], calibration_targets=[] if targets is None else [targets])
    passes = [FindLinearSites(), CalibrateInputCovariance(), *([CalibrateOutputGradients()] if targets is not None else [])]
    run_passes(capture(model, (x,)).graph_module, passes, context)
    return context


def test_a_shared_weight_is_calibrated_over_every_call_and_counted_once():
    model, x = _encoder()
    targets = torch.randint(0, 10, (4,))
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    handles = [
        model.block.fc1.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().reshape(-1, 64).double())),
        model.block.fc2.register_forward_hook(lambda module, args, output: outputs.append(output)),
    ]
    loss = F.cross_entropy(model(x), targets, reduction="sum")  # the gradient calibration's per-example loss, summed
    gradients = [g.reshape(-1, 64).double() for g in torch.autograd.grad(loss, outputs)]
    for handle in handles:
        handle.remove()
    assert len(inputs) == len(gradients) == 3
    context = _calibrated(model, x, targets)
    covariance, gradient = context.covariances["block.fc1"], context.gradient_covariances["block.fc2"]
    assert covariance.rows == gradient.rows == 3 * 4 * 10
    torch.testing.assert_close(covariance.gram, sum(rows.T @ rows for rows in inputs), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gradient.gram, sum(rows.T @ rows for rows in gradients), rtol=1e-4, atol=1e-8)
    prepared = tunecomp_fx.prepare(model, (x,), ratio=RATIO)
    tunecomp_fx.set_blend(prepared, 0.0)
    tunecomp_fx.prune_slack(prepared)
    compact = tunecomp_fx.finalize(prepared)
    report = tunecomp_fx.get_report(compact)
    rows = {row.name: row for row in report.sites}
    assert set(rows) == {*BLOCK_SITES, "head"}  # one row per weight
    fc1 = rows["block.fc1"]
    assert fc1.macs_before == 3 * 10 * 256 * 64  # three calls of 10 tokens per example
    assert fc1.macs_after == 3 * 10 * fc1.rank * (256 + 64)
    assert "one student for the weight's 3 linear calls" in fc1.reason
    # each student's parameters once: the budget and the compact model count the shared weights once
    dense = sum(row.params_before for row in report.sites)
    assert sum(row.params_after for row in report.sites) <= (1 - RATIO) * dense
    others = count_parameters(model) - dense
    assert count_parameters(compact) == others + sum(row.params_after for row in report.sites) == report.model_params_after
    downs = [n for n in compact.graph.nodes if n.op == "call_module" and n.target == "lowrank.block_fc1.down"]
    assert len(downs) == 3


@pytest.mark.parametrize("method", ["tunecomp", "union"])
def test_a_shared_weight_finalizes_and_exports(method, tmp_path):
    model, x = _encoder()
    options = {"rank_slack": 0.0, "method": "union", "calib": [((x,), torch.randint(0, 10, (4,)))]} if method == "union" else {}
    prepared = tunecomp_fx.prepare(model, (x,), ratio=RATIO, **options)
    tunecomp_fx.prune_slack(prepared)
    compact, _ = finalize_from_student_path(prepared, x)
    assert all(len(calls) == 3 and set(calls[0]) == {"down", "up"} for calls in student_calls(compact).values())
    result = to_onnx(compact, (x,), tmp_path / "shared.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


def _train_jointly(prepared: torch.fx.GraphModule) -> StepHook:
    """Six steps on random batches of the encoder's task, the blend over four."""
    torch.manual_seed(1)
    data = [(torch.randn(4, 10, 64), torch.randint(0, 10, (4,))) for _ in range(6)]
    return train_with_hook(prepared, data, F.cross_entropy, steps=6, blend_steps=4)


def test_joint_training_removes_every_calls_teacher():
    model, x = _encoder()
    prepared = tunecomp_fx.prepare(model, (x,), ratio=RATIO, rank_slack=0.25)
    hook = _train_jointly(prepared)
    assert hook.teacher_removed and not any(isinstance(m, Blend) for m in prepared.modules())
    assert not any(n.op == "call_module" and n.target in BLOCK_SITES for n in prepared.graph.nodes)  # no call's teacher left
    assert all(len(calls) == 3 for calls in student_calls(prepared).values())
    with torch.no_grad():
        trained = prepared(x)
    compact = tunecomp_fx.finalize(prepared)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), trained, rtol=1e-5, atol=1e-5)
    assert tunecomp_fx.get_report(compact).kept_fraction <= 1 - RATIO


def test_a_key_projection_of_tokens_and_of_relative_embeddings_has_one_student(tmp_path):
    torch.manual_seed(0)
    model, x = RelativeKeys().eval(), torch.randn(4, 10, 64)
    prepared = tunecomp_fx.prepare(model, (x,), ratio=RATIO)
    context = prepared.meta["tunecomp"].context
    key = next(site for site in context.compressed_sites if site.name == "key")
    assert len(key.calls) == 2 and all(len(site.calls) == 1 for site in context.compressed_sites if site.name != "key")
    second = {node.name: node for node in prepared.graph.nodes}[key.calls[1][1]]
    assert second.args[0].op == "get_attr" and second.args[0].target == "relative"  # the embeddings, no batch
    # rows: 4 x 10 tokens and the 16 embeddings; MACs per example: 10 tokens and a quarter of the embeddings
    assert context.rows_per_sample[key.node] == 10 + 16 / 4
    assert _calibrated(model, x).covariances["key"].rows == 4 * 10 + 16
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=0, atol=1e-6)
        with students_alone(prepared):
            torch.testing.assert_close(prepared(x), _with_student_weights(model, prepared)(x), rtol=1e-5, atol=1e-5)
    tunecomp_fx.prune_slack(prepared)
    compact, _ = finalize_from_student_path(prepared, x)
    result = to_onnx(compact, (x,), tmp_path / "relative.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


class BiasOnce(nn.Module):
    """One layer's weight applied with its bias, then without."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(64, 64)
        self.out = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(F.linear(x, self.shared.weight, self.shared.bias))
        return self.out(F.linear(h, self.shared.weight))


def test_calls_that_apply_a_weight_differently_stay_dense_with_the_reason():
    torch.manual_seed(0)
    compact = tunecomp_fx.compress(BiasOnce().eval(), (torch.randn(8, 64),), ratio=0.2)
    [row] = [row for row in tunecomp_fx.get_report(compact).sites if row.name == "shared"]  # one row for both calls
    assert row.decision == "shared" and row.reason == "weight applied by linear calls that differ in layout, stride or bias"
    assert row.macs_before == 2 * 64 * 64  # both calls, one row each per example
    assert compact.shared.weight.shape == (64, 64)  # still dense


def test_an_excluded_shared_weight_is_one_row_with_every_calls_macs():
    model, x = _encoder()
    compact = tunecomp_fx.compress(model, (x,), ratio=RATIO, exclude=("block.fc1",))
    [row] = [row for row in tunecomp_fx.get_report(compact).sites if row.name == "block.fc1"]
    assert row.decision == "excluded" and row.macs_before == row.macs_after == 3 * 10 * 256 * 64
    assert compact.block.fc1.weight.shape == (256, 64)


PRUNINGS = {"neurons": {"prune_neurons": 0.3}, "heads": {"prune_heads": 0.5}}


def _hidden_copies(prepared: torch.fx.GraphModule, down: str, between: tuple[str, ...]) -> list[torch.fx.Node]:
    """The student path's copies of one call's nodes of the width read by `down`."""
    return [n for n in prepared.graph.nodes if n.meta.get("tunecomp", {}).get("site") == down and n.meta["tunecomp"].get("copy_of") in between]


@pytest.mark.parametrize("kind", ["neurons", "heads"])
def test_a_width_of_shared_layers_keeps_the_same_neurons_at_every_call(kind, tmp_path):
    model, x = _encoder()
    prepared = tunecomp_fx.prepare(model, (x,), ratio=0.6, rank_slack=10.0, **PRUNINGS[kind])  # students at full rank
    context = prepared.meta["tunecomp"].context
    [width] = context.hidden_widths
    assert (width.ups, width.down) == ((("block.fc1",), "block.fc2") if kind == "neurons" else (("block.qkv",), "block.proj"))
    assert len(width.betweens) == 3 and len({name for between in width.betweens for name in between}) == 3 * len(width.between)
    sites = {site.name: site for site in context.sites}
    calls = student_calls(prepared)
    for index, (roles, between) in enumerate(zip(calls[sites[width.down].key], width.betweens)):
        # call i of the down site's student reads the copy of call i's nodes, which reads the up sites' students at call i alone
        copies = _hidden_copies(prepared, width.down, between)
        assert len(copies) == len(between) and roles["down"].args[0] in copies
        read = {node for copy_node in copies for node in copy_node.all_input_nodes if node.meta.get("tunecomp", {}).get("role") == "up"}
        assert read == {calls[sites[up].key][index]["up"] for up in width.ups}
    compact = full_rank_student_path_finalizes(prepared, silenced(model, [width]), x, tmp_path / f"{kind}.onnx")
    down = compact.get_submodule(f"lowrank.{sites[width.down].key}")
    assert next(iter(down.children())).in_features == len(width.kept) < width.width  # one module, sliced once, for every call


def test_joint_training_prunes_a_shared_layers_widths_gradually():
    model, x = _encoder()
    prepared = tunecomp_fx.prepare(model, (x,), ratio=RATIO, prune_neurons=0.3, prune_heads=0.5, width_slack=1.0)
    widths = prepared.meta["tunecomp"].context.hidden_widths
    assert sorted((w.kind, len(w.betweens), len(w.kept), w.target) for w in widths) == [("heads", 3, 64, 32), ("neurons", 3, 256, 176)]
    masks = {node.target for node in prepared.graph.nodes if node.op == "get_attr" and node.target.endswith("width_mask")}
    assert len(masks) == 2 and sum(node.target in masks for node in prepared.graph.nodes) == 6  # one mask per width, read at each call
    _train_jointly(prepared)
    assert sorted(int(prepared.get_buffer(mask).count_nonzero()) for mask in masks) == [32, 176]  # at the targets when the blend ends
    with torch.no_grad():
        trained = prepared(x)
    compact = tunecomp_fx.finalize(prepared)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), trained, rtol=1e-5, atol=1e-5)
    readers = {name: next(iter(compact.get_submodule(f"lowrank.{name.replace('.', '_')}").children())) for name in ("block.fc2", "block.proj")}
    assert (readers["block.fc2"].in_features, readers["block.proj"].in_features) == (176, 32)
    assert tunecomp_fx.get_report(compact).kept_fraction <= 1 - RATIO


class PerHeadBiasEncoder(nn.Module):
    """An attention block applied three times, its scores biased by one parameter with an entry per head
    (as Swin's relative position bias) at every call."""

    def __init__(self, dim: int = 64, heads: int = 4, tokens: int = 10) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.randn(heads, tokens, tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        for _ in range(3):
            q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            x = x + self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias).transpose(1, 2).reshape(b, t, d))
        return x


@pytest.mark.parametrize("width_slack", [0.0, 1.0])
def test_a_bias_per_head_read_at_every_call_is_read_for_the_kept_heads(width_slack, tmp_path):
    torch.manual_seed(0)
    model, x = PerHeadBiasEncoder().eval(), torch.randn(2, 10, 64)
    prepared = tunecomp_fx.prepare(model, (x,), 0.6, rank_slack=10.0, prune_heads=0.5, width_slack=width_slack)
    [width] = prepared.meta["tunecomp"].context.hidden_widths
    assert len(width.per_head_reads) == 3 and {tensor for _, tensor in width.per_head_reads} == {"bias"}  # each call's attention reads it
    selections = [node for node in prepared.graph.nodes if node.target is torch.index_select]
    assert len(selections) == 3 and {node.args[2].target for node in selections} == {"lowrank.proj.kept_heads"}  # one buffer
    if not width_slack:
        full_rank_student_path_finalizes(prepared, silenced(model, [width]), x, tmp_path / "bias.onnx")
        return
    tunecomp_fx.prune_slack(prepared)  # two of the four heads switched off, at every call
    compact, _ = finalize_from_student_path(prepared, x)
    assert compact.lowrank.proj.kept_heads.tolist() == width.heads_of([n for n, on in zip(width.kept, prepared.lowrank.proj.width_mask.tolist()) if on])
    assert len(compact.lowrank.proj.kept_heads) == 2


class SharedUpTwoDowns(nn.Module):
    """One up layer applied twice, each call's activation read by a down layer of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.first, self.second = nn.Linear(64, 256), nn.Linear(256, 64), nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.first(F.gelu(self.up(x))) + self.second(F.gelu(self.up(-x)))


class SharedConvBlock(nn.Module):
    """A pointwise convolution, batch norm, ReLU and pointwise convolution applied twice: a width with a
    per-channel module in it, which the student path's copy per call would untie."""

    def __init__(self) -> None:
        super().__init__()
        self.expand, self.norm, self.project = nn.Conv2d(16, 64, 1), nn.BatchNorm2d(64), nn.Conv2d(64, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            x = x + self.project(F.relu(self.norm(self.expand(x))))
        return x


@pytest.mark.parametrize(("model", "x", "shared"), [(SharedUpTwoDowns(), torch.randn(4, 64), "up"), (SharedConvBlock().eval(), torch.randn(2, 16, 6, 6), "expand")])
def test_a_shared_layers_width_that_calls_differently_or_through_a_batch_norm_is_not_sliced(model, x, shared):
    prepared = tunecomp_fx.prepare(model, (x,), ratio=RATIO)
    assert len(student_calls(prepared)[shared]) == 2  # compressed, one student
    with pytest.raises(tunecomp_fx.SiteError, match="found no hidden width.*sliced where each call of the down layer reads such a width"):
        tunecomp_fx.prepare(model, (x,), ratio=RATIO, prune_neurons=0.3)


@pytest.mark.parametrize(
    ("model_type", "options", "shared_sites"),
    [
        ("albert", {}, 6),  # one layer's six weights, applied by both layers
        # DeBERTa-v3: each layer's query_proj and key_proj also project the relative embeddings
        ("deberta-v2", {"relative_attention": True, "pos_att_type": ["p2c", "c2p"], "position_buckets": 32, "share_att_key": True, "norm_rel_ebd": "layer_norm"}, 4),
    ],
)
def test_hugging_face_shared_projections_have_one_student_each(model_type, options, shared_sites, tmp_path):
    model, inputs = tiny_hugging_face(model_type, **options)
    prepared = tunecomp_fx.prepare(model, inputs, ratio=RATIO)
    calls = student_calls(prepared)
    shared = [site for site in prepared.meta["tunecomp"].context.compressed_sites if site.more_calls]
    assert len(shared) == shared_sites and all(len(calls[site.key]) == 2 for site in shared)
    with torch.no_grad():
        torch.testing.assert_close(first(prepared(**inputs)), first(model(**inputs)), rtol=0, atol=1e-5)
    tunecomp_fx.prune_slack(prepared)
    compact, _ = finalize_from_student_path(prepared, **inputs)
    report = tunecomp_fx.get_report(compact)
    assert report.kept_fraction <= 1 - RATIO and not [row for row in report.sites if row.decision == "shared"]
    result = to_onnx(compact, inputs, tmp_path / f"{model_type}.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


@pytest.mark.parametrize("kind", ["neurons", "heads"])
def test_hugging_face_albert_prunes_its_shared_layers_widths(kind, tmp_path):
    model, inputs = tiny_hugging_face("albert")
    prepared = tunecomp_fx.prepare(model, inputs, 0.6, rank_slack=10.0, **PRUNINGS[kind])
    [width] = prepared.meta["tunecomp"].context.hidden_widths
    layer = "encoder.albert_layer_groups.0.albert_layers.0."
    assert width.down == layer + ("ffn_output" if kind == "neurons" else "attention.dense") and len(width.betweens) == 2
    compact = hugging_face_prunes_exactly(prepared, model, inputs, tmp_path / f"albert_{kind}.onnx")
    assert count_parameters(compact) < count_parameters(model)
