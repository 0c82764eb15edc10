"""Head pruning (prune_heads): an attention block's query, key, value (or fused qkv) and output sites
are found around scaled_dot_product_attention, its least important heads are sliced away, and the
block gets one student path (its own copy of the split, attention and merge) blended at the output
site."""

from __future__ import annotations

import functools
import operator

import pytest
import torch
import torch.nn.functional as F
from tests.graph_checks import finalize_from_student_path, full_rank_student_path_finalizes, hugging_face_prunes_exactly, silenced, tiny_hugging_face, train_with_hook
from tests.models import (
    SILENT_HEADS_KEPT,
    SILENT_HEADS_RATIO,
    AttentionBlock,
    CrossAttention,
    FusedHeadsBlock,
    GroupedQueryAttention,
    HeadsBlock,
    MultiheadSelfAttention,
    NormedHeadsBlock,
    RotaryHeadsBlock,
    silent_heads,
)
from torch import nn

import tunecomp_fx
from tunecomp_fx import head_widths
from tunecomp_fx.errors import BudgetError, PassError, SiteError
from tunecomp_fx.export import to_onnx
from tunecomp_fx.metrics import count_parameters
from tunecomp_fx.graph_nodes import MAX_END, rescale_shape_entry, shape_entries
from tunecomp_fx.sites import Blend, HiddenWidth, Site, final_sites, student_nodes

aten = torch.ops.aten
ATTENTION = (F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default)


def _context(prepared: torch.fx.GraphModule):  # noqa: ANN202
    return prepared.meta["tunecomp"].context


def _student_attention(prepared: torch.fx.GraphModule) -> torch.fx.Node:
    [copy] = [n for n in prepared.graph.nodes if n.target in ATTENTION and n.meta.get("tunecomp", {}).get("role") == "hidden"]
    return copy


def _source(node: torch.fx.Node) -> torch.fx.Node:
    """Back through the head split (views, transposes, a fused site's parts, identities) to the student it reads."""
    while node.meta.get("tunecomp", {}).get("role") != "up":
        node = node.args[0]
    return node


@pytest.mark.parametrize("literal_heads", [True, False], ids=["symbolic_trace", "torch_export"])
def test_the_block_gets_one_student_path_through_its_own_attention(literal_heads: bool) -> None:
    torch.manual_seed(0)
    model, x = HeadsBlock(literal_heads=literal_heads).eval(), torch.randn(4, 10, 64)
    prepared = tunecomp_fx.prepare(model, x, 0.5, prune_heads=0.5)

    assert prepared.meta["tunecomp"].capture_path == ("symbolic_trace" if literal_heads else "torch.export")
    [width] = _context(prepared).hidden_widths
    assert (width.kind, width.ups, width.down, width.width, width.group) == ("heads", ("query", "key", "value"), "out", 64, 16)
    assert len(width.kept) == 32 and all(len(set(width.kept[i : i + 16])) == 16 for i in (0, 16))
    # a literal head count (and width) in the views is rescaled in the copy; an inferred one (-1) needs nothing
    assert len(width.resized) == (4 if literal_heads else 0)
    roles = student_nodes(prepared)
    assert all("blend" not in roles[key] for key in ("query", "key", "value")) and "blend" in roles["out"]
    attention = _student_attention(prepared)
    assert [_source(argument) for argument in attention.args[:3]] == [roles[key]["up"] for key in ("query", "key", "value")]
    teacher_attention = [n for n in prepared.graph.nodes if n.target in ATTENTION and n is not attention]
    assert len(teacher_attention) == 1  # the teacher path keeps every head until the blend drops it
    assert prepared.lowrank.query.up.out_features == 32 and prepared.lowrank.out.down.in_features == 32
    with torch.no_grad():
        assert torch.equal(prepared(x), model(x))  # alpha = 1: the teacher alone


@pytest.mark.parametrize("literal_heads", [True, False], ids=["symbolic_trace", "torch_export"])
def test_finalize_keeps_the_student_path_with_fewer_heads(literal_heads: bool) -> None:
    torch.manual_seed(0)
    model, x = HeadsBlock(literal_heads=literal_heads).eval(), torch.randn(4, 10, 64)
    mask = torch.rand(4, 1, 10, 10) > 0.2  # one mask for every head
    prepared = tunecomp_fx.prepare(model, (x, mask), 0.6, prune_heads=0.5)
    compact, student_path = finalize_from_student_path(prepared, x, mask)
    with torch.no_grad():
        torch.testing.assert_close(compact(x[:2], mask[:2]), student_path[:2], rtol=1e-5, atol=1e-5)  # another batch size
    assert len([n for n in compact.graph.nodes if n.target in ATTENTION]) == 1
    assert not {"query.weight", "key.weight", "value.weight", "out.weight"} & {name for name, _ in compact.named_parameters()}
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["query"].reason.startswith("32 of 64 output neurons kept (2 of 4 heads)")
    assert rows["out"].reason.startswith("32 of 64 input neurons kept (2 of 4 heads)")
    kept = sum(row.params_after for row in rows.values()) / sum(row.params_before for row in rows.values())
    assert 0.37 <= kept <= 0.4
    assert sum(row.params_after for row in rows.values()) == count_parameters(compact.lowrank)


MATMULS = (torch.matmul, operator.matmul, aten.matmul.default)
SOFTMAXES = ("softmax", aten.softmax.int)


@pytest.mark.parametrize("literal_heads", [True, False], ids=["symbolic_trace", "torch_export"])
def test_written_out_attention_is_copied_into_the_student_path_and_finalized_with_fewer_heads(literal_heads: bool) -> None:
    torch.manual_seed(0)
    model, x = HeadsBlock(literal_heads=literal_heads, written_out=True).eval(), torch.randn(4, 10, 64)
    mask = torch.rand(4, 1, 10, 10) > 0.2  # one mask for every head, filled into the scores
    prepared = tunecomp_fx.prepare(model, (x, mask), 0.6, prune_heads=0.5)
    [width] = _context(prepared).hidden_widths
    assert (width.kind, width.ups, width.down, width.width, width.group, len(width.kept)) == ("heads", ("query", "key", "value"), "out", 64, 16, 32)
    copies = [n for n in prepared.graph.nodes if n.meta.get("tunecomp", {}).get("role") == "hidden" and "copy_of" in n.meta["tunecomp"]]
    # the student path has its own scores and context matmuls, scale, mask fill, softmax and dropout
    assert sum(n.target in MATMULS for n in copies) == 2 and sum(n.target in SOFTMAXES for n in copies) == 1
    [fill] = [n for n in copies if "masked_fill" in str(n.target)]
    assert fill.args[1].meta.get("tunecomp") is None  # the mask itself is shared with the teacher path
    with torch.no_grad():
        assert torch.equal(prepared(x, mask), model(x, mask))  # alpha = 1: the teacher alone
    compact, student_path = finalize_from_student_path(prepared, x, mask)
    with torch.no_grad():
        torch.testing.assert_close(compact(x[:2], mask[:2]), student_path[:2], rtol=1e-5, atol=1e-5)  # another batch size
    assert sum(n.target in MATMULS for n in compact.graph.nodes) == 2  # the teacher's attention is gone
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["key"].reason.startswith("32 of 64 output neurons kept (2 of 4 heads)")
    assert rows["out"].reason.startswith("32 of 64 input neurons kept (2 of 4 heads)")


def _hugging_face(name: str, attention: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A small BERT (with a padding mask), GPT-2 or LLaMA (grouped-query) with the given attention implementation."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    inputs = {"input_ids": torch.randint(0, 100, (2, 12))}
    if name == "bert":
        config = transformers.BertConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=100,
            max_position_embeddings=32, attn_implementation=attention,
        )  # fmt: skip
        inputs["attention_mask"] = torch.tensor([[1] * 12, [1] * 8 + [0] * 4])
        return transformers.BertModel(config).eval(), inputs
    if name == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32, use_cache=False, attn_implementation=attention)
        return transformers.GPT2Model(config).eval(), inputs
    model, inputs = _llama(key_value_heads=2, attention=attention)
    return model, inputs


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_eager_attention_prunes_the_heads_sdpa_attention_would_and_exports(name: str, tmp_path) -> None:  # noqa: ANN001
    # Hugging Face's eager attention: matmul, scale, additive mask, softmax (LLaMA: in float32, cast
    # back, which torch.export checks with an assertion), dropout, matmul; LLaMA repeats its key/value heads.
    kept, compact_params = {}, {}
    for attention in ("sdpa", "eager"):
        model, inputs = _hugging_face(name, attention)
        prepared = tunecomp_fx.prepare(model, inputs, 0.5, prune_heads=0.5)
        kept[attention] = {(w.ups, w.down): w.kept for w in _context(prepared).hidden_widths}
        with torch.no_grad():
            torch.testing.assert_close(prepared(**inputs)[0], model(**inputs)[0], rtol=1e-5, atol=1e-5)  # alpha = 1: the teacher alone
        compact, _ = finalize_from_student_path(prepared, **inputs)
        compact_params[attention] = count_parameters(compact)
    assert len(kept["eager"]) == 2 and kept["eager"] == kept["sdpa"]  # the same weights: the same heads
    assert compact_params["eager"] == compact_params["sdpa"]  # no teacher left behind
    assert sum(n.target is aten.softmax.int for n in compact.graph.nodes) == 2  # one attention per layer
    other = {key: value[:, :9].repeat(2, 1)[:3] for key, value in inputs.items()}  # another batch and length
    result = to_onnx(compact, other, tmp_path / f"{name}.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


class _ScoresScaledByTheirQuery(HeadsBlock):
    """Written-out attention whose scores are scaled by a number computed from the queries: pruned
    heads would change it, so the heads are not recognized."""

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        scores = torch.matmul(q, k.transpose(-2, -1)) / q.detach().abs().mean()
        return torch.matmul(scores.softmax(dim=-1), v)


def test_written_out_scores_scaled_by_something_computed_from_the_heads_are_not_recognized() -> None:
    with pytest.raises(SiteError, match="found no attention heads to prune"):
        tunecomp_fx.prepare(_ScoresScaledByTheirQuery().eval(), torch.randn(4, 10, 64), 0.5, prune_heads=0.5)


@pytest.mark.parametrize(("fused", "written_out"), [(False, False), (True, False), (False, True)], ids=["separate", "fused_qkv", "written_out"])
def test_the_silent_heads_are_the_ones_pruned_and_the_model_is_unchanged(fused: bool, written_out: bool) -> None:
    model, x = silent_heads(fused, written_out), torch.randn(8, 10, 64)
    prepared = tunecomp_fx.prepare(model, x, SILENT_HEADS_RATIO, prune_heads=0.5)  # the sites stay whole
    [width] = _context(prepared).hidden_widths
    assert width.kept == (*range(0, 16), *range(32, 48))
    if fused:  # the same heads in each of query, key and value
        assert _context(prepared).sites[0].kept_rows == tuple(part * 64 + neuron for part in range(3) for neuron in width.kept)
    tunecomp_fx.set_blend(prepared, 0.0)
    compact = tunecomp_fx.finalize(prepared)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), rtol=1e-5, atol=1e-5)
    assert count_parameters(compact) == SILENT_HEADS_KEPT + (0 if fused else 2 * 64)  # and HeadsBlock's layer norm


def test_heads_train_through_teacher_removal_and_export_to_onnx(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = nn.Sequential(HeadsBlock(literal_heads=False), nn.Linear(64, 3)).train()
    data = [(torch.randn(8, 10, 64), torch.randint(0, 3, (8, 10))) for _ in range(4)]
    prepared = tunecomp_fx.prepare(model, data[0][0], 0.5, calib=[x for x, _ in data], prune_heads=0.25, rank_slack=0.25)
    hook = train_with_hook(prepared, data, lambda logits, targets: F.cross_entropy(logits.flatten(0, 1), targets.flatten()), 8, 4)
    assert hook.teacher_removed
    assert not any(isinstance(m, Blend) for m in prepared.modules())
    assert len([n for n in prepared.graph.nodes if n.target in ATTENTION]) == 1  # the teacher heads are gone
    compact = tunecomp_fx.finalize(prepared).eval()
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert "48 of 64 output neurons kept" in rows["0.query"].reason
    result = to_onnx(compact, (data[0][0],), tmp_path / "heads.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


def test_heads_and_neurons_prune_together() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(HeadsBlock(), nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).eval()
    x = torch.randn(4, 10, 64)
    prepared = tunecomp_fx.prepare(model, x, 0.6, prune_heads=0.5, prune_neurons=0.5)
    assert sorted(width.kind for width in _context(prepared).hidden_widths) == ["heads", "neurons"]
    finalize_from_student_path(prepared, x)


@pytest.mark.parametrize(
    ("unbind", "export", "infer_head_dim"),
    [(True, False, False), (False, False, False), (True, True, False), (True, False, True)],
    ids=["unbind", "unpacked", "torch_export", "inferred_head_dim"],
)
def test_a_fused_qkv_site_loses_the_pruned_heads_rows_in_each_part(unbind: bool, export: bool, infer_head_dim: bool) -> None:
    torch.manual_seed(0)
    model, x = FusedHeadsBlock(unbind=unbind, export=export, infer_head_dim=infer_head_dim).eval(), torch.randn(4, 10, 64)
    prepared = tunecomp_fx.prepare(model, x, 0.5, prune_heads=0.5)

    assert prepared.meta["tunecomp"].capture_path == ("torch.export" if export else "symbolic_trace")
    [width] = _context(prepared).hidden_widths
    assert (width.kind, width.ups, width.down, width.width, width.group, width.parts) == ("heads", ("qkv",), "out", 64, 16, (3,))
    assert len(width.kept) == 32 and len(width.resized) == 2  # the literal head count of the split and the merged width
    roles = student_nodes(prepared)
    assert "blend" not in roles["qkv"] and "blend" in roles["out"]
    assert prepared.lowrank.qkv.up.out_features == 96 and prepared.lowrank.out.down.in_features == 32
    attention = _student_attention(prepared)
    assert {_source(argument) for argument in attention.args[:3]} == {roles["qkv"]["up"]}  # all three parts of one student
    with torch.no_grad():
        assert torch.equal(prepared(x), model(x))  # alpha = 1: the teacher alone
    compact, _ = finalize_from_student_path(prepared, x)
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["qkv"].reason.startswith("96 of 192 output neurons kept (2 of 4 heads)")
    assert rows["out"].reason.startswith("32 of 64 input neurons kept (2 of 4 heads)")


@pytest.mark.parametrize("literal_heads", [True, False], ids=["symbolic_trace", "torch_export"])
@pytest.mark.parametrize("written_out", [False, True], ids=["attention_call", "written_out"])
def test_a_mask_with_one_entry_per_head_is_read_sliced_to_the_kept_heads(literal_heads: bool, written_out: bool) -> None:
    torch.manual_seed(0)
    model = HeadsBlock(literal_heads=literal_heads, written_out=written_out).eval()
    x, per_head = torch.randn(2, 10, 64), torch.rand(2, 4, 10, 10) > 0.2
    prepared = tunecomp_fx.prepare(model, (x, per_head), 0.6, prune_heads=0.5)
    [width] = _context(prepared).hidden_widths
    # the written-out scores are filled where ~mask holds: the node computing it, named by each capture
    mask = "mask" if not written_out else "invert" if literal_heads else "bitwise_not"
    assert [tensor for _, tensor in width.per_head_reads] == [mask]
    assert prepared.lowrank.out.kept_heads.tolist() == width.heads_of(width.kept) and len(width.heads_of(width.kept)) == 2
    [sliced] = [n for n in prepared.graph.nodes if n.target is torch.index_select]
    assert (sliced.args[0].name, sliced.args[1]) == (mask, -3)  # the teacher path reads the whole mask
    assert not any("observer" in node.name for node in prepared.graph.nodes)
    with torch.no_grad():
        assert torch.equal(prepared(x, per_head), model(x, per_head))  # alpha = 1: the teacher alone
    compact, student_path = finalize_from_student_path(prepared, x, per_head)
    with torch.no_grad():
        torch.testing.assert_close(compact(x[:1], per_head[:1]), student_path[:1], rtol=1e-5, atol=1e-5)  # another batch size


@pytest.mark.parametrize("written_out", [False, True], ids=["attention_call", "written_out"])
def test_silent_heads_under_a_mask_per_head_are_pruned_and_the_model_is_unchanged(written_out: bool) -> None:
    model, x, per_head = silent_heads(written_out=written_out), torch.randn(8, 10, 64), torch.rand(8, 4, 10, 10) > 0.2
    prepared = tunecomp_fx.prepare(model, (x, per_head), SILENT_HEADS_RATIO, prune_heads=0.5)
    tunecomp_fx.set_blend(prepared, 0.0)
    compact = tunecomp_fx.finalize(prepared)
    assert compact.lowrank.out.kept_heads.tolist() == [0, 2]  # the mask's entries of the heads that speak
    with torch.no_grad():
        torch.testing.assert_close(compact(x, per_head), model(x, per_head), rtol=1e-5, atol=1e-5)


def test_a_mask_per_head_follows_the_heads_pruned_during_training() -> None:
    # width_slack=1: all four heads start in the student path; the blend leaves two, and the mask's with them
    torch.manual_seed(0)
    model = HeadsBlock(literal_heads=False, written_out=True).train()
    batches = [(torch.randn(4, 10, 64), torch.rand(4, 4, 10, 10) > 0.2, torch.randn(4, 10, 64)) for _ in range(3)]
    prepared = tunecomp_fx.prepare(model, batches[0][:2], 0.6, prune_heads=0.5, width_slack=1.0, rank_slack=0.25)
    assert prepared.lowrank.out.kept_heads.tolist() == [0, 1, 2, 3]
    hook = tunecomp_fx.StepHook(prepared, steps=6, blend_steps=3)
    optimizer = torch.optim.AdamW([p for p in prepared.parameters() if p.requires_grad], lr=1e-3)
    for step in range(6):
        x, mask, target = batches[step % 3]
        (F.mse_loss(prepared(x, mask), target) + hook.distill_loss()).backward()
        optimizer.step()
        optimizer.zero_grad()
        hook.step()
    prepared.eval()
    x, mask, _ = batches[0]
    with torch.no_grad():
        trained = prepared(x, mask)
    compact = tunecomp_fx.finalize(prepared)
    assert len(compact.lowrank.out.kept_heads) == 2
    with torch.no_grad():
        torch.testing.assert_close(compact(x, mask), trained, rtol=1e-5, atol=1e-5)


def _small_swin() -> nn.Module:
    """torchvision's Swin with two stages of two blocks on 32 x 32 images: written-out window attention
    with a per-head relative position bias, and in the first stage's second block shifted windows,
    whose mask is added to the scores viewed as (batch, windows, heads, tokens, tokens)."""
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=10)
    for name, parameter in model.named_parameters():  # torchvision starts these near zero: outputs and biases worth checking
        if name == "head.weight" or "relative_position_bias_table" in name:
            nn.init.normal_(parameter, std=0.02 if name == "head.weight" else 1.0)
    return model.eval()


def _assert_pruned_heads_alone_are_gone(pruned: nn.Module, model: nn.Module, widths: list, x: torch.Tensor) -> None:
    """`pruned` (a student path at full rank, or its compact model) computes `silenced` and not `model`."""
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), silenced(model, widths)(x), rtol=1e-5, atol=1e-5)
        assert (pruned(x) - model(x)).abs().max() > 1e-3  # the heads pruned did matter


def test_swin_slices_its_relative_position_bias_to_the_kept_heads_through_shifted_windows(tmp_path) -> None:  # noqa: ANN001
    model, x = _small_swin(), torch.randn(2, 3, 32, 32)
    attention = [m for name, m in model.named_modules() if name.endswith(".attn")]
    # prune half the heads of the attention sites alone, the ratio exactly what that removes: every rank stays full
    before = sum(a.qkv.weight.numel() + a.qkv.bias.numel() + a.proj.weight.numel() + a.proj.bias.numel() for a in attention)
    after = sum((a.qkv.weight.numel() + a.qkv.bias.numel() + a.proj.weight.numel()) // 2 + a.proj.bias.numel() for a in attention)
    prepared = tunecomp_fx.prepare(model, x, 1 - after / before, prune_heads=0.5, exclude=("*mlp*", "*reduction", "head"))
    widths = _context(prepared).hidden_widths
    assert [(w.down, len(w.per_head_reads)) for w in widths] == [(f"features.{i}.{j}.attn.proj", 1) for i in (1, 3) for j in (0, 1)]
    shifted = widths[1]  # its views of the scores name the head count: rescaled in the student path
    assert len(shifted.resized) == len(widths[0].resized) + 2
    with torch.no_grad():
        assert torch.equal(prepared(x), model(x))  # alpha = 1: the teacher alone
    tunecomp_fx.set_blend(prepared, 0.0)
    compact = tunecomp_fx.finalize(prepared)
    _assert_pruned_heads_alone_are_gone(compact, model, widths, x)
    result = to_onnx(compact, (x,), tmp_path / "swin.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


@pytest.mark.parametrize("head_first", [True, False], ids=["heads-then-parts", "parts-then-heads"])
def test_maxvit_prunes_heads_of_both_qkv_layouts(head_first: bool, tmp_path) -> None:  # noqa: ANN001
    pytest.importorskip("timm")
    from timm.layers import RelPosBiasTf
    from timm.models.maxxvit import AttentionCl

    torch.manual_seed(0)
    # head_first: qkv(x).view(B, -1, heads, 3 * head_dim).transpose(1, 2).chunk(3, dim=3), each head's q, k,
    # v rows together; else qkv(x).reshape(B, -1, 3, heads, head_dim).transpose(1, 3).unbind(2) (maxvit_tiny_tf),
    # the q rows of every head, then k, then v. Merged by reshape(x.shape[:-1] + (-1,)); a relative position bias per head
    rel_pos = functools.partial(RelPosBiasTf, window_size=(4, 4))
    model = AttentionCl(64, dim_head=16, head_first=head_first, rel_pos_cls=rel_pos).eval()
    nn.init.normal_(model.rel_pos.relative_position_bias_table)
    x = torch.randn(2, 4, 4, 64)
    # the ratio exactly what pruning half the heads removes: every rank stays full
    before = model.qkv.weight.numel() + model.qkv.bias.numel() + model.proj.weight.numel() + model.proj.bias.numel()
    after = (model.qkv.weight.numel() + model.qkv.bias.numel() + model.proj.weight.numel()) // 2 + model.proj.bias.numel()
    prepared = tunecomp_fx.prepare(model, x, 1 - after / before, prune_heads=0.5)
    [width] = _context(prepared).hidden_widths
    assert (width.ups, width.parts, width.per_head_parts, len(width.per_head_reads)) == (("qkv",), (3,), ("qkv",) * head_first, 1)
    heads = width.heads_of(width.kept)
    if head_first:  # the kept heads' q, k and v rows
        rows = [row for head in heads for row in range(head * 48, head * 48 + 48)]
    else:
        rows = [part * 64 + row for part in range(3) for head in heads for row in range(head * 16, head * 16 + 16)]
    assert list(width.up_rows("qkv", width.kept, 64)) == rows
    with torch.no_grad():
        assert torch.equal(prepared(x), model(x))  # alpha = 1: the teacher alone
    tunecomp_fx.set_blend(prepared, 0.0)
    compact = tunecomp_fx.finalize(prepared)
    _assert_pruned_heads_alone_are_gone(compact, model, [width], x)
    result = to_onnx(compact, (x,), tmp_path / "maxvit_attention.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


@pytest.mark.parametrize(
    ("model_type", "options", "widths", "query", "reported"),
    [
        # x.view(x.size()[:-1] + (heads, head_dim)), the size read from the projection's output beside the split;
        # the merge's width read from the block's input; each stage's keys and values from its spatial reduction
        (
            "pvt_v2", {"hidden_sizes": [32, 64, 64, 64], "num_attention_heads": [2, 2, 4, 4], "depths": [1, 1, 1, 1], "mlp_ratios": [2, 2, 2, 2]},
            [(16, 32), (32, 64), (32, 64), (32, 64)], "encoder.layers.0.blocks.0.attention.query", "16 of 32 output neurons kept (1 of 2 heads)",
        ),
        # einsum("bhlk,bhtk->bhlt", q, k) and einsum("bhlt,bhtv->bhlv", p, v); query, key and value from convolutional
        # projections, the last stage's with a class token; its one-head stage keeps its head
        (
            "cvt", {"embed_dim": [32, 64, 64], "num_heads": [1, 2, 4], "depth": [1, 2, 3]},
            [(32, 32)] + [(32, 64)] * 5, "encoder.stages.1.layers.0.attention.attention.projection_query", "32 of 64 output neurons kept (1 of 2 heads)",
        ),
    ],
)  # fmt: skip
def test_hugging_face_vision_attentions_traced_prune_their_heads_exactly(tmp_path, model_type: str, options: dict, widths: list, query: str, reported: str) -> None:  # noqa: ANN001
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(model_type, **options)).eval()
    inputs = {"pixel_values": torch.randn(2, 3, 64, 64)}
    prepared = tunecomp_fx.prepare(model, inputs, 0.6, prune_heads=0.5, rank_slack=10.0)
    assert prepared.meta["tunecomp"].capture_path == "symbolic_trace"
    assert [(len(w.kept), w.width) for w in _context(prepared).hidden_widths] == widths
    compact = hugging_face_prunes_exactly(prepared, model, inputs, tmp_path / f"{model_type}.onnx")
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows[query].reason.startswith(reported)


def test_pvt_v2s_spatial_reduction_attention_prunes_the_heads_of_its_query_and_packed_key_value() -> None:
    pytest.importorskip("timm")
    from timm.models.pvt_v2 import Attention as SpatialReductionAttention

    class Block(nn.Module):  # the attention of a 4 x 4 feature map, keys and values from it at half the resolution
        def __init__(self) -> None:
            super().__init__()
            self.attn = SpatialReductionAttention(64, num_heads=4, sr_ratio=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, [4, 4])

    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 16, 64)
    # q(x).reshape(B, N, heads, -1).permute(0, 2, 1, 3); kv(x').reshape(B, -1, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    prepared = tunecomp_fx.prepare(model, x, 0.5, prune_heads=0.5, rank_slack=10.0)
    [width] = _context(prepared).hidden_widths
    assert (width.ups, width.down, width.parts, len(width.kept)) == (("attn.q", "attn.kv"), "attn.proj", (1, 2), 32)
    tunecomp_fx.set_blend(prepared, 0.0)
    _assert_pruned_heads_alone_are_gone(prepared, model, [width], x)


def test_a_shape_built_as_sizes_plus_literals_is_rescaled_in_a_sum_of_its_own() -> None:
    def split_heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.reshape(x.shape[:-1] + (8, 2)), x.shape[:-1] + (8, 2)  # the sum read twice

    traced = torch.fx.symbolic_trace(split_heads)
    [reshape] = [n for n in traced.graph.nodes if n.target == "reshape"]
    shared = reshape.args[1]
    assert shape_entries(reshape)[1:] == [8, 2]
    rescale_shape_entry(reshape, 1, 4, 8)  # 4 heads of 8 kept
    traced.recompile()
    assert shape_entries(reshape)[1:] == [4, 2] and reshape.args[1] is not shared and shared.args[1] == (8, 2)
    reshaped, size = traced(torch.randn(3, 8))
    assert (reshaped.shape, size) == ((3, 4, 2), (3, 8, 2))


def test_a_head_size_and_a_merge_read_from_the_shape_are_kept_and_inferred() -> None:
    # AttentionBlock splits with reshape(b, t, 3, heads, d // heads) and merges with reshape(b, t, d), d
    # read from the input's shape: the head size stays d // heads, the merged width is inferred (-1)
    torch.manual_seed(0)
    model, x = AttentionBlock().eval(), torch.randn(2, 8, 64)
    prepared = tunecomp_fx.prepare(model, x, 0.5, prune_heads=0.5)
    [width] = _context(prepared).hidden_widths
    assert (width.ups, width.down, width.group, dict(width.resized)) == (("qkv",), "proj", 16, {"reshape": 3, "reshape_1": 2})
    [merge] = [n for n in prepared.graph.nodes if n.meta.get("tunecomp", {}).get("copy_of") == "reshape_1"]
    assert shape_entries(merge)[-1] == -1
    with torch.no_grad():
        assert torch.equal(prepared(x), model(x))  # alpha = 1: the teacher alone
    compact, _ = finalize_from_student_path(prepared, x)
    with torch.no_grad():
        assert compact(torch.randn(3, 5, 64)).shape == (3, 5, 64)  # another batch and length


def test_an_inferred_merge_follows_the_heads_pruned_during_training() -> None:
    torch.manual_seed(0)
    data = [(torch.randn(4, 8, 64), torch.randn(4, 8, 64)) for _ in range(3)]
    options = {"prune_heads": 0.5, "width_slack": 1.0, "rank_slack": 0.25}
    prepared = tunecomp_fx.prepare(AttentionBlock().train(), data[0][0], 0.6, calib=[x for x, _ in data], **options)
    assert train_with_hook(prepared, data, F.mse_loss, 6, 3).teacher_removed
    prepared.eval()
    with torch.no_grad():
        trained = prepared(data[0][0])
    compact = tunecomp_fx.finalize(prepared)  # four heads in the student path, two left
    with torch.no_grad():
        torch.testing.assert_close(compact(data[0][0]), trained, rtol=1e-5, atol=1e-5)
    assert tunecomp_fx.get_report(compact).sites[1].reason.startswith("32 of 64 input neurons kept (2 of 4 heads)")


def test_beit_slices_its_relative_position_bias_and_infers_its_merged_width() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=2, embed_dim=64, num_heads=4)
    for name, parameter in model.named_parameters():  # timm starts these at zero or near it: outputs and biases worth checking
        if name == "head.weight" or "relative_position_bias_table" in name or name.endswith(("q_bias", "v_bias")):
            nn.init.normal_(parameter, std=0.5)
    model, x = model.eval(), torch.randn(2, 3, 32, 32)
    # students at full rank: the student path is the model with the pruned heads alone taken out
    prepared = tunecomp_fx.prepare(model, x, 0.5, prune_heads=0.5, rank_slack=10.0)
    widths = _context(prepared).hidden_widths
    assert [(w.ups, len(w.per_head_reads), len(w.kept)) for w in widths] == [((f"blocks.{i}.attn.qkv",), 1, 32) for i in range(2)]
    with torch.no_grad():
        assert torch.equal(prepared(x), model(x))  # alpha = 1: the teacher alone
    tunecomp_fx.set_blend(prepared, 0.0)
    _assert_pruned_heads_alone_are_gone(prepared, model, widths, x)


def test_an_excluded_projection_leaves_no_heads() -> None:
    with pytest.raises(SiteError, match="found no attention heads"):
        tunecomp_fx.prepare(HeadsBlock().eval(), torch.randn(2, 8, 64), 0.5, prune_heads=0.5, exclude=("value",))


def test_a_head_count_that_is_also_another_literal_size_is_left_alone() -> None:
    # 4 heads of 4: every reshape between attention and the merge would have to name the count
    class Square(HeadsBlock):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            q, k, v = (layer(x).view(b, t, 4, 4).transpose(1, 2) for layer in (self.query, self.key, self.value))
            context = F.scaled_dot_product_attention(q, k, v).reshape(b, 4, t, 4).transpose(1, 2)
            return self.out(context.reshape(b, t, 16))

    with pytest.raises(SiteError, match="found no attention heads"):
        tunecomp_fx.prepare(Square(dim=16, heads=4).eval(), torch.randn(2, 8, 16), 0.5, prune_heads=0.5)


def test_pruning_heads_past_the_ratio_is_a_budget_error() -> None:
    with pytest.raises(BudgetError, match=r"pruning alone \(prune_neurons=0.0, prune_heads=0.75\) removes 0.747 .* more than ratio=0.5"):
        tunecomp_fx.prepare(HeadsBlock().eval(), torch.randn(2, 8, 64), 0.5, prune_heads=0.75)


def _padding(batch: int) -> torch.Tensor:
    """A key padding mask hiding the last 3 of 10 keys of every other sequence."""
    mask = torch.zeros(batch, 10, dtype=torch.bool)
    mask[::2, 7:] = True
    return mask


@pytest.mark.parametrize(("batch_first", "padding"), [(True, False), (False, False), (True, True)], ids=["batch_first", "seq_first", "key_padding"])
def test_multihead_attention_loses_the_pruned_heads_rows_in_each_packed_part(batch_first: bool, padding: bool) -> None:
    torch.manual_seed(0)
    model = MultiheadSelfAttention(batch_first=batch_first).eval()
    x, other = (torch.randn(4, 10, 64), torch.randn(3, 10, 64)) if batch_first else (torch.randn(10, 4, 64), torch.randn(10, 3, 64))
    inputs, other_inputs = ((x, _padding(4)), (other, _padding(3))) if padding else ((x,), (other,))
    # a sequence-first input has its batch at dim 1 (dim 0 is taken for the batch unless told)
    prepared = tunecomp_fx.prepare(model, inputs, 0.5, prune_heads=0.5, dynamic_dims=None if batch_first else {0: {0: "seq", 1: "batch"}})

    assert prepared.meta["tunecomp"].capture_path == "torch.export"
    [width] = _context(prepared).hidden_widths
    assert (width.kind, width.ups, width.down, width.group, width.parts) == ("heads", ("attn.in_proj_weight",), "attn.out_proj", 16, (3,))
    # the student path's copy of the packing and the head split counts the 2 heads kept
    copies = [n for n in prepared.graph.nodes if "copy_of" in n.meta.get("tunecomp", {})]
    [unflatten] = [n for n in copies if n.target is aten.unflatten.int]
    assert list(unflatten.args[2]) == [3, 32]
    batch_major = [n for n in copies if n.target is aten.view.default and len(shape_entries(n)) == 4]  # (batch, heads, seq, head_dim)
    assert len(batch_major) == (4 if padding else 3) and all(shape_entries(n)[1] == 2 for n in batch_major)
    assert all(2 in n.args for n in copies if n.target is operator.mul)  # batch * heads, when the batch is dynamic
    with torch.no_grad():
        torch.testing.assert_close(prepared(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)  # alpha = 1: the teacher alone
    compact, _ = finalize_from_student_path(prepared, *inputs)
    with torch.no_grad():
        assert compact(*other_inputs).shape == other.shape  # another batch size: batch * heads scales with it
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["attn.in_proj_weight"].reason.startswith("96 of 192 output neurons kept (2 of 4 heads)")
    assert rows["attn.out_proj"].reason.startswith("32 of 64 input neurons kept (2 of 4 heads)")


def test_multihead_attention_silent_heads_are_pruned_and_the_model_is_unchanged(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model, x, padding = MultiheadSelfAttention().eval(), torch.randn(8, 10, 64), _padding(8)
    with torch.no_grad():
        model.attn.out_proj.weight.view(64, 4, 16)[:, [1, 3]] = 0.0  # heads 1 and 3 change nothing
    kept = 3 * (32 * 64 + 32) + (64 * 32 + 64)
    prepared = tunecomp_fx.prepare(model, (x, padding), 1 - kept / count_parameters(model), prune_heads=0.5)  # the sites stay whole
    assert _context(prepared).hidden_widths[0].kept == (*range(0, 16), *range(32, 48))
    tunecomp_fx.set_blend(prepared, 0.0)
    compact = tunecomp_fx.finalize(prepared)
    with torch.no_grad():
        torch.testing.assert_close(compact(x, padding), model(x, padding), rtol=1e-5, atol=1e-5)
    assert count_parameters(compact) == kept
    result = to_onnx(compact, (x, padding), tmp_path / "mha.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


# Two-block ViTs on 32x32 images, 10 classes: the prune_heads that keeps 2 heads of each block, the
# heads and their size, the FFN width and the neurons prune_neurons=0.3 keeps of it, block 1's sites.
VITS = {
    "timm": (0.34, 3, 64, 768, 536, {"qkv": "blocks.1.attn.qkv", "out": "blocks.1.attn.proj", "fc1": "blocks.1.mlp.fc1", "fc2": "blocks.1.mlp.fc2"}),
    "torchvision": (0.5, 4, 16, 128, 88, {
        key: f"encoder.layers.encoder_layer_1.{name}"
        for key, name in (("qkv", "self_attention.in_proj_weight"), ("out", "self_attention.out_proj"), ("fc1", "mlp.0"), ("fc2", "mlp.3"))
    }),
}  # fmt: skip


def _vit(library: str) -> nn.Module:
    """timm's (a fused qkv site) or torchvision's (nn.MultiheadAttention)."""
    if library == "timm":
        timm = pytest.importorskip("timm")
        return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=2)
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts it at zero: outputs worth checking
    return model


@pytest.mark.parametrize("library", list(VITS))
def test_a_vit_prunes_heads_and_neurons_while_training_and_exports(library: str, tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    prune_heads, heads, head_dim, hidden, kept_neurons, names = VITS[library]
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(3)]
    options = {"prune_heads": prune_heads, "prune_neurons": 0.3, "width_slack": 0.5, "rank_slack": 0.25}
    prepared = tunecomp_fx.prepare(_vit(library).train(), data[0][0], 0.6, calib=[x for x, _ in data], **options)
    assert {(w.kind, w.ups, len(w.kept), w.target) for w in _context(prepared).hidden_widths if names["out"] in w.sites or names["fc2"] in w.sites} == {
        ("heads", (names["qkv"],), 3 * head_dim, 2 * head_dim),  # 3 heads at first, 2 at the end
        ("neurons", (names["fc1"],), hidden, kept_neurons),  # timm's: through the Mlp's identity norm
    }  # fmt: skip
    assert train_with_hook(prepared, data, F.cross_entropy, 6, 3).teacher_removed
    prepared.eval()
    with torch.no_grad():
        trained = prepared(data[0][0])
    compact = tunecomp_fx.finalize(prepared)
    with torch.no_grad():
        torch.testing.assert_close(compact(data[0][0]), trained, rtol=1e-5, atol=1e-5)
    width, rows = heads * head_dim, {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows[names["qkv"]].reason.startswith(f"{6 * head_dim} of {3 * width} output neurons kept (2 of {heads} heads)")
    assert rows[names["out"]].reason.startswith(f"{2 * head_dim} of {width} input neurons kept (2 of {heads} heads)")
    assert rows[names["fc2"]].reason.startswith(f"{kept_neurons} of {hidden} input neurons kept")
    result = to_onnx(compact, (data[0][0],), tmp_path / "vit.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


def test_multihead_attention_with_its_in_projection_in_blocks_prunes_the_heads_of_each() -> None:
    # key != value: torch.export chunks in_proj_weight into query, key and value; fold_sliced_weights makes three sites
    torch.manual_seed(0)
    model, inputs = CrossAttention(chunked=True).eval(), (torch.randn(4, 10, 64), torch.randn(4, 10, 64))
    prepared = tunecomp_fx.prepare(model, inputs, 0.5, prune_heads=0.5)
    [width] = _context(prepared).hidden_widths
    assert (width.ups, width.down, width.parts) == (tuple(f"attn.in_proj_weight_{i}" for i in range(3)), "attn.out_proj", (1, 1, 1))
    roles = student_nodes(prepared)
    assert [_source(argument) for argument in _student_attention(prepared).args[:3]] == [roles[up.replace(".", "_")]["up"] for up in width.ups]
    compact, _ = finalize_from_student_path(prepared, *inputs)
    with torch.no_grad():
        assert compact(torch.randn(3, 10, 64), torch.randn(3, 10, 64)).shape == (3, 10, 64)  # batch * heads scales with the batch
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["attn.in_proj_weight_0"].reason.startswith("32 of 64 output neurons kept (2 of 4 heads)")


def test_gpt2_prunes_the_heads_of_its_split_qkv_and_the_neurons_of_its_written_out_gelu(tmp_path) -> None:  # noqa: ANN001
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32, use_cache=False)
    model, inputs = transformers.GPT2Model(config).eval(), {"input_ids": torch.randint(0, 100, (2, 12))}
    prepared = tunecomp_fx.prepare(model, inputs, 0.5, prune_heads=0.5, prune_neurons=0.3)
    widths = {width.down: width for width in _context(prepared).hidden_widths}
    assert {(w.kind, w.ups, w.parts, len(w.kept)) for name, w in widths.items() if name.startswith("h.1.")} == {
        ("heads", ("h.1.attn.c_attn",), (3,), 32),  # c_attn(x).split(64, dim=2): three blocks of 64 rows
        ("neurons", ("h.1.mlp.c_fc",), (), 176),  # through GELU's tanh approximation, written out
    }
    copies = [n for n in prepared.graph.nodes if "copy_of" in n.meta.get("tunecomp", {})]
    assert sorted(n.args[1] for n in copies if n.target is aten.split.Tensor) == [32, 32]  # each block keeps 2 heads
    with torch.no_grad():
        torch.testing.assert_close(prepared(**inputs)[0], model(**inputs)[0], rtol=1e-5, atol=1e-5)  # alpha = 1: the teacher alone
    compact, _ = finalize_from_student_path(prepared, **inputs)
    other = {"input_ids": torch.randint(0, 100, (3, 9))}
    with torch.no_grad():
        assert compact(**other)[0].shape == (3, 9, 64)  # another batch and length
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["h.0.attn.c_attn"].reason.startswith("96 of 192 output neurons kept (2 of 4 heads)")
    assert rows["h.0.mlp.c_proj"].reason.startswith("176 of 256 input neurons kept")
    result = to_onnx(compact, other, tmp_path / "gpt2.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


def _phi3(key_value_heads: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A 2-layer Phi-3: query, key and value sliced out of one qkv_proj, a partial rotary embedding read
    through an alias; `key_value_heads` of 4."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Phi3Config(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=key_value_heads,
        vocab_size=100, max_position_embeddings=32, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return transformers.Phi3Model(config).eval(), {"input_ids": torch.randint(0, 100, (2, 12))}


def test_phi3_prunes_the_heads_of_query_key_and_value_sliced_out_of_its_qkv_site(tmp_path) -> None:  # noqa: ANN001
    model, inputs = _phi3(key_value_heads=4)
    prepared = tunecomp_fx.prepare(model, inputs, 0.6, prune_heads=0.5, rank_slack=10.0)
    widths = _context(prepared).hidden_widths
    assert {(w.ups, w.down, w.parts, len(w.kept)) for w in widths} == {
        ((f"layers.{i}.self_attn.qkv_proj",), f"layers.{i}.self_attn.o_proj", (3,), 32) for i in range(2)  # qkv[..., :64] etc.
    }
    copies = [n for n in prepared.graph.nodes if "copy_of" in n.meta.get("tunecomp", {}) and n.target is aten.slice.Tensor and n.args[1] == 2]
    assert sorted(n.args[2:] for n in copies) == [(0, 32)] * 2 + [(32, 64)] * 2 + [(64, MAX_END)] * 2  # 2 heads each; the last to the end
    compact = hugging_face_prunes_exactly(prepared, model, inputs, tmp_path / "phi3.onnx")
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["layers.0.self_attn.qkv_proj"].reason.startswith("96 of 192 output neurons kept (2 of 4 heads)")


def test_opts_query_scaled_before_its_head_split_prunes_its_heads(tmp_path) -> None:  # noqa: ANN001
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64, vocab_size=100,
        max_position_embeddings=32, use_cache=False,
    )  # fmt: skip
    model, inputs = transformers.OPTModel(config).eval(), {"input_ids": torch.randint(0, 100, (2, 12))}
    prepared = tunecomp_fx.prepare(model, inputs, 0.6, prune_heads=0.5, rank_slack=10.0)
    layer = "decoder.layers.{}.self_attn.{}"
    assert {(w.ups, w.down, len(w.kept)) for w in _context(prepared).hidden_widths} == {
        (tuple(layer.format(i, name) for name in ("q_proj", "k_proj", "v_proj")), layer.format(i, "out_proj"), 32) for i in range(2)
    }
    scales = [n for n in prepared.graph.nodes if "copy_of" in n.meta.get("tunecomp", {}) and n.target is aten.mul.Tensor and n.args[1] == 0.25]
    assert [n.args[0].meta["tunecomp"]["site"] for n in scales] == [layer.format(i, "q_proj") for i in range(2)]  # q_proj(x) * scaling, copied
    hugging_face_prunes_exactly(prepared, model, inputs, tmp_path / "opt.onnx")


def test_gpt_neox_prunes_each_heads_query_key_and_value_through_its_partial_rotary_embedding(tmp_path) -> None:  # noqa: ANN001
    # view(b, t, -1, 3 * head_dim), transpose(1, 2), chunk(3, dim=-1); the rotary embedding on a quarter of head_dim
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=100,
        max_position_embeddings=32, use_cache=False,
    )  # fmt: skip
    model, inputs = transformers.GPTNeoXModel(config).eval(), {"input_ids": torch.randint(0, 100, (2, 12))}
    prepared = tunecomp_fx.prepare(model, inputs, 0.6, prune_heads=0.5, rank_slack=10.0)
    qkv = "layers.{}.attention.query_key_value"
    assert {(w.ups, w.down, w.per_head_parts, len(w.kept)) for w in _context(prepared).hidden_widths} == {
        ((qkv.format(i),), f"layers.{i}.attention.dense", (qkv.format(i),), 32) for i in range(2)  # each kept head's 3 x 16 rows
    }
    hugging_face_prunes_exactly(prepared, model, inputs, tmp_path / "gpt_neox.onnx")


@pytest.mark.parametrize(
    ("model_type", "options", "copied"),
    [
        ("mpnet", {}, aten.add_.Tensor),  # its relative position bias per head, added to the scores in place
        ("gemma2", {"num_key_value_heads": 2, "head_dim": 16}, aten.tanh.default),  # scores soft-capped: 50 * tanh(scores / 50)
        ("gemma3_text", {"num_key_value_heads": 2, "head_dim": 16}, aten.rsqrt.default),  # a norm of each head after the swap
        ("gpt_neo", {"attention_types": [[["global", "local"], 1]], "window_size": 8}, aten.to.dtype),  # query and key cast to float
        ("cohere", {"num_key_value_heads": 2}, aten.stack.default),  # an interleaved rotary embedding: stack, flatten
        ("modernbert", {"cls_token_id": 1, "sep_token_id": 2}, aten.unbind.int),
        ("gptj", {"rotary_dim": 8}, aten.flatten.using_ints),  # an interleaved rotary embedding on part of each head, before the swap  # view(b, t, 3, -1, 16).unbind(2), then each part swapped
        ("xglm", {"d_model": 64, "ffn_dim": 128, "num_layers": 2}, aten.bmm.default),  # attention over batch * heads with bmm, scores clamped by torch.max
        ("bloom", {"n_layer": 2, "n_head": 4}, aten.baddbmm.default),  # each head's q, k, v side by side; its ALiBi per (batch, head) in baddbmm, read sliced
        ("roformer", {}, aten.reshape_as.default),  # an interleaved rotary embedding: stack(-x[..., 1::2], x[..., ::2]).reshape_as(x)
        ("persimmon", {}, aten.layer_norm.default),  # view(b, t, heads, 3, head_dim), each part selected; query and key normed head by head
        ("mpt", {}, aten.chunk.default),  # Wqkv(x).chunk(3, dim=2), each part split into heads; its ALiBi per head added to the scores, read sliced
        ("deberta-v2", {}, aten.div.Tensor),  # without relative positions: bmm(q, k^T / scale), scale a 0-d tensor; heads merged into the batch by -1
    ],
)
def test_hugging_face_attentions_prune_their_heads_exactly(tmp_path, model_type: str, options: dict, copied: object) -> None:  # noqa: ANN001
    model, inputs = tiny_hugging_face(model_type, **options)
    prepared = tunecomp_fx.prepare(model, inputs, 0.6, prune_heads=0.5, rank_slack=10.0)
    assert len([w for w in _context(prepared).hidden_widths if w.kind == "heads"]) == 2
    copies = [n for n in prepared.graph.nodes if "copy_of" in n.meta.get("tunecomp", {})]
    assert copied in {n.target for n in copies}
    hugging_face_prunes_exactly(prepared, model, inputs, tmp_path / f"{model_type}.onnx")


@pytest.mark.parametrize("terms", [["c2p"], ["p2c", "c2p"]])
def test_deberta_v2s_relative_position_terms_are_not_recognized(terms: list[str]) -> None:
    # the scores add terms computed from the query (and the key) itself with the relative embeddings' own
    # projections: the students would read them at full width, so the heads are refused
    model, inputs = tiny_hugging_face("deberta-v2", relative_attention=True, pos_att_type=terms, position_buckets=32, share_att_key=False)
    with pytest.raises(SiteError, match="found no attention heads to prune"):
        tunecomp_fx.prepare(model, inputs, 0.6, prune_heads=0.5)


def test_an_encoder_decoder_with_bmm_attention_prunes_self_causal_and_cross_attention_heads(tmp_path) -> None:  # noqa: ANN001
    # MVP (BART's attention of old): heads merged into the batch, reshape(batch * heads, -1, head_dim), bmm, and
    # the scores viewed as (batch, heads, queries, keys) for the mask; batch * heads a product of the dynamic batch
    model, inputs = tiny_hugging_face("mvp", decoder_layers=1, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128)
    prepared = tunecomp_fx.prepare(model, inputs, 0.6, prune_heads=0.5, rank_slack=10.0)
    widths = _context(prepared).hidden_widths
    assert [w.down for w in widths] == [
        "encoder.layers.0.self_attn.out_proj", "encoder.layers.1.self_attn.out_proj", "decoder.layers.0.self_attn.out_proj", "decoder.layers.0.encoder_attn.out_proj",
    ]  # fmt: skip
    copies = [n for n in prepared.graph.nodes if "copy_of" in n.meta.get("tunecomp", {})]
    assert len([n for n in copies if n.target is aten.bmm.default]) == 8
    products = [n for n in copies if n.target is operator.mul and isinstance(n.args[0], torch.fx.Node) and n.args[1] == 2]  # batch * 2 kept heads
    assert products
    hugging_face_prunes_exactly(prepared, model, inputs, tmp_path / "mvp.onnx")


def test_swin_v2s_cosine_attention_prunes_its_heads_with_their_logit_scales_and_position_biases(tmp_path) -> None:  # noqa: ANN001
    # query and key normalized over head_dim (F.normalize), the scores scaled by exp(logit_scale) and biased
    # by a small MLP's output, both one entry per head: the student path reads them sliced to its heads
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Swinv2Config(embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=2, image_size=32, patch_size=4)
    model, inputs = transformers.Swinv2Model(config).eval(), {"pixel_values": torch.randn(2, 3, 32, 32)}
    prepared = tunecomp_fx.prepare(model, inputs, 0.6, prune_heads=0.5, rank_slack=10.0)
    widths = _context(prepared).hidden_widths
    assert [(len(w.kept), len(w.per_head_reads)) for w in widths] == [(16, 2), (32, 2)]  # 1 of 2 heads, 2 of 4
    copies = {n.target for n in prepared.graph.nodes if "copy_of" in n.meta.get("tunecomp", {})}
    assert aten.linalg_vector_norm.default in copies
    hugging_face_prunes_exactly(prepared, model, inputs, tmp_path / "swinv2.onnx")


def test_codegen_prunes_whole_model_parallel_groups_of_heads(tmp_path) -> None:  # noqa: ANN001
    # qkv_proj(x).view(b, t, -1, 3 * 16).split(16, dim=-1): 4 model-parallel groups of 2 heads of 8, each group's
    # query, value and key side by side in the site's rows; a group is pruned whole, its 48 rows with it
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        "codegen", n_layer=2, n_embd=64, n_head=8, n_inner=128, rotary_dim=4, n_ctx=64, n_positions=64, vocab_size=100,
        use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model, inputs = transformers.AutoModel.from_config(config).eval(), {"input_ids": torch.randint(3, 100, (2, 12))}
    prepared = tunecomp_fx.prepare(model, inputs, 0.6, prune_heads=0.5, rank_slack=10.0)
    widths = _context(prepared).hidden_widths
    assert {(w.ups, w.group, w.heads_per_group, w.head_dim, len(w.kept)) for w in widths} == {((f"h.{i}.attn.qkv_proj",), 16, 2, 8, 32) for i in range(2)}
    groups = sorted({neuron // 16 for neuron in widths[0].kept})
    sites = {site.name: site for site in _context(prepared).sites}
    assert sites["h.0.attn.qkv_proj"].kept_rows == tuple(group * 48 + row for group in groups for row in range(48))
    compact = hugging_face_prunes_exactly(prepared, model, inputs, tmp_path / "codegen.onnx")
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert "96 of 192 output neurons kept (4 of 8 heads)" in rows["h.0.attn.qkv_proj"].reason


class ModelParallelGroups(nn.Module):
    """CodeGen's layout with a literal group count, symbolically traced: qkv(x).view(b, t, groups, -1)
    .split(local, dim=-1) into query, value and key, each reshaped into 8 heads of 8."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups, self.qkv, self.out = groups, nn.Linear(64, 192, bias=False), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        query, value, key = self.qkv(x).view(b, t, self.groups, -1).split(64 // self.groups, dim=-1)
        q, k, v = (part.reshape(b, t, -1, 8).transpose(1, 2) for part in (query, key, value))
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize(("groups", "heads_per_group"), [(4, 2), (8, 1)])
def test_a_literal_count_of_model_parallel_groups_is_scaled_to_the_kept_groups(tmp_path, groups: int, heads_per_group: int) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model, x = ModelParallelGroups(groups).eval(), torch.randn(2, 10, 64)
    prepared = tunecomp_fx.prepare(model, (x,), 0.6, prune_heads=0.5, rank_slack=10.0)
    [width] = _context(prepared).hidden_widths
    assert (width.heads_per_group, width.group, len(width.kept)) == (heads_per_group, 64 // groups, 32)
    views = [n for n in prepared.graph.nodes if n.meta.get("tunecomp", {}).get("copy_of") == "view"]
    assert [n.args[3] for n in views] == [groups // 2]  # the student path's view keeps half the groups
    full_rank_student_path_finalizes(prepared, silenced(model, [width]), x, tmp_path / "groups.onnx")


def test_phi3_with_grouped_query_attention_prunes_whole_groups_from_its_parts_of_unequal_widths(tmp_path) -> None:  # noqa: ANN001
    # qkv[..., :64] holds 4 query heads, qkv[..., 64:96] and qkv[..., 96:] 2 key and 2 value heads, each shared by 2 query heads
    model, inputs = _phi3(key_value_heads=2)
    prepared = tunecomp_fx.prepare(model, inputs, 0.6, prune_heads=0.5, rank_slack=10.0)
    widths = _context(prepared).hidden_widths
    assert {(w.ups, w.parts, w.repeats, w.group, len(w.kept)) for w in widths} == {
        ((f"layers.{i}.self_attn.qkv_proj",), (3,), ((1, 2, 2),), 32, 32) for i in range(2)  # 1 group of 2: 2 query heads, 1 key/value head
    }
    sites = {site.name: site for site in _context(prepared).sites}
    kept = widths[0].kept
    key_value_head = range(kept[0] // 32 * 16, kept[0] // 32 * 16 + 16)  # the kept group's
    assert sites["layers.0.self_attn.qkv_proj"].kept_rows == (*kept, *(64 + row for row in key_value_head), *(96 + row for row in key_value_head))
    copies = [n for n in prepared.graph.nodes if "copy_of" in n.meta.get("tunecomp", {}) and n.target is aten.slice.Tensor and n.args[1] == 2]
    assert sorted(n.args[2:] for n in copies) == [(0, 32)] * 2 + [(32, 48)] * 2 + [(48, MAX_END)] * 2
    compact = hugging_face_prunes_exactly(prepared, model, inputs, tmp_path / "phi3_gqa.onnx")
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["layers.0.self_attn.qkv_proj"].reason.startswith("64 of 128 output neurons kept (2 of 4 query heads, 1 of 2 key/value heads)")
    assert rows["layers.0.self_attn.o_proj"].reason.startswith("32 of 64 input neurons kept (2 of 4 heads)")


@pytest.mark.parametrize(
    ("options", "repeats", "group", "block", "reported"),
    [
        # view(b, t, 2, -1, 16): each key/value group's 2 query heads, its key and its value side by side, 64 rows a group
        ({"num_kv_heads": 2, "new_decoder_architecture": True}, ((1, 2, 2),), 32, 64, "64 of 128 output neurons kept (2 of 4 query heads, 1 of 2 key/value heads)"),
        # unflatten(-2, (4, 3)).unbind(-2): each head's query, key and value side by side, 48 rows a head
        ({"num_kv_heads": 4, "new_decoder_architecture": False, "multi_query": False}, (), 16, 48, "96 of 192 output neurons kept (2 of 4 heads)"),
    ],
    ids=["new_decoder_architecture", "heads_side_by_side"],
)
def test_falcons_query_key_value_prunes_whole_groups_of_its_rows(tmp_path, options: dict, repeats: tuple, group: int, block: int, reported: str) -> None:  # noqa: ANN001
    model, inputs = tiny_hugging_face("falcon", alibi=False, **options)
    prepared = tunecomp_fx.prepare(model, inputs, 0.6, prune_heads=0.5, rank_slack=10.0)
    widths = _context(prepared).hidden_widths
    qkv = "h.{}.self_attention.query_key_value"
    assert {(w.ups, w.parts, w.repeats, w.per_head_parts, w.group, len(w.kept)) for w in widths} == {
        ((qkv.format(i),), (3,), repeats, (qkv.format(i),), group, 32) for i in range(2)
    }
    kept_groups = sorted({neuron // group for neuron in widths[0].kept})
    sites = {site.name: site for site in _context(prepared).sites}
    assert sites[qkv.format(0)].kept_rows == tuple(row for kept in kept_groups for row in range(kept * block, (kept + 1) * block))
    compact = hugging_face_prunes_exactly(prepared, model, inputs, tmp_path / "falcon.onnx")
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows[qkv.format(0)].reason.startswith(reported)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_multi_query_attention_prunes_query_heads_and_keeps_the_key_value_head_they_share(tmp_path, attention: str) -> None:  # noqa: ANN001
    # Gemma-2B's layout: 4 query heads of 32 share one key/value head, repeated for them (repeat_kv's expand)
    model, inputs = tiny_hugging_face("gemma", num_key_value_heads=1, head_dim=32, attn_implementation=attention)
    prepared = tunecomp_fx.prepare(model, inputs, 0.6, prune_heads=0.5, rank_slack=10.0)
    widths = _context(prepared).hidden_widths
    attention_sites = "layers.{}.self_attn.{}_proj"
    assert {(w.ups, w.repeats, w.group, len(w.kept)) for w in widths if w.kind == "heads"} == {
        (tuple(attention_sites.format(i, name) for name in "qkv"), ((1,), (0,), (0,)), 32, 64) for i in range(2)  # 2 of 4 heads, one at a time
    }
    sites = {site.name: site for site in _context(prepared).sites}
    assert sites[attention_sites.format(0, "k")].kept_rows == sites[attention_sites.format(0, "v")].kept_rows == tuple(range(32))
    expands = [n for n in prepared.graph.nodes if "copy_of" in n.meta.get("tunecomp", {}) and n.target is aten.expand.default]
    assert len(expands) == 4 and all(list(n.args[1])[1:3] == [1, 2] for n in expands)  # the one head repeated for the 2 kept
    compact = hugging_face_prunes_exactly(prepared, model, inputs, tmp_path / "gemma_mqa.onnx")
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows[attention_sites.format(0, "q")].reason.startswith("64 of 128 output neurons kept (2 of 4 heads)")
    assert rows[attention_sites.format(0, "k")].reason.startswith("32 of 32 output neurons kept (the key/value head they share)")


@pytest.mark.parametrize(
    ("model_type", "options", "qkv", "split_sizes"),
    [
        # Falcon-7B's: view(b, t, -1, 16).split([4, 1, 1], dim=-2), rows 0-63 the query heads, 64-79 key, 80-95 value
        ("falcon", {"new_decoder_architecture": False, "multi_query": True, "alibi": False}, "h.{}.self_attention.query_key_value", [2, 1, 1]),
        # GPTBigCode's (StarCoder's): c_attn(x).unsqueeze(1).split((64, 16, 16), dim=3), key and value (b, 1, t, 16) one head each
        ("gpt_bigcode", {"multi_query": True, "attn_implementation": "sdpa"}, "h.{}.attn.c_attn", [32, 16, 16]),
        ("gpt_bigcode", {"multi_query": True, "attn_implementation": "eager"}, "h.{}.attn.c_attn", [32, 16, 16]),
    ],
    ids=["falcon", "gpt_bigcode-sdpa", "gpt_bigcode-eager"],
)
def test_a_fused_multi_query_split_prunes_query_heads_and_keeps_the_key_value_head_they_share(
    tmp_path, model_type: str, options: dict, qkv: str, split_sizes: list  # noqa: ANN001
) -> None:
    model, inputs = tiny_hugging_face(model_type, **options)
    prepared = tunecomp_fx.prepare(model, inputs, 0.6, prune_heads=0.5, rank_slack=10.0)
    widths = _context(prepared).hidden_widths
    assert {(w.ups, w.parts, w.repeats, w.group, len(w.kept)) for w in widths} == {((qkv.format(i),), (3,), ((1, 0, 0),), 16, 32) for i in range(2)}
    assert _context(prepared).sites[0].name == qkv.format(0) and _context(prepared).sites[0].kept_rows == (*widths[0].kept, *range(64, 96))
    splits = [n for n in prepared.graph.nodes if "copy_of" in n.meta.get("tunecomp", {}) and n.target is aten.split_with_sizes.default]
    assert [list(n.args[1]) for n in splits] == [split_sizes] * 2  # 2 kept query heads, the shared key and value heads
    compact = hugging_face_prunes_exactly(prepared, model, inputs, tmp_path / f"{model_type}_mqa.onnx")
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows[qkv.format(0)].reason.startswith("64 of 96 output neurons kept (2 of 4 query heads, the key/value head they share)")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_gpt_bigcodes_c_attn_prunes_whole_heads_of_its_side_by_side_parts(tmp_path, attention: str) -> None:  # noqa: ANN001
    # view(b, t, 4, 48).transpose(1, 2).split([16, 16, 16], dim=3): each head's query, key and value in a block of 48 rows
    model, inputs = tiny_hugging_face("gpt_bigcode", multi_query=False, attn_implementation=attention)
    prepared = tunecomp_fx.prepare(model, inputs, 0.6, prune_heads=0.5, rank_slack=10.0)
    widths = _context(prepared).hidden_widths
    c_attn = "h.{}.attn.c_attn"
    assert {(w.ups, w.parts, w.repeats, w.per_head_parts, w.group, len(w.kept)) for w in widths} == {((c_attn.format(i),), (3,), (), (c_attn.format(i),), 16, 32) for i in range(2)}
    kept_heads = sorted({neuron // 16 for neuron in widths[0].kept})
    assert _context(prepared).sites[0].kept_rows == tuple(row for head in kept_heads for row in range(head * 48, (head + 1) * 48))
    splits = [n for n in prepared.graph.nodes if "copy_of" in n.meta.get("tunecomp", {}) and n.target is aten.split_with_sizes.default]
    assert [list(n.args[1]) for n in splits] == [[16, 16, 16]] * 2  # each head's parts: pruning whole heads leaves them
    compact = hugging_face_prunes_exactly(prepared, model, inputs, tmp_path / "gpt_bigcode.onnx")
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows[c_attn.format(0)].reason.startswith("96 of 192 output neurons kept (2 of 4 heads)")


@pytest.mark.parametrize(
    ("key_value_heads", "repeats", "group", "split_sizes", "reported"),
    [
        (1, ((1, 0, 0),), 8, [32, 8, 8], "48 of 80 output neurons kept (4 of 8 query heads, the key/value head they share)"),
        (2, ((1, 4, 4),), 32, [32, 8, 8], "48 of 96 output neurons kept (4 of 8 query heads, 1 of 2 key/value heads)"),
    ],
    ids=["multi_query", "grouped_query"],
)
def test_a_fused_site_split_in_listed_sizes_prunes_its_query_heads_with_their_key_value_heads(
    tmp_path, key_value_heads: int, repeats: tuple, group: int, split_sizes: list, reported: str  # noqa: ANN001
) -> None:
    # qkv(x).split([64, kv, kv], dim=-1), as DBRX's Wqkv: 8 query heads of 8 share the key/value heads inside the attention (enable_gqa)
    torch.manual_seed(0)
    model, x = GroupedQueryAttention(key_value_heads=key_value_heads, fused=True).eval(), torch.randn(4, 10, 64)
    prepared = tunecomp_fx.prepare(model, x, 0.6, prune_heads=0.5, rank_slack=10.0)
    [width] = _context(prepared).hidden_widths
    assert (width.ups, width.parts, width.repeats, width.group, len(width.kept)) == (("qkv",), (3,), repeats, group, 32)
    splits = [n for n in prepared.graph.nodes if "copy_of" in n.meta.get("tunecomp", {}) and n.target is aten.split_with_sizes.default]
    assert [list(n.args[1]) for n in splits] == [split_sizes]  # each part's size scaled to its kept heads, a shared head's kept
    compact = full_rank_student_path_finalizes(prepared, silenced(model, [width]), x, tmp_path / "fused_gqa.onnx")
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["qkv"].reason.startswith(reported)


def test_a_shared_key_value_head_sliced_out_of_a_fused_site_is_refused_not_miscut() -> None:
    # Phi-3 with one key/value head: qkv[..., 64:80] would have to shift with the pruned query rows, not scale
    model, inputs = _phi3(key_value_heads=1)
    with pytest.raises(SiteError, match="found no attention heads to prune"):
        tunecomp_fx.prepare(model, inputs, 0.6, prune_heads=0.5)


def test_a_students_path_that_would_not_run_stops_prepare_naming_the_pass(monkeypatch) -> None:  # noqa: ANN001
    # the same layout misread on purpose: the shared head's slice bounds scaled as if they held query heads
    monkeypatch.setattr(head_widths, "_kept_whole", lambda source, width: source._replace(split=source.split._replace(sizes={})))
    model, inputs = _phi3(key_value_heads=1)
    message = r"pass 'insert_teacher_student' broke its guarantee: the students' path through the pruned widths would fail \(RuntimeError"
    with pytest.raises(PassError, match=message):
        tunecomp_fx.prepare(model, inputs, 0.6, prune_heads=0.5)


def test_a_key_value_head_every_query_head_shares_is_kept_whole() -> None:
    # one fused site: rows 0-63 four query heads of 16, 64-79 the shared key head, 80-95 the shared value head
    width = HiddenWidth("heads", ("qkv",), "out", (), 64, group=16, parts=(3,), repeats=((1, 0, 0),), kept=tuple(range(64)), target=32)
    assert width.head_dim == 16
    assert width.up_rows("qkv", (*range(16), *range(48, 64)), 64) == (*range(16), *range(48, 64), *range(64, 96))
    assert width.up_rows("qkv", range(32), 32) == tuple(range(64))  # a student site down to 2 query heads: rows 32-63 the shared pair
    sites = [Site(name, name, "aten.linear", 64, out_features, f"{name}.weight", None) for name, out_features in (("qkv", 96), ("out", 64))]
    assert [(site.out_features, site.in_features) for site in final_sites(sites, [width])] == [(64, 64), (64, 32)]


def test_a_site_holding_each_groups_queries_key_and_value_side_by_side_keeps_the_kept_groups_blocks() -> None:
    # Falcon's layout: rows 0-31 group 0's 2 query heads, 32-47 its key, 48-63 its value; rows 64-127 group 1
    width = HiddenWidth("heads", ("qkv",), "out", (), 64, group=32, parts=(3,), repeats=((1, 2, 2),), per_head_parts=("qkv",), kept=tuple(range(64)), target=32)
    assert width.up_rows("qkv", range(32, 64), 64) == tuple(range(64, 128))
    assert width.up_rows("qkv", range(32), 64) == tuple(range(64))


def test_a_fused_site_with_grouped_query_key_and_value_keeps_each_kept_groups_rows_in_every_part() -> None:
    # 4 query heads of 16 in groups of 2 sharing a key/value head: rows 0-63 query, 64-95 key, 96-127 value
    width = HiddenWidth("heads", ("qkv",), "out", (), 64, group=32, parts=(3,), repeats=((1, 2, 2),), kept=tuple(range(64)), target=32)
    assert width.head_dim == 16
    assert width.up_rows("qkv", range(32, 64), 64) == (*range(32, 64), *range(80, 96), *range(112, 128))  # the second group
    assert width.up_rows("qkv", range(32), 32) == tuple(range(64))  # a student site already down to one group keeps it whole
    sites = [Site(name, name, "aten.linear", 64, out_features, f"{name}.weight", None) for name, out_features in (("qkv", 128), ("out", 64))]
    [qkv, out] = final_sites(sites, [width])
    assert (qkv.out_features, out.in_features) == (64, 32)


def test_a_slices_bounds_scale_together_and_an_end_to_the_end_stays() -> None:
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    middle, last = (graph.call_function(aten.slice.Tensor, (x, 2, start, end)) for start, end in ((64, 128), (128, MAX_END)))
    for node in (middle, last):
        rescale_shape_entry(node, 1, 32, 64)  # 32 of 64 kept in each block
    assert (middle.args[1:], last.args[1:]) == ((2, 32, 64), (2, 64, MAX_END))


def test_cross_attention_prunes_the_same_heads_of_its_query_site_and_of_both_parts_of_its_key_value_site(tmp_path) -> None:  # noqa: ANN001
    # queries from x, keys and values from memory: fold_sliced_weights makes a query site and a packed key/value site
    torch.manual_seed(0)
    model, inputs = CrossAttention(chunked=False).eval(), (torch.randn(4, 10, 64), torch.randn(4, 7, 64))
    prepared = tunecomp_fx.prepare(model, inputs, 0.5, prune_heads=0.5)
    [width] = _context(prepared).hidden_widths
    assert (width.ups, width.down, width.parts, len(width.kept)) == (("attn.in_proj_weight_0", "attn.in_proj_weight_1"), "attn.out_proj", (1, 2), 32)
    sites = {site.name: site for site in _context(prepared).sites}
    assert sites["attn.in_proj_weight_1"].kept_rows == (*width.kept, *(64 + neuron for neuron in width.kept))  # the same heads in key and value
    [unflatten] = [n for n in prepared.graph.nodes if n.target is aten.unflatten.int and "copy_of" in n.meta.get("tunecomp", {})]
    assert list(unflatten.args[2]) == [2, 32]
    with torch.no_grad():
        torch.testing.assert_close(prepared(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)  # alpha = 1: the teacher alone
    compact, _ = finalize_from_student_path(prepared, *inputs)
    with torch.no_grad():
        assert compact(torch.randn(3, 10, 64), torch.randn(3, 7, 64)).shape == (3, 10, 64)  # batch * heads scales with the batch
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["attn.in_proj_weight_0"].reason.startswith("32 of 64 output neurons kept (2 of 4 heads)")
    assert rows["attn.in_proj_weight_1"].reason.startswith("64 of 128 output neurons kept (2 of 4 heads)")
    result = to_onnx(compact, inputs, tmp_path / "cross.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


def test_a_transformer_decoder_layer_prunes_its_self_attention_cross_attention_and_ffn() -> None:
    torch.manual_seed(0)
    model = nn.TransformerDecoderLayer(64, 4, 128, dropout=0.0, batch_first=True).eval()
    inputs = (torch.randn(4, 10, 64), torch.randn(4, 7, 64))
    prepared = tunecomp_fx.prepare(model, inputs, 0.5, prune_heads=0.5, prune_neurons=0.3)
    assert {(w.kind, w.down, w.parts, len(w.kept)) for w in _context(prepared).hidden_widths} == {
        ("heads", "self_attn.out_proj", (3,), 32), ("heads", "multihead_attn.out_proj", (1, 2), 32), ("neurons", "linear2", (), 88),
    }  # fmt: skip
    finalize_from_student_path(prepared, *inputs)


def test_rotary_embeddings_between_the_head_split_and_the_attention_are_copied_into_the_student_path() -> None:
    torch.manual_seed(0)
    model, x = RotaryHeadsBlock().eval(), torch.randn(4, 10, 64)
    prepared = tunecomp_fx.prepare(model, x, 0.5, prune_heads=0.5)
    [width] = _context(prepared).hidden_widths
    assert (width.ups, width.down, len(width.kept)) == (("query", "key", "value"), "out", 32)
    attention = _student_attention(prepared)
    assert [argument.target for argument in attention.args[:3]] == [aten.add.Tensor, aten.add.Tensor, aten.transpose.int]  # q, k rotated
    copies = {n.meta["tunecomp"]["copy_of"] for n in prepared.graph.nodes if "copy_of" in n.meta.get("tunecomp", {})}
    assert {"neg", "neg_1", "cat", "cat_1"} <= copies
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-5)  # alpha = 1: the teacher alone
    compact, _ = finalize_from_student_path(prepared, x)
    with torch.no_grad():
        assert compact(torch.randn(3, 10, 64)).shape == (3, 10, 64)


def test_a_per_head_scale_between_the_head_split_and_the_attention_is_not_recognized() -> None:
    with pytest.raises(SiteError, match="found no attention heads to prune"):
        tunecomp_fx.prepare(RotaryHeadsBlock(head_scale=True).eval(), torch.randn(4, 10, 64), 0.5, prune_heads=0.5)


def test_a_norm_over_each_heads_head_dim_is_copied_into_the_student_path() -> None:
    torch.manual_seed(0)
    model, x = NormedHeadsBlock().eval(), torch.randn(4, 10, 64)
    # students at full rank: the student path is the model with the pruned heads alone taken out
    prepared = tunecomp_fx.prepare(model, x, 0.5, prune_heads=0.5, rank_slack=10.0)
    [width] = _context(prepared).hidden_widths
    copies = [n for n in prepared.graph.nodes if "copy_of" in n.meta.get("tunecomp", {})]
    assert [n.target for n in copies].count(aten.rsqrt.default) == 2  # the query's norm and the key's
    tunecomp_fx.set_blend(prepared, 0.0)
    _assert_pruned_heads_alone_are_gone(prepared, model, [width], x)


def test_a_head_norm_with_a_weight_per_head_is_not_recognized() -> None:
    with pytest.raises(SiteError, match="found no attention heads to prune"):
        tunecomp_fx.prepare(NormedHeadsBlock(weight_per_head=True).eval(), torch.randn(4, 10, 64), 0.5, prune_heads=0.5)


@pytest.mark.parametrize("qk_norm, fused_attn", [(True, True), (False, False)], ids=["qk-norm", "written-out"])
def test_timms_vit_prunes_heads_through_qk_norms_and_written_out_attention(qk_norm: bool, fused_attn: bool) -> None:
    # fused_attn=False: softmax(q * scale @ k^T + mask) @ v, the mask from timm's resolve_self_attn_mask(n, scores, ...)
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, qk_norm=qk_norm, num_classes=10).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused_attn
        if qk_norm:  # weights worth checking: a norm at its start is the identity map
            nn.init.normal_(block.attn.q_norm.weight), nn.init.normal_(block.attn.k_norm.bias)
    x = torch.randn(2, 3, 32, 32)
    prepared = tunecomp_fx.prepare(model, x, 0.5, prune_heads=0.5, rank_slack=10.0)
    widths = _context(prepared).hidden_widths
    assert [(w.ups, len(w.kept)) for w in widths] == [((f"blocks.{i}.attn.qkv",), 128) for i in range(2)]  # 2 of 3 heads
    tunecomp_fx.set_blend(prepared, 0.0)
    _assert_pruned_heads_alone_are_gone(prepared, model, widths, x)
    tunecomp_fx.prune_slack(prepared)
    compact = tunecomp_fx.finalize(prepared)
    attentions = [n for n in compact.graph.nodes if n.target in (F.scaled_dot_product_attention, operator.matmul)]
    assert len(attentions) == (2 if fused_attn else 4)  # the students' alone: the teachers' went, scores and all


def test_qwen3_prunes_heads_through_its_query_and_key_norms_and_exports(tmp_path) -> None:  # noqa: ANN001
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=8,
        vocab_size=100, max_position_embeddings=32, use_cache=False, attn_implementation="sdpa",
    )  # fmt: skip
    model, inputs = transformers.Qwen3Model(config).eval(), {"input_ids": torch.randint(0, 100, (2, 12))}
    with torch.no_grad():
        for layer in model.layers:  # groups 1 and 3 change nothing; the norms' weights worth checking
            layer.self_attn.o_proj.weight.view(64, 4, 16)[:, [1, 3]] = 0.0
            nn.init.normal_(layer.self_attn.q_norm.weight), nn.init.normal_(layer.self_attn.k_norm.weight)
    # the same sites as the LLaMA of test_grouped_query_attention_silent_groups_...: every site stays whole
    prepared = tunecomp_fx.prepare(model, inputs, 1 - (30720 + 64) / 36864, prune_heads=0.5)
    assert all(width.kept == (*range(0, 16), *range(32, 48)) for width in _context(prepared).hidden_widths)
    tunecomp_fx.set_blend(prepared, 0.0)
    compact = tunecomp_fx.finalize(prepared)
    with torch.no_grad():
        torch.testing.assert_close(compact(**inputs)[0], model(**inputs)[0], rtol=1e-5, atol=1e-5)
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["layers.1.self_attn.k_proj"].reason.startswith("16 of 32 output neurons kept (2 of 4 heads)")
    result = to_onnx(compact, inputs, tmp_path / "qwen3.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


def _llama(key_value_heads: int, heads: int = 4, attention: str = "sdpa") -> tuple[nn.Module, dict[str, torch.Tensor]]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=heads, num_key_value_heads=key_value_heads,
        head_dim=64 // heads, vocab_size=100, max_position_embeddings=32, use_cache=False, attn_implementation=attention,
    )  # fmt: skip
    return transformers.LlamaModel(config).eval(), {"input_ids": torch.randint(0, 100, (2, 12))}


def test_llama_prunes_the_heads_of_its_rotary_attention_and_exports(tmp_path) -> None:  # noqa: ANN001
    model, inputs = _llama(key_value_heads=4)
    prepared = tunecomp_fx.prepare(model, inputs, 0.5, prune_heads=0.5)
    assert {(w.ups, w.down, len(w.kept)) for w in _context(prepared).hidden_widths} == {
        (tuple(f"layers.{i}.self_attn.{name}_proj" for name in "qkv"), f"layers.{i}.self_attn.o_proj", 32) for i in range(2)
    }
    with torch.no_grad():
        torch.testing.assert_close(prepared(**inputs)[0], model(**inputs)[0], rtol=1e-5, atol=1e-5)  # alpha = 1: the teacher alone
    compact, _ = finalize_from_student_path(prepared, **inputs)
    other = {"input_ids": torch.randint(0, 100, (3, 9))}
    with torch.no_grad():
        assert compact(**other)[0].shape == (3, 9, 64)  # another batch and length: the rotary tables follow the length
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["layers.0.self_attn.k_proj"].reason.startswith("32 of 64 output neurons kept (2 of 4 heads)")
    result = to_onnx(compact, other, tmp_path / "llama.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


def test_grouped_query_attention_prunes_each_key_value_head_with_the_query_heads_sharing_it(tmp_path) -> None:  # noqa: ANN001
    # 8 query heads of 8 share 4 key/value heads in pairs: a group is a key/value head and its two query heads
    model, inputs = _llama(key_value_heads=4, heads=8)
    prepared = tunecomp_fx.prepare(model, inputs, 0.5, calib=[inputs], prune_heads=0.5, width_slack=1.0)
    widths = {width.down: width for width in _context(prepared).hidden_widths}
    width = widths["layers.1.self_attn.o_proj"]
    assert (width.group, width.head_dim, width.repeats, len(width.kept), width.target) == (16, 8, ((1,), (2,), (2,)), 64, 32)
    copies = [n for n in prepared.graph.nodes if "copy_of" in n.meta.get("tunecomp", {})]
    assert {tuple(shape_entries(n))[1:3] for n in copies if n.target is aten.expand.default and len(shape_entries(n)) == 5} == {(4, 2)}  # all 4 groups at first, 2 repeats
    train_with_hook(prepared, [(inputs["input_ids"], None)] * 2, lambda outputs, _: outputs[0].pow(2).mean(), 4, 2)
    prepared.eval()
    with torch.no_grad():
        trained = prepared(**inputs)[0]
    compact = tunecomp_fx.finalize(prepared)
    with torch.no_grad():
        torch.testing.assert_close(compact(**inputs)[0], trained, rtol=1e-5, atol=1e-5)
    assert {tuple(shape_entries(n))[1:3] for n in compact.graph.nodes if n.target is aten.expand.default and len(shape_entries(n)) == 5} == {(2, 2)}  # 2 groups kept
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["layers.1.self_attn.q_proj"].reason.startswith("32 of 64 output neurons kept (4 of 8 heads)")
    assert rows["layers.1.self_attn.k_proj"].reason.startswith("16 of 32 output neurons kept (2 of 4 heads)")
    assert rows["layers.1.self_attn.o_proj"].reason.startswith("32 of 64 input neurons kept (4 of 8 heads)")
    result = to_onnx(compact, inputs, tmp_path / "gqa.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


def test_grouped_query_attention_silent_groups_are_pruned_and_the_model_is_unchanged() -> None:
    model, inputs = _llama(key_value_heads=4, heads=8)
    with torch.no_grad():
        for layer in model.layers:  # groups 1 and 3 (key/value heads 1 and 3, query heads 2, 3, 6 and 7) change nothing
            layer.self_attn.o_proj.weight.view(64, 4, 16)[:, [1, 3]] = 0.0
    # per layer: q, k, v, o and the MLP hold 36864 weights; half the groups pruned leave 30720, and o's student adds a bias
    prepared = tunecomp_fx.prepare(model, inputs, 1 - (30720 + 64) / 36864, prune_heads=0.5)  # every site stays whole
    assert all(width.kept == (*range(0, 16), *range(32, 48)) for width in _context(prepared).hidden_widths)
    sites = {site.name: site for site in _context(prepared).sites}
    assert sites["layers.0.self_attn.k_proj"].kept_rows == (*range(0, 8), *range(16, 24))  # the kept groups' key/value heads
    tunecomp_fx.set_blend(prepared, 0.0)
    compact = tunecomp_fx.finalize(prepared)
    with torch.no_grad():
        torch.testing.assert_close(compact(**inputs)[0], model(**inputs)[0], rtol=1e-5, atol=1e-5)


def test_grouped_query_attention_inside_the_attention_call_prunes_whole_groups(tmp_path) -> None:  # noqa: ANN001
    # enable_gqa=True: no repeat in the graph; groups 1 and 3 (key/value heads 1 and 3, query heads 2, 3, 6, 7) are silent
    torch.manual_seed(0)
    model, x = GroupedQueryAttention().eval(), torch.randn(4, 10, 64)
    with torch.no_grad():
        model.out.weight.view(64, 4, 16)[:, [1, 3]] = 0.0
    kept = (32 * 64 + 32) + 2 * (16 * 64 + 16) + (64 * 32 + 64)  # half of each site's heads, every site whole
    prepared = tunecomp_fx.prepare(model, x, 1 - kept / count_parameters(model), prune_heads=0.5)
    [width] = _context(prepared).hidden_widths
    assert (width.ups, width.group, width.repeats, width.kept) == (("query", "key", "value"), 16, ((1,), (2,), (2,)), (*range(0, 16), *range(32, 48)))
    assert _student_attention(prepared).kwargs["enable_gqa"]
    tunecomp_fx.set_blend(prepared, 0.0)
    compact = tunecomp_fx.finalize(prepared)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), rtol=1e-5, atol=1e-5)
    assert count_parameters(compact) == kept
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["key"].reason.startswith("16 of 32 output neurons kept (2 of 4 heads)")
    result = to_onnx(compact, (x,), tmp_path / "gqa.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())
