"""Neuron pruning (prune_neurons): hidden widths between two compressed sites are found, their
least important neurons are sliced away, and the pair gets one student path blended at its down site."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from tests.joint_task import digits_task, endless, fresh, single_thread  # noqa: F401
from tests.graph_checks import (
    finalize_from_student_path, full_rank_student_path_finalizes, hugging_face_prunes_exactly, silenced, tiny_hugging_face, train_with_hook,
)
from tests.models import MLP, ActivatedMLP, AttentionBlock, InvertedResidual, TokenConvMlp, WrittenOutGelu
from torch import nn

import tunecomp_fx
from tunecomp_fx import StepHook
from tunecomp_fx.errors import BudgetError, ConfigError, SiteError
from tunecomp_fx.export import to_onnx
from tunecomp_fx.metrics import count_parameters
from tunecomp_fx.passes.select_hidden_neurons import kept_neuron_count
from tunecomp_fx.sites import Blend, student_nodes

aten = torch.ops.aten


def _context(prepared: torch.fx.GraphModule):  # noqa: ANN202
    return prepared.meta["tunecomp"].context


def half_dead(inputs: int = 8, hidden: int = 16, outputs: int = 4, down_bias: bool = False) -> nn.Module:
    """inputs -> hidden -> outputs whose first half of hidden neurons never fire (ReLU of a negative constant)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, outputs, bias=down_bias)).eval()
    with torch.no_grad():
        model[0].weight[: hidden // 2] = 0.0
        model[0].bias[: hidden // 2] = -1.0
        model[0].bias[hidden // 2 :] = 0.5
    return model


def test_the_pair_gets_one_student_path_blended_at_its_down_site() -> None:
    torch.manual_seed(0)
    model, x = AttentionBlock().eval(), torch.randn(4, 16, 64)
    prepared = tunecomp_fx.prepare(model, x, 0.5, prune_neurons=0.5)

    [width] = _context(prepared).hidden_widths
    assert (width.kind, width.ups, width.down, width.width, len(width.kept)) == ("neurons", ("fc1",), "fc2", 256, 128)
    roles = student_nodes(prepared)
    assert "blend" not in roles["fc1"] and "blend" in roles["fc2"]
    copy = roles["fc2"]["down"].args[0]  # the down site's student reads its own GELU of the up site's student
    assert copy.target in (F.gelu, aten.gelu.default) and copy.args[0] is roles["fc1"]["up"]
    teacher_gelu = roles["fc2"]["teacher"].args[0]
    assert copy.meta["tunecomp"] == {"site": "fc2", "role": "hidden", "copy_of": teacher_gelu.name}
    assert teacher_gelu is not copy and teacher_gelu.args[0].target == "fc1"  # the teacher path keeps the full width
    assert prepared.lowrank.fc1.up.out_features == 128 and prepared.lowrank.fc2.down.in_features == 128
    with torch.no_grad():
        assert torch.equal(prepared(x), model(x))  # alpha = 1: the teacher alone


def test_finalize_slices_the_width_and_computes_the_student_path() -> None:
    torch.manual_seed(0)
    model, x = AttentionBlock().eval(), torch.randn(4, 16, 64)
    prepared = tunecomp_fx.prepare(model, x, 0.5, prune_neurons=0.5)
    compact, _ = finalize_from_student_path(prepared, x)
    names = {name for name, _ in compact.named_parameters()}
    assert not names & {"fc1.weight", "fc2.weight"}  # the full-width teachers are gone
    fc1, fc2 = compact.lowrank.fc1, compact.lowrank.fc2
    assert (fc1.dense.out_features if hasattr(fc1, "dense") else fc1.up.out_features) == 128
    assert (fc2.dense.in_features if hasattr(fc2, "dense") else fc2.down.in_features) == 128
    gelus = [n for n in compact.graph.nodes if n.target in (F.gelu, aten.gelu.default)]
    assert len(gelus) == 1
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert (rows["fc1"].out_features, rows["fc1"].in_features, rows["fc1"].params_before) == (256, 64, 256 * 64 + 256)
    assert "128 of 256 output neurons kept" in rows["fc1"].reason
    assert "128 of 256 input neurons kept" in rows["fc2"].reason
    # the ratio is of the layers before pruning, and the ranks fill what pruning left
    kept = sum(row.params_after for row in rows.values()) / sum(row.params_before for row in rows.values())
    assert 0.47 <= kept <= 0.5
    assert sum(row.params_after for row in rows.values()) == count_parameters(compact.lowrank)


def test_dead_neurons_are_the_ones_pruned_and_the_model_is_unchanged() -> None:
    model = half_dead(inputs=2, hidden=4, outputs=4, down_bias=True)
    x = torch.randn(64, 2)
    # pruning alone keeps 2x2+2 and 4x2+4 of 4x2+4 and 4x4+4 parameters: 18 of 32, exactly what ratio 0.4375 keeps
    prepared = tunecomp_fx.prepare(model, x, 0.4375, prune_neurons=0.5)
    [width] = _context(prepared).hidden_widths
    assert width.kept == (2, 3)
    tunecomp_fx.set_blend(prepared, 0.0)
    compact = tunecomp_fx.finalize(prepared)
    # both sites keep their sliced weights whole (past break-even): only dead neurons left
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), rtol=1e-5, atol=1e-5)
    assert count_parameters(compact) == 18


def test_a_bias_free_site_kept_whole_is_charged_its_students_bias() -> None:
    model, x = half_dead(), torch.randn(64, 8)
    # pruning alone keeps 8x8+8 and 4x8 weights, and the down site's student adds a bias: 108, over the budget of 104
    compact = tunecomp_fx.compress(model, x, 0.5, prune_neurons=0.5)
    assert count_parameters(compact) <= 0.5 * (8 * 16 + 16 + 16 * 4)


def test_a_layer_between_two_widths_is_sliced_on_both_sides_and_trains_through_teacher_removal() -> None:
    task = digits_task()
    prepared = tunecomp_fx.prepare(fresh("mlp"), task.example_inputs(), 0.6, prune_neurons=0.25, rank_slack=0.25)
    widths = _context(prepared).hidden_widths
    assert [(w.ups, w.down) for w in widths] == [(("0",), "2"), (("2",), "4")]
    assert [len(w.kept) for w in widths] == [192, 192]
    roles = student_nodes(prepared)
    assert ["blend" in roles[key] for key in ("0", "2", "4")] == [False, False, True]

    hook = StepHook(prepared, steps=8, blend_steps=4)
    optimizer = torch.optim.AdamW([p for p in prepared.parameters() if p.requires_grad], lr=1e-3)
    data = endless(task.loader(seed=0))
    for _ in range(8):
        inputs, targets = next(data)
        (F.cross_entropy(prepared(inputs), targets) + hook.distill_loss()).backward()
        optimizer.step()
        optimizer.zero_grad()
        hook.step()
    assert hook.teacher_removed
    assert not any(isinstance(m, Blend) for m in prepared.modules())
    assert not {"0.weight", "2.weight", "4.weight"} & {name for name, _ in prepared.named_parameters()}
    compact = tunecomp_fx.finalize(prepared)
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["2"].reason.startswith("192 of 256 output and 192 of 256 input neurons kept")
    with torch.no_grad():
        assert torch.isfinite(compact(task.test[0])).all()
    assert sum(row.params_after for row in rows.values()) <= 0.4 * sum(row.params_before for row in rows.values())


def test_the_pruned_model_exports_to_onnx(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model, x = AttentionBlock().eval(), torch.randn(4, 16, 64)
    compact = tunecomp_fx.compress(model, x, 0.6, prune_neurons=0.5)
    result = to_onnx(compact, (x,), tmp_path / "pruned.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


def test_kept_neuron_count_rounds_to_the_rank_multiple() -> None:
    assert kept_neuron_count(1536, 0.5, 8) == 768
    assert kept_neuron_count(1536, 0.3, 8) == 1072  # 1075.2 -> a multiple of 8
    assert kept_neuron_count(10, 0.5, 8) == 5  # too narrow for the multiple
    assert kept_neuron_count(16, 0.99, 8) == 8  # at least one multiple


@pytest.mark.parametrize("option, what", [("prune_neurons", "each hidden width's neurons"), ("prune_heads", "each attention block's heads")])
@pytest.mark.parametrize("value", [-0.1, 1.0, "half", True])
def test_a_pruned_fraction_out_of_range_is_a_config_error(option: str, what: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"{option} must be a number in \[0, 1\), the fraction of {what} to remove"):
        tunecomp_fx.CompressionConfig(**{option: value})


@pytest.mark.parametrize("option", ["prune_neurons", "prune_heads"])
def test_union_does_not_prune_widths(option: str) -> None:
    with pytest.raises(ConfigError, match=f"method='union' does not prune widths; use method='tunecomp' with {option}"):
        tunecomp_fx.CompressionConfig(method="union", **{option: 0.3})


ACTIVATIONS = [nn.ReLU6(), nn.Hardswish(), nn.Hardsigmoid(), nn.LeakyReLU(0.1), nn.ELU(), nn.SELU(), nn.Mish(), nn.Softplus()]


@pytest.mark.parametrize("export", [False, True], ids=["symbolic_trace", "torch_export"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=[type(a).__name__ for a in ACTIVATIONS])
def test_every_elementwise_activation_makes_a_width(activation: nn.Module, export: bool) -> None:
    torch.manual_seed(0)
    model, x = ActivatedMLP(activation, export).eval(), torch.randn(32, 16)
    prepared = tunecomp_fx.prepare(model, x, 0.5, prune_neurons=0.5)
    assert prepared.meta["tunecomp"].capture_path == ("torch.export" if export else "symbolic_trace")
    [width] = _context(prepared).hidden_widths
    assert (width.ups, width.down, len(width.kept)) == (("up",), "down", 32)
    finalize_from_student_path(prepared, x)


def test_an_activation_written_out_in_arithmetic_is_a_width_and_its_copy_computes_fewer_neurons() -> None:
    torch.manual_seed(0)
    model, x = WrittenOutGelu().eval(), torch.randn(4, 10, 64)
    prepared = tunecomp_fx.prepare(model, x, 0.5, prune_neurons=0.5)
    [width] = _context(prepared).hidden_widths
    assert (width.ups, width.down, width.width, len(width.kept)) == (("fc1",), "fc2", 128, 64)
    copies = [n for n in prepared.graph.nodes if "copy_of" in n.meta.get("tunecomp", {})]
    # the arithmetic and the flattening, whose literal width counts the kept neurons
    targets = [n.target for n in copies]
    assert sorted(map(str, targets)) == sorted(map(str, [*[operator.mul] * 4, operator.add, operator.add, torch.pow, torch.tanh, "reshape"]))
    [flatten] = [n for n in copies if n.target == "reshape"]
    assert flatten.args[1:] == (-1, 64)
    with torch.no_grad():
        assert torch.equal(prepared(x), model(x))  # alpha = 1: the teacher alone
    compact, _ = finalize_from_student_path(prepared, x)
    with torch.no_grad():
        assert compact(torch.randn(3, 7, 64)).shape == (3, 7, 64)
    assert "64 of 128 input neurons kept" in {row.name: row for row in tunecomp_fx.get_report(compact).sites}["fc2"].reason


def test_a_gated_activation_shares_its_neurons_between_the_two_up_sites() -> None:
    torch.manual_seed(0)
    model, x = WrittenOutGelu(gated=True).eval(), torch.randn(4, 10, 64)
    prepared = tunecomp_fx.prepare(model, x, 0.5, prune_neurons=0.5)
    [width] = _context(prepared).hidden_widths
    assert (width.ups, width.down, len(width.kept)) == (("fc1", "gate"), "fc2", 64)
    roles = student_nodes(prepared)
    [product] = roles["gate"]["up"].users  # the copy of h * gate(x): the copied activation of fc1's student times gate's
    assert product.target is operator.mul and product.args[1] is roles["gate"]["up"]
    assert [product.meta["tunecomp"]["role"], product.args[0].meta["tunecomp"]["role"]] == ["hidden", "hidden"]
    assert all(user.meta["tunecomp"]["role"] == "hidden" for user in roles["fc1"]["up"].users)
    with torch.no_grad():
        assert torch.equal(prepared(x), model(x))  # alpha = 1: the teacher alone
    compact, _ = finalize_from_student_path(prepared, x)
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert all(rows[name].reason.startswith("64 of 128 output neurons kept") for name in ("fc1", "gate"))
    assert rows["fc2"].reason.startswith("64 of 128 input neurons kept")


def test_a_gate_left_dense_leaves_no_width() -> None:
    # h * gate(x) with gate excluded: slicing fc1's neurons would leave the dense gate's unmatched
    with pytest.raises(SiteError, match="found no hidden width to prune"):
        tunecomp_fx.prepare(WrittenOutGelu(gated=True), torch.randn(4, 10, 64), 0.5, prune_neurons=0.3, exclude=("gate",))


def _hugging_face_gated_mlps(family: str) -> nn.Module:
    """A 2-layer LLaMA (gate_proj and up_proj) or Phi-3 (gate_up_proj, chunked), random weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = {
        "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "vocab_size": 100, "max_position_embeddings": 32, "use_cache": False,
    }  # fmt: skip
    if family == "llama":
        return transformers.LlamaModel(transformers.LlamaConfig(num_key_value_heads=2, **common))
    return transformers.Phi3Model(transformers.Phi3Config(num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2, **common))


@pytest.mark.parametrize(
    "family, ups, parts, kept_rows",
    [("llama", ("gate_proj", "up_proj"), (), "88 of 128"), ("phi3", ("gate_up_proj",), (2,), "176 of 256")],  # two up sites; one, chunked
)
def test_hugging_faces_gated_mlps_prune_their_neurons_and_export(family: str, ups: tuple[str, ...], parts: tuple[int, ...], kept_rows: str, tmp_path) -> None:  # noqa: ANN001
    model, inputs = _hugging_face_gated_mlps(family).eval(), {"input_ids": torch.randint(0, 100, (2, 12))}
    prepared = tunecomp_fx.prepare(model, inputs, 0.5, prune_neurons=0.3)
    assert {(w.ups, w.down, w.parts, len(w.kept)) for w in _context(prepared).hidden_widths} == {
        (tuple(f"layers.{i}.mlp.{up}" for up in ups), f"layers.{i}.mlp.down_proj", parts, 88) for i in range(2)
    }
    with torch.no_grad():
        torch.testing.assert_close(prepared(**inputs)[0], model(**inputs)[0], rtol=1e-5, atol=1e-5)  # alpha = 1: the teacher alone
    compact, _ = finalize_from_student_path(prepared, **inputs)
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows[f"layers.1.mlp.{ups[-1]}"].reason.startswith(f"{kept_rows} output neurons kept")
    result = to_onnx(compact, inputs, tmp_path / f"{family}.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


@pytest.mark.parametrize(
    ("model_type", "options", "activation"),
    [
        ("esm", {}, aten.erf.default),  # GELU written out: x * 0.5 * (1 + erf(x / sqrt(2)))
        ("nemotron", {"num_key_value_heads": 2, "head_dim": 16}, aten.square.default),  # a squared ReLU
    ],
)
def test_hugging_face_activations_written_out_prune_their_neurons_exactly(tmp_path, model_type: str, options: dict, activation: object) -> None:  # noqa: ANN001
    model, inputs = tiny_hugging_face(model_type, **options)
    prepared = tunecomp_fx.prepare(model, inputs, 0.6, prune_neurons=0.3, rank_slack=10.0)
    widths = _context(prepared).hidden_widths
    assert len(widths) == 2 and all(len(w.kept) == 88 for w in widths)
    nodes = {n.name: n for n in prepared.graph.nodes}
    assert all(any(nodes[name].target is activation for name in w.between) for w in widths)  # the activation is in the width
    hugging_face_prunes_exactly(prepared, model, inputs, tmp_path / f"{model_type}.onnx")


def _glu_mlp() -> nn.Module:
    """timm's GluMlp: fc1's output chunked in two along the last dim, act(first) * second (64 neurons), fc2."""
    from timm.layers import GluMlp

    torch.manual_seed(0)
    return GluMlp(32, 128, act_layer=nn.SiLU)


def test_a_gated_activation_packed_in_one_site_prunes_both_its_parts(tmp_path) -> None:  # noqa: ANN001
    mlp, x = _glu_mlp().eval(), torch.randn(4, 10, 32)
    prepared = tunecomp_fx.prepare(mlp, x, 0.5, prune_neurons=0.5, rank_slack=10.0)
    [width] = _context(prepared).hidden_widths
    assert (width.ups, width.down, width.width, width.parts, len(width.kept)) == (("fc1",), "fc2", 64, (2,), 32)
    kept = list(width.kept)
    sites = {site.name: site for site in _context(prepared).sites}
    assert sites["fc1"].kept_rows == (*kept, *(64 + neuron for neuron in kept))  # each kept neuron's row in both parts
    compact = full_rank_student_path_finalizes(prepared, silenced(mlp, [width]), x, tmp_path / "glu_mlp.onnx")
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["fc1"].reason.startswith("64 of 128 output neurons kept") and rows["fc2"].reason.startswith("32 of 64 input neurons kept")


def test_a_packed_gated_activation_loses_the_neurons_pruned_during_training() -> None:
    torch.manual_seed(0)
    data = [(torch.randn(4, 10, 32), torch.randn(4, 10, 32)) for _ in range(3)]
    options = {"prune_neurons": 0.5, "width_slack": 1.0, "rank_slack": 0.25}
    prepared = tunecomp_fx.prepare(_glu_mlp(), data[0][0], 0.6, calib=[x for x, _ in data], **options)
    assert len(_context(prepared).hidden_widths[0].kept) == 64  # every neuron at first
    assert train_with_hook(prepared.train(), data, F.mse_loss, 6, 3).teacher_removed
    prepared.eval()
    with torch.no_grad():
        trained = prepared(data[0][0])
    compact = tunecomp_fx.finalize(prepared)
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["fc1"].reason.startswith("64 of 128 output neurons kept") and rows["fc2"].reason.startswith("32 of 64 input neurons kept")
    with torch.no_grad():
        torch.testing.assert_close(compact(data[0][0]), trained, rtol=1e-5, atol=1e-5)


class _TokenChunks(nn.Module):
    """fc1's output chunked along the tokens, not the width: silu(first half) * second half -> fc2."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.fc1(x).chunk(2, dim=1)
        return self.fc2(F.silu(first) * second)


def test_a_chunk_of_the_tokens_is_no_packed_gated_activation() -> None:
    with pytest.raises(SiteError, match="found no hidden width to prune"):
        tunecomp_fx.prepare(_TokenChunks().eval(), torch.randn(2, 8, 16), 0.5, prune_neurons=0.5)


def test_batch_norms_and_a_depthwise_convolution_are_copied_with_the_kept_channels(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model, x = InvertedResidual().eval(), torch.randn(4, 16, 8, 8)
    prepared = tunecomp_fx.prepare(model, x, 0.5, prune_neurons=0.5)
    [width] = _context(prepared).hidden_widths
    assert (width.ups, width.down, width.channelwise, len(width.kept)) == (("expand",), "project", ("bn1", "dw", "bn2"), 32)
    kept = list(width.kept)
    copies = {n.meta["tunecomp"]["copy_of"]: n for n in prepared.graph.nodes if "copy_of" in n.meta.get("tunecomp", {})}
    assert {name: copies[name].target for name in width.channelwise} == {name: f"lowrank.project.channels_{name}" for name in width.channelwise}
    norm, depthwise = prepared.lowrank.project.channels_bn1, prepared.lowrank.project.channels_dw
    assert torch.equal(norm.running_var, model.bn1.running_var[kept]) and torch.equal(norm.bias, model.bn1.bias[kept])
    assert (depthwise.groups, depthwise.weight.shape) == (32, (32, 1, 3, 3)) and torch.equal(depthwise.weight, model.dw.weight[kept])
    with torch.no_grad():
        assert torch.equal(prepared(x), model(x))  # alpha = 1: the teacher alone
    compact, _ = finalize_from_student_path(prepared, x)
    assert not {"bn1", "dw", "bn2"} & {name for name, _ in compact.named_children()}  # the teacher's went with it
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["project"].params_after == 32 * 16 + 16  # its kept columns and bias: the channels' copies are no part of the site
    result = to_onnx(compact, (x,), tmp_path / "inverted_residual.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


def test_an_exported_inverted_residual_copies_the_aten_batch_norms_and_depthwise_convolution(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model, x = InvertedResidual(checked=True).eval(), torch.randn(4, 16, 8, 8)
    prepared = tunecomp_fx.prepare(model, x, 0.5, prune_neurons=0.5)
    assert prepared.meta["tunecomp"].capture_path == "torch.export"
    [width] = _context(prepared).hidden_widths
    assert (width.channelwise, len(width.kept)) == (("batch_norm", "conv2d_1", "batch_norm_1"), 32)
    kept = list(width.kept)
    copies = {n.meta["tunecomp"]["copy_of"]: n for n in prepared.graph.nodes if "copy_of" in n.meta.get("tunecomp", {})}
    # the copies read the kept channels' tensors under lowrank.project; the depthwise one has a group each
    assert [a.target for a in copies["batch_norm"].args[1:5]] == [f"lowrank.project.channels_batch_norm.arg{i}" for i in range(1, 5)]
    assert copies["conv2d_1"].args[6] == 32 and copies["conv2d_1"].args[1].target == "lowrank.project.channels_conv2d_1.arg1"
    held = prepared.lowrank.project
    assert torch.equal(held.channels_batch_norm.arg4, model.bn1.running_var[kept]) and held.channels_batch_norm.arg1.requires_grad
    assert torch.equal(held.channels_conv2d_1.arg1, model.dw.weight[kept])
    with torch.no_grad():
        assert torch.equal(prepared(x), model(x))  # alpha = 1: the teacher alone
    compact, _ = finalize_from_student_path(prepared, x)
    assert sum(p.numel() for p in compact.parameters()) < 0.55 * sum(p.numel() for p in model.parameters())  # the teacher's went
    assert tunecomp_fx.get_report(compact).sites[1].params_after == 32 * 16 + 16  # project: the channels' copies are no part of it
    result = to_onnx(compact, (x,), tmp_path / "exported_inverted_residual.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


@pytest.mark.parametrize("checked", [False, True], ids=["traced", "exported"])
def test_channels_the_projection_ignores_are_pruned_and_the_model_is_unchanged(checked: bool) -> None:
    torch.manual_seed(0)
    model, x = InvertedResidual(checked=checked).eval(), torch.randn(4, 16, 8, 8)
    with torch.no_grad():
        model.project.weight[:, 1::2] = 0.0
    # students at full rank: the student path is the model with the pruned channels alone taken out
    prepared = tunecomp_fx.prepare(model, x, 0.5, prune_neurons=0.5, rank_slack=10.0)
    tunecomp_fx.set_blend(prepared, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-5)


def test_copied_batch_norms_train_and_lose_the_channels_pruned_during_training() -> None:
    torch.manual_seed(0)
    data = [(torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)) for _ in range(3)]
    options = {"prune_neurons": 0.5, "width_slack": 1.0, "rank_slack": 0.25}
    prepared = tunecomp_fx.prepare(InvertedResidual(), data[0][0], 0.6, calib=[x for x, _ in data], **options)
    assert prepared.lowrank.project.channels_bn1.num_features == 64  # every channel at first
    before = prepared.lowrank.project.channels_bn1.running_mean.clone()
    assert train_with_hook(prepared.train(), data, F.mse_loss, 6, 3).teacher_removed
    assert not torch.equal(prepared.lowrank.project.channels_bn1.running_mean, before)  # batch statistics of its own
    prepared.eval()
    with torch.no_grad():
        trained = prepared(data[0][0])
    compact = tunecomp_fx.finalize(prepared)
    assert (compact.lowrank.project.channels_bn1.num_features, compact.lowrank.project.channels_dw.groups) == (32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compact(data[0][0]), trained, rtol=1e-5, atol=1e-5)


def test_an_exported_depthwise_convolution_loses_the_channels_pruned_during_training() -> None:
    torch.manual_seed(0)
    data = [(torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)) for _ in range(3)]
    options = {"prune_neurons": 0.5, "width_slack": 1.0, "rank_slack": 0.25}
    prepared = tunecomp_fx.prepare(InvertedResidual(checked=True), data[0][0], 0.6, calib=[x for x, _ in data], **options)
    depthwise = next(n for n in prepared.graph.nodes if n.meta.get("tunecomp", {}).get("copy_of") == "conv2d_1")
    assert depthwise.args[6] == 64  # every channel at first
    before = prepared.lowrank.project.channels_batch_norm.arg1.clone()
    assert train_with_hook(prepared.train(), data, F.mse_loss, 6, 3).teacher_removed
    assert not torch.equal(prepared.lowrank.project.channels_batch_norm.arg1, before)  # the copy's scale trains
    prepared.eval()
    with torch.no_grad():
        trained = prepared(data[0][0])
    compact = tunecomp_fx.finalize(prepared)
    depthwise = next(n for n in compact.graph.nodes if n.target == torch.ops.aten.conv2d.default and n.args[1].target.endswith("arg1"))
    assert (depthwise.args[6], compact.lowrank.project.channels_conv2d_1.arg1.shape[0]) == (32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compact(data[0][0]), trained, rtol=1e-5, atol=1e-5)


def _grouped_copy(compact: torch.fx.GraphModule, checked: bool) -> tuple[int, torch.Tensor]:
    """The groups and weight of the student path's copy of InvertedResidual's middle convolution."""
    held = compact.lowrank.project
    if not checked:
        return held.channels_dw.groups, held.channels_dw.weight
    [call] = [n for n in compact.graph.nodes if n.target == aten.conv2d.default and n.args[1].target == "lowrank.project.channels_conv2d_1.arg1"]
    return call.args[6], held.channels_conv2d_1.arg1


@pytest.mark.parametrize("checked", [False, True], ids=["traced", "exported"])
def test_a_grouped_convolution_is_pruned_in_whole_groups(checked: bool, tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model, x = InvertedResidual(groups=8, checked=checked).eval(), torch.randn(4, 16, 8, 8)  # 8 groups of 8 channels
    with torch.no_grad():  # the projection reads the even groups alone: pruning the odd ones changes nothing
        model.project.weight.view(16, 8, 8)[:, 1::2] = 0.0
    prepared = tunecomp_fx.prepare(model, x, 0.5, prune_neurons=0.5, rank_slack=10.0)
    [width] = _context(prepared).hidden_widths
    kept = [channel for group in range(0, 8, 2) for channel in range(8 * group, 8 * group + 8)]
    assert (width.group, width.kept) == (8, tuple(kept))
    compact = full_rank_student_path_finalizes(prepared, model, x, tmp_path / "grouped.onnx")
    groups, weight = _grouped_copy(compact, checked)
    assert groups == 4 and torch.equal(weight, model.dw.weight[kept])  # the kept groups' filters, each reading its own group
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["project"].reason.startswith("32 of 64 input neurons kept (4 of 8 groups)")
    # groups of 4 channels: an even count of them keeps the width a multiple of rank_multiple=8
    prepared = tunecomp_fx.prepare(InvertedResidual(groups=16, checked=checked).eval(), x, 0.5, prune_neurons=0.3)
    [width] = _context(prepared).hidden_widths
    assert (width.group, len(width.kept)) == (4, 48)


@pytest.mark.parametrize("checked", [False, True], ids=["traced", "exported"])
def test_a_grouped_convolution_loses_the_groups_pruned_during_training(checked: bool) -> None:
    torch.manual_seed(0)
    data = [(torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)) for _ in range(3)]
    options = {"prune_neurons": 0.5, "width_slack": 1.0, "rank_slack": 0.25}
    prepared = tunecomp_fx.prepare(InvertedResidual(groups=8, checked=checked), data[0][0], 0.6, calib=[x for x, _ in data], **options)
    assert _context(prepared).hidden_widths[0].kept == tuple(range(64))  # every group at first
    assert train_with_hook(prepared.train(), data, F.mse_loss, 6, 3).teacher_removed
    prepared.eval()
    with torch.no_grad():
        trained = prepared(data[0][0])
    compact = tunecomp_fx.finalize(prepared)
    groups, weight = _grouped_copy(compact, checked)
    assert (groups, weight.shape) == (4, (32, 8, 3, 3))
    with torch.no_grad():
        torch.testing.assert_close(compact(data[0][0]), trained, rtol=1e-5, atol=1e-5)


def test_regnets_bottleneck_prunes_whole_groups_through_its_squeeze_excitation(tmp_path) -> None:  # noqa: ANN001
    from torchvision.models.regnet import ResBottleneckBlock

    torch.manual_seed(0)
    block = ResBottleneckBlock(32, 32, 1, nn.BatchNorm2d, nn.ReLU, group_width=8, se_ratio=0.25).eval()  # 4 groups of 8
    with torch.no_grad():
        for norm in (m for m in block.modules() if isinstance(m, nn.BatchNorm2d)):
            norm.weight.normal_(), norm.bias.uniform_(1.0, 2.0), norm.running_mean.normal_()  # every channel fires
        for layer in (block.f.c[0], block.f.se.fc1):  # the projection and the gates read the first and third groups alone
            layer.weight.view(layer.weight.shape[0], 4, 8)[:, 1::2] = 0.0
    x = torch.randn(4, 32, 8, 8)
    prepared = tunecomp_fx.prepare(block, x, 0.5, prune_neurons=0.5, rank_slack=10.0)
    [width] = _context(prepared).hidden_widths
    assert (width.ups, width.down, width.group, width.squeezes) == (("f.a.0",), "f.c.0", 8, (("f_se_avgpool", "f_se_fc1", "f_se_fc2"),))
    assert width.kept == (*range(8), *range(16, 24))
    compact = full_rank_student_path_finalizes(prepared, block, x, tmp_path / "regnet_block.onnx")
    assert compact.lowrank.f_c_0.channels_f_b_0.groups == 2


def test_timms_inverted_residual_prunes_through_batch_norms_that_hold_the_activation() -> None:
    from timm.models._efficientnet_blocks import InvertedResidual as TimmInvertedResidual

    torch.manual_seed(0)
    block, x = TimmInvertedResidual(16, 16, exp_ratio=4.0).eval(), torch.randn(4, 16, 8, 8)
    with torch.no_grad():
        for norm in (block.bn1, block.bn2):  # BatchNormAct2d: batch norm, then ReLU, inside one module
            norm.weight.normal_(), norm.bias.normal_(), norm.running_mean.normal_()
        block.conv_pwl.weight[:, 1::2] = 0.0
    prepared = tunecomp_fx.prepare(block, x, 0.5, prune_neurons=0.5, rank_slack=10.0)
    [width] = _context(prepared).hidden_widths
    assert (width.ups, width.down, width.channelwise) == (("conv_pw",), "conv_pwl", ("bn1", "conv_dw", "bn2"))
    assert type(prepared.lowrank.conv_pwl.channels_bn1) is type(block.bn1) and prepared.lowrank.conv_pwl.channels_bn1.num_features == 32
    tunecomp_fx.set_blend(prepared, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), block(x), rtol=1e-5, atol=1e-5)


def _block_with_squeeze_excitation(library: str) -> tuple[nn.Module, str, tuple[str, str], tuple[str, str, str]]:
    """An inverted residual with a squeeze-excitation (64 channels, 16 in the gate's bottleneck) from
    timm (x.mean((2, 3), keepdim=True), sigmoid) or torchvision (AdaptiveAvgPool2d(1), hardsigmoid), or
    ours captured with torch.export (aten calls on the graph's tensors), or SENet's of linear layers, with
    its down site's name, the squeeze-excitation's two layers and its squeeze's and their nodes."""
    torch.manual_seed(0)
    if library == "linear":
        return _LinearGates().eval(), "project", ("fc.0", "fc.2"), ("pool", "fc_0", "fc_2")
    if library == "exported":
        return InvertedResidual(checked=True, gated=True).eval(), "project", ("gates.0", "gates.2"), ("mean", "conv2d_2", "conv2d_3")
    if library == "timm":
        from functools import partial

        from timm.models._efficientnet_blocks import InvertedResidual as TimmInvertedResidual, SqueezeExcite

        block = TimmInvertedResidual(16, 16, exp_ratio=4.0, se_layer=partial(SqueezeExcite, rd_ratio=0.25))
        return block.eval(), "conv_pwl", ("se.conv_reduce", "se.conv_expand"), ("mean", "se_conv_reduce", "se_conv_expand")
    from torchvision.models.mobilenetv3 import InvertedResidual as TorchvisionInvertedResidual, InvertedResidualConfig

    block = TorchvisionInvertedResidual(InvertedResidualConfig(16, 3, 64, 16, True, "HS", 1, 1, 1.0), nn.BatchNorm2d)
    return block.eval(), "block.3.0", ("block.2.fc1", "block.2.fc2"), ("block_2_avgpool", "block_2_fc1", "block_2_fc2")


@pytest.mark.parametrize("library", ["timm", "torchvision", "exported"])
def test_a_squeeze_excitation_in_the_width_is_sliced_with_it_and_kept_dense(library: str, tmp_path) -> None:  # noqa: ANN001
    block, down, convolutions, squeeze = _block_with_squeeze_excitation(library)
    reduce, expand = (block.get_submodule(name) for name in convolutions)
    x = torch.randn(4, 16, 8, 8)
    with torch.no_grad():  # channels the projection ignores and the gates do not read: pruning them changes nothing
        block.get_submodule(down).weight[:, 1::2] = 0.0
        reduce.weight[:, 1::2] = 0.0
    prepared = tunecomp_fx.prepare(block, x, 0.5, prune_neurons=0.5, rank_slack=10.0)
    [width] = _context(prepared).hidden_widths  # the gate's own reduce -> activation -> expand is no width of its own
    assert (width.down, width.squeezes, len(width.kept)) == (down, (squeeze,), 32)
    kept = list(width.kept)  # no odd channel is read, and some even ones never fire (ReLU6 of batch norms at random)
    assert [site.name for site in _context(prepared).sites if site.status == "in_width"] == list(convolutions)
    held = prepared.get_submodule(f"lowrank.{down.replace('.', '_')}")
    # a module's copy, or for aten calls a module holding the weight and bias as arg1 and arg2
    (reduce_weight, reduce_bias), (expand_weight, expand_bias) = (
        [getattr(held, f"channels_{node}").get_parameter(name) for name in (("arg1", "arg2") if library == "exported" else ("weight", "bias"))]
        for node in squeeze[1:]
    )
    assert torch.equal(reduce_weight, reduce.weight[:, kept]) and torch.equal(reduce_bias, reduce.bias)
    assert torch.equal(expand_weight, expand.weight[kept]) and torch.equal(expand_bias, expand.bias[kept])
    with torch.no_grad():
        assert torch.equal(prepared(x), block(x))  # alpha = 1: the teacher alone
    compact = full_rank_student_path_finalizes(prepared, block, x, tmp_path / "squeeze_excitation.onnx")
    assert not any(isinstance(m, nn.Conv2d) and 64 in (m.in_channels, m.out_channels) for m in compact.modules())  # every 64-channel layer sliced
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert [(rows[name].decision, rows[name].params_before, rows[name].params_after) for name in convolutions] == [
        ("in_width", 64 * 16 + 16, 32 * 16 + 16), ("in_width", 16 * 64 + 64, 16 * 32 + 32)  # weights and biases, sliced
    ]
    # one position per example (the squeezed image), at the full and the kept width
    assert [(rows[name].macs_before, rows[name].macs_after) for name in convolutions] == [(64 * 16, 32 * 16)] * 2


class _LinearGates(nn.Module):
    """SENet's squeeze-excitation of linear layers after a pointwise convolution: the gates are viewed
    from (batch, width) to (batch, width, 1, 1) and expand_as the image; the sizes read from its shape,
    or with `literal` named (the width, 64) in the views."""

    def __init__(self, literal: bool = False) -> None:
        super().__init__()
        self.literal = literal
        self.expand, self.project = nn.Conv2d(16, 64, 1, bias=False), nn.Conv2d(64, 16, 1)
        self.bn = nn.BatchNorm2d(64)
        nn.init.normal_(self.bn.weight), nn.init.normal_(self.bn.bias)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(64, 16, bias=False), nn.ReLU(inplace=True), nn.Linear(16, 64, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.expand(x)))
        b, c = (-1, 64) if self.literal else h.size()[:2]
        gates = self.fc(self.pool(h).view(b, c)).view(b, c, 1, 1)
        return x + self.project(h * gates.expand_as(h))


@pytest.mark.parametrize("literal", [False, True], ids=["sizes_read", "literal"])
def test_a_squeeze_excitation_of_linear_layers_is_sliced_with_the_width(literal: bool, tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model, x = _LinearGates(literal).eval(), torch.randn(4, 16, 8, 8)
    with torch.no_grad():
        model.project.weight[:, 1::2] = 0.0
        model.fc[0].weight[:, 1::2] = 0.0
    prepared = tunecomp_fx.prepare(model, x, 0.5, prune_neurons=0.5, rank_slack=10.0)
    [width] = _context(prepared).hidden_widths
    assert (width.down, width.squeezes, len(width.kept)) == ("project", (("pool", "fc_0", "fc_2"),), 32)
    assert [site.name for site in _context(prepared).sites if site.status == "in_width"] == ["fc.0", "fc.2"]
    assert dict(width.resized) == ({"view": 1, "view_1": 1} if literal else {})  # the named widths, scaled to the kept
    held = prepared.lowrank.project
    assert (held.channels_fc_0.in_features, held.channels_fc_2.out_features) == (32, 32)
    full_rank_student_path_finalizes(prepared, model, x, tmp_path / "linear_gates.onnx")


@pytest.mark.parametrize("library", ["timm", "exported", "linear"])
def test_neurons_switched_off_during_training_move_no_gate_of_a_squeeze_excitation(library: str) -> None:
    block, down, _, squeeze = _block_with_squeeze_excitation(library)
    data = [(torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)) for _ in range(3)]
    options = {"prune_neurons": 0.5, "width_slack": 1.0, "rank_slack": 0.25}
    prepared = tunecomp_fx.prepare(block, data[0][0], 0.6, calib=[x for x, _ in data], **options)
    mask = student_nodes(prepared)[down]["width_mask"]
    squeezed = next(n for n in prepared.graph.nodes if n.meta.get("tunecomp", {}).get("copy_of") == squeeze[0])
    # the down site's student and the squeeze read the width through the mask
    assert [user.target for user in mask.users] == [operator.mul, operator.mul] and squeezed.args[0] in mask.users
    assert train_with_hook(prepared.train(), data, F.mse_loss, 6, 3).teacher_removed
    prepared.eval()
    with torch.no_grad():
        trained = prepared(data[0][0])
    compact = tunecomp_fx.finalize(prepared)
    held = compact.get_submodule(f"lowrank.{down}")
    sliced = [getattr(held, f"channels_{node}").get_parameter("arg1" if library == "exported" else "weight").shape for node in squeeze[1:]]
    assert (sliced[0][1], sliced[1][0]) == (32, 32)  # the inputs of the one, the outputs of the other
    with torch.no_grad():
        torch.testing.assert_close(compact(data[0][0]), trained, rtol=1e-5, atol=1e-5)


def test_a_norm_in_a_squeeze_excitations_bottleneck_gets_a_copy_of_its_own(tmp_path) -> None:  # noqa: ANN001
    from timm.models.rexnet import LinearBottleneck

    torch.manual_seed(0)
    block = LinearBottleneck(16, 16, stride=1, exp_ratio=4.0, se_ratio=0.25).eval()  # ReXNet's: SEModule with a batch norm
    with torch.no_grad():
        for norm in (block.conv_exp.bn, block.conv_dw.bn, block.se.bn):
            norm.weight.normal_(), norm.bias.uniform_(1.0, 2.0), norm.running_mean.normal_()  # every channel fires
        block.conv_pwl.conv.weight[:, 1::2] = 0.0
        block.se.fc1.weight[:, 1::2] = 0.0
    x = torch.randn(4, 16, 8, 8)
    prepared = tunecomp_fx.prepare(block, x, 0.5, prune_neurons=0.5, rank_slack=10.0)
    [width] = _context(prepared).hidden_widths  # the block's, not the bottleneck's own (fc1 -> norm -> ReLU -> fc2)
    assert (width.down, width.bottleneck_norms, width.squeezes) == ("conv_pwl.conv", ("se_bn",), (("mean", "se_fc1", "se_fc2"),))
    assert width.kept == tuple(range(0, 64, 2))
    norm = prepared.lowrank.conv_pwl_conv.channels_se_bn  # whole: the bottleneck holds no channel of the width
    assert norm is not block.se.bn and norm.num_features == block.se.bn.num_features and torch.equal(norm.running_mean, block.se.bn.running_mean)
    full_rank_student_path_finalizes(prepared, block, x, tmp_path / "rexnet_block.onnx")


def test_a_layer_of_its_own_in_a_squeeze_excitations_bottleneck_leaves_no_width() -> None:
    torch.manual_seed(0)
    model = InvertedResidual(gated=True).eval()
    model.gates.insert(1, nn.Conv2d(16, 16, 3, padding=1))  # neither a norm nor a step without parameters
    with pytest.raises(SiteError, match="found no hidden width"):
        tunecomp_fx.prepare(model, torch.randn(4, 16, 8, 8), 0.5, prune_neurons=0.5)


def test_an_excluded_convolution_of_a_squeeze_excitation_leaves_the_width_around_it() -> None:
    block, _, convolutions, _ = _block_with_squeeze_excitation("timm")
    # nor is the bottleneck's own width pruned: its up site is the excluded one
    with pytest.raises(SiteError, match=r"found no hidden width.*squeeze-excitation.*`exclude` leaves every layer"):
        tunecomp_fx.prepare(block, torch.randn(4, 16, 8, 8), 0.5, prune_neurons=0.5, exclude=(convolutions[0],))


class _Checked(nn.Module):
    """`block` behind a check of the input's channels (in `dim`): symbolic tracing cannot evaluate it, torch.export captures it."""

    def __init__(self, block: nn.Module, channels: int, dim: int = 1) -> None:
        super().__init__()
        self.block, self.channels, self.dim = block, channels, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[self.dim] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {x.shape[self.dim]}")
        return self.block(x)


@pytest.mark.parametrize("checked", [False, True], ids=["traced", "exported"])
def test_hugging_faces_efficientnet_block_prunes_through_its_padding_depthwise_convolution_and_gates(checked: bool, tmp_path) -> None:  # noqa: ANN001
    from transformers import EfficientNetConfig
    from transformers.models.efficientnet.modeling_efficientnet import EfficientNetBlock

    torch.manual_seed(0)
    block = EfficientNetBlock(EfficientNetConfig(), 16, 24, 2, 6, 3, 0.0, True, True).eval()  # stride 2: ZeroPad2d first
    with torch.no_grad():
        for norm in (block.expansion.expand_bn, block.depthwise_conv.depthwise_norm):
            norm.weight.normal_(), norm.bias.normal_(), norm.running_mean.normal_()
        block.projection.project_conv.weight[:, 1::2] = 0.0
        block.squeeze_excite.reduce.weight[:, 1::2] = 0.0
    model, x = (_Checked(block, 16) if checked else block).eval(), torch.randn(4, 16, 8, 8)
    prepared = tunecomp_fx.prepare(model, x, 0.5, prune_neurons=0.5, rank_slack=10.0)
    assert prepared.meta["tunecomp"].capture_path == ("torch.export" if checked else "symbolic_trace")
    [width] = _context(prepared).hidden_widths
    assert (len(width.channelwise), len(width.squeezes), width.kept) == (3, 1, tuple(range(0, 96, 2)))
    # the gates' convolutions (padding="same") are sites sliced with the width
    assert [site.name.rsplit(".", 2)[-2:] for site in _context(prepared).sites if site.status == "in_width"] == [["squeeze_excite", "reduce"], ["squeeze_excite", "expand"]]
    nodes = {node.name: node for node in prepared.graph.nodes}
    padding = nodes[width.between[2]]  # ZeroPad2d, or aten's padding under torch.export
    assert padding.target in (aten.constant_pad_nd.default, aten.pad.default) if checked else isinstance(prepared.get_submodule(padding.target), nn.ZeroPad2d)
    # the depthwise convolution: torch.conv2d on the weight when traced (its nn.Conv2d subclass is entered), aten.conv2d exported
    depthwise = next(n for n in prepared.graph.nodes if n.meta.get("tunecomp", {}).get("copy_of") == width.channelwise[1])
    assert depthwise.target in (torch.conv2d, aten.conv2d.default, aten.conv2d.padding) and depthwise.args[6] == 48
    assert depthwise.args[1].target.startswith("lowrank.") and depthwise.args[1].target.endswith(f".channels_{width.channelwise[1]}.arg1")
    full_rank_student_path_finalizes(prepared, model, x, tmp_path / "hf_efficientnet_block.onnx")


class _RowNormedMlp(nn.Module):
    """LeViT's MLP: each linear layer's output normalized by a BatchNorm1d over the tokens flattened to
    rows, `bn(x.flatten(0, 1)).reshape_as(x)`."""

    def __init__(self, dim: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.bn = nn.BatchNorm1d(hidden)
        nn.init.normal_(self.bn.weight), nn.init.normal_(self.bn.bias), self.bn.running_mean.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return x + self.fc2(F.hardswish(self.bn(h.flatten(0, 1)).reshape_as(h)))


@pytest.mark.parametrize("checked", [False, True], ids=["traced", "exported"])
def test_a_batch_norm_of_tokens_flattened_to_rows_is_copied_with_the_kept_neurons(checked: bool, tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    mlp, x = _RowNormedMlp().eval(), torch.randn(2, 9, 16)
    with torch.no_grad():
        mlp.fc2.weight[:, 1::2] = 0.0
    # exported (as Hugging Face's LeViT is): aten.flatten, aten.batch_norm and aten.reshape_as
    model, prefix = (_Checked(mlp, 16, dim=-1).eval(), "block.") if checked else (mlp, "")
    prepared = tunecomp_fx.prepare(model, x, 0.5, prune_neurons=0.5, rank_slack=10.0)
    assert prepared.meta["tunecomp"].capture_path == ("torch.export" if checked else "symbolic_trace")
    [width] = _context(prepared).hidden_widths
    assert (width.ups, width.down, len(width.channelwise), width.kept) == ((f"{prefix}fc1",), f"{prefix}fc2", 1, tuple(range(0, 64, 2)))
    copies = {n.meta["tunecomp"]["copy_of"]: n for n in prepared.graph.nodes if "copy_of" in n.meta.get("tunecomp", {})}
    norm = copies[width.channelwise[0]]
    running_mean = prepared.get_submodule(norm.target).running_mean if norm.op == "call_module" else prepared.get_buffer(norm.args[3].target)
    assert torch.equal(running_mean, mlp.bn.running_mean[0::2])  # the kept neurons' statistics
    # the copy's reshape_as reads the up site's student, not the teacher
    assert copies["reshape_as"].args[1].target == f"lowrank.{prefix.replace('.', '_')}fc1.up"
    compact = full_rank_student_path_finalizes(prepared, model, x, tmp_path / "row_normed_mlp.onnx")
    assert not [name for name, _ in compact.named_buffers() if name.startswith(f"{prefix}bn.")]  # the teacher's went with it


def test_hugging_faces_levit_prunes_each_mlp_through_its_row_batch_norms(tmp_path) -> None:  # noqa: ANN001
    transformers = pytest.importorskip("transformers")
    config = transformers.LevitConfig(
        image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2], depths=[1, 1, 1], key_dim=[8, 8, 8], mlp_ratio=[2, 2, 2], attention_ratio=[2, 2, 2],
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LevitModel(config).eval()
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm1d)):
        nn.init.normal_(norm.weight), nn.init.normal_(norm.bias), norm.running_mean.normal_()
    inputs = {"pixel_values": torch.randn(2, 3, 64, 64)}
    prepared = tunecomp_fx.prepare(model, inputs, 0.5, prune_neurons=0.5, rank_slack=10.0)
    assert prepared.meta["tunecomp"].capture_path == "torch.export"
    widths = _context(prepared).hidden_widths
    # every MLP: the three stages' and the two subsampling blocks', each up -> batch norm -> hardswish -> down
    assert len(widths) == 5 and all(width.down.endswith("linear_down.linear") and len(width.channelwise) == 1 for width in widths)
    hugging_face_prunes_exactly(prepared, model, inputs, tmp_path / "levit.onnx")


def test_a_flatten_that_leaves_the_width_out_of_the_rows_leaves_no_width() -> None:
    # (batch, height, width of image, neurons) flattened to (batch * height, 8, 8): the batch norm
    # normalizes dim 1, the image's width, which only has the neurons' count; seen on the inputs
    torch.manual_seed(0)
    model = _RowNormedMlp(dim=4, hidden=8).eval()
    with pytest.raises(SiteError, match="found no hidden width"):
        tunecomp_fx.prepare(model, torch.randn(2, 3, 8, 4), 0.5, prune_neurons=0.5)
    assert tunecomp_fx.prepare(model, torch.randn(2, 3, 4), 0.5, prune_neurons=0.5) is not None  # rows of neurons


def test_a_depthwise_convolution_over_tokens_viewed_as_an_image_is_pruned_with_the_width(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model, x = TokenConvMlp().eval(), torch.randn(2, 16, 16)
    with torch.no_grad():
        model.fc2.weight[:, 1::2] = 0.0  # the odd neurons change nothing
    # students at full rank: the student path is the model with the pruned neurons alone taken out
    prepared = tunecomp_fx.prepare(model, x, 0.5, prune_neurons=0.5, rank_slack=10.0)
    [width] = _context(prepared).hidden_widths
    assert (width.ups, width.down, width.channelwise, width.kept) == (("fc1",), "fc2", ("dwconv",), tuple(range(0, 64, 2)))
    copies = {n.meta["tunecomp"]["copy_of"]: n for n in prepared.graph.nodes if "copy_of" in n.meta.get("tunecomp", {})}
    assert copies["getattr_1"].args[0].name == "lowrank_fc1_up"  # the view's sizes read from the students' width
    tunecomp_fx.set_blend(prepared, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-5)
    tunecomp_fx.prune_slack(prepared)
    compact = tunecomp_fx.finalize(prepared)
    assert not {"fc1", "dwconv"} & {name for name, _ in compact.named_children()}  # the teacher's went, sizes and all
    result = to_onnx(compact, (x,), tmp_path / "token_conv_mlp.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


def test_segformers_mix_ffn_prunes_its_depthwise_convolution_under_torch_export(tmp_path) -> None:  # noqa: ANN001
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2],
        num_attention_heads=[1, 2], mlp_ratios=[4, 4], decoder_hidden_size=32,
    )  # fmt: skip
    model, x = transformers.SegformerModel(config).eval(), torch.randn(2, 3, 32, 32)
    for module in model.modules():  # weights that make the pruned neurons worth checking (it starts them at std 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.5)
    prepared = tunecomp_fx.prepare(model, x, 0.5, prune_neurons=0.5, rank_slack=10.0)
    assert prepared.meta["tunecomp"].capture_path == "torch.export"
    widths = _context(prepared).hidden_widths
    # the view to an image names the width (entry 1, scaled); the depthwise convolution is an aten call
    assert [(len(w.channelwise), [index for _, index in w.resized], len(w.kept)) for w in widths] == [(1, [1], 32), (1, [1], 64)]
    tunecomp_fx.set_blend(prepared, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x)[0], silenced(model, widths)(x)[0], rtol=1e-5, atol=1e-5)
        assert (prepared(x)[0] - model(x)[0]).abs().max() > 1e-2  # the neurons pruned did matter
    tunecomp_fx.prune_slack(prepared)
    result = to_onnx(tunecomp_fx.finalize(prepared), (x,), tmp_path / "segformer.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


def test_a_size_of_the_width_read_outside_the_ffn_leaves_no_width() -> None:
    with pytest.raises(SiteError, match="found no hidden width to prune"):
        tunecomp_fx.prepare(TokenConvMlp(size_read_outside=True).eval(), torch.randn(2, 16, 16), 0.5, prune_neurons=0.5)


def test_a_convolution_mixing_the_channels_leaves_no_width() -> None:
    with pytest.raises(SiteError, match="found no hidden width to prune"):
        tunecomp_fx.prepare(InvertedResidual(groups=1).eval(), torch.randn(2, 16, 8, 8), 0.5, prune_neurons=0.5)


def test_a_model_without_hidden_widths_says_so() -> None:
    # MLP's ReLU output also feeds a residual add: slicing it would change the add
    with pytest.raises(SiteError, match="found no hidden width to prune.*prune_neurons=0"):
        tunecomp_fx.prepare(MLP(), torch.randn(8, 64), 0.5, prune_neurons=0.3)


def test_an_excluded_down_site_leaves_no_width() -> None:
    with pytest.raises(SiteError, match="found no hidden width"):
        tunecomp_fx.prepare(half_dead(), torch.randn(8, 8), 0.3, prune_neurons=0.3, exclude=("2",))


def test_pruning_past_the_ratio_is_a_budget_error() -> None:
    with pytest.raises(BudgetError, match=r"pruning alone \(prune_neurons=0.5, prune_heads=0.0\) removes 0.481 of .* more than ratio=0.3"):
        tunecomp_fx.prepare(half_dead(), torch.randn(8, 8), 0.3, prune_neurons=0.5)


def test_without_pruning_the_graph_has_no_hidden_copy() -> None:
    prepared = tunecomp_fx.prepare(half_dead(), torch.randn(8, 8), 0.3)
    assert _context(prepared).hidden_widths == []
    assert all("blend" in roles for roles in student_nodes(prepared).values())
    assert not any(n.meta.get("tunecomp", {}).get("role") == "hidden" for n in prepared.graph.nodes)
    assert operator.mul in {n.target for n in prepared.graph.nodes}  # rank masks as before
