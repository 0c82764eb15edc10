"""An output head tied to its embedding (GPT-2's, T5's layout) is compressed with its lookups: the
head's one student, W ~ up.weight @ down.weight, is looked up at every embedding lookup of the weight
as up.weight[ids] @ down.weight, blended with the lookup as the head's calls are, so the compact model
holds the factors alone, once. (Joint training, resuming it and densifying past break-even are tested
for tied heads and tables alike in tests/test_embedding_tables.py.)"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from tests.graph_checks import finalize_from_student_path
from tests.joint_task import single_thread  # noqa: F401
from tests.models import SharedVocabulary, TiedLanguageModel
from torch import nn

import tunecomp_fx
from tunecomp_fx.capture import capture
from tunecomp_fx.config import CompressionConfig
from tunecomp_fx.export import to_onnx
from tunecomp_fx.inspect import site_subgraph
from tunecomp_fx.metrics import count_parameters
from tunecomp_fx.passes.calibrate_input_covariance import CalibrateInputCovariance
from tunecomp_fx.passes.decompose_weights import DecomposeWeights, decompose, lookup_row_weights
from tunecomp_fx.passes.find_linear_sites import FindLinearSites
from tunecomp_fx.passes.initialize_students import student_weight
from tunecomp_fx.pipeline import PassContext, run_passes
from tunecomp_fx.sites import lookup_calls, student_calls, students_alone

pytestmark = pytest.mark.usefixtures("single_thread")

RATIO = 0.4


def _tied_language_model() -> tuple[nn.Module, tuple[torch.Tensor, ...], str]:
    """The model, its inputs and its tied head's site."""
    torch.manual_seed(0)
    return TiedLanguageModel().eval(), (torch.randint(0, 100, (4, 10)),), "head"


def _shared_vocabulary() -> tuple[nn.Module, tuple[torch.Tensor, ...], str]:
    torch.manual_seed(0)
    return SharedVocabulary().eval(), (torch.randint(0, 100, (4, 7)), torch.randint(0, 100, (4, 10))), "shared"


def _with_student_weights(model: nn.Module, prepared: torch.fx.GraphModule) -> nn.Module:
    """`model` with each compressed weight (the tied table among them) replaced by its student's map,
    up.weight @ (rank_mask * down.weight), and each bias by up's (a bias-free site's student starts at zero)."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for site in prepared.meta["tunecomp"].context.factorized_sites():
            student = prepared.get_submodule(f"lowrank.{site.key}")
            reference.get_parameter(site.weight_target).copy_(student.up.weight @ (student.rank_mask[:, None] * student.down.weight))
            if site.bias_target is None:
                assert not student.up.bias.any()
            else:
                reference.get_parameter(site.bias_target).copy_(student.up.bias)
    return reference


@pytest.mark.parametrize("build", [_tied_language_model, _shared_vocabulary], ids=["nn.Embedding", "F.embedding"])
def test_each_lookup_of_a_tied_head_reads_the_heads_student(build):
    model, inputs, name = build()
    prepared = tunecomp_fx.prepare(model, inputs, ratio=RATIO)
    site = next(site for site in prepared.meta["tunecomp"].context.compressed_sites if site.name == name)
    nodes = {node.name: node for node in prepared.graph.nodes}
    lookups = lookup_calls(prepared)[site.key]
    assert len(site.lookups) == len(lookups) == (1 if name == "head" else 2)
    for teacher, parts in zip(site.lookups, lookups):
        # teacher lookup -> blend <- embedding(ids, up.weight) * rank_mask @ down.weight
        assert parts["teacher"] is nodes[teacher] and list(nodes[teacher].users) == [parts["blend"]]
        assert parts["blend"].target == f"lowrank.{site.key}.lookup_blend" and parts["blend"].args == (nodes[teacher], parts["student"])
        assert parts["table"].target == f"lowrank.{site.key}.up.weight" and parts["factor"].target == f"lowrank.{site.key}.down.weight"
        assert parts["rows"].target is F.embedding and parts["rows"].args[1] is parts["table"]
        assert parts["rows"].args[0] in nodes[teacher].all_input_nodes  # the teacher's ids
        assert parts["masked"].target is operator.mul and parts["masked"].args == (parts["rows"], parts["rank_mask"])
        assert parts["rank_mask"].target == f"lowrank.{site.key}.rank_mask"
        assert parts["student"].target is torch.matmul and parts["student"].args == (parts["masked"], parts["factor"])
    assert len(student_calls(prepared)[site.key]) == 1  # the head's own call, its lookups apart
    shown = site_subgraph(prepared, name)
    assert f"{len(lookups)} embedding lookup" in shown.splitlines()[0]
    assert shown.count("[teacher]") == 1 + len(lookups) and shown.count("[lookup rows]") == shown.count("[lookup blend]") == len(lookups)
    with torch.no_grad():
        torch.testing.assert_close(prepared(*inputs), model(*inputs), rtol=0, atol=1e-6)  # alpha = 1: the teachers alone
        with students_alone(prepared):  # the head and the lookups apply the student's map, W ~ up.weight @ down.weight
            torch.testing.assert_close(prepared(*inputs), _with_student_weights(model, prepared)(*inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", [_tied_language_model, _shared_vocabulary], ids=["nn.Embedding", "F.embedding"])
def test_a_tied_heads_rows_are_weighted_by_how_often_its_lookups_read_them(build):
    model, inputs, name = build()
    context = PassContext(config=CompressionConfig(), calibration=[inputs])
    gm = run_passes(capture(model, inputs).graph_module, [FindLinearSites(), CalibrateInputCovariance(), DecomposeWeights()], context)
    site = next(site for site in context.compressed_sites if site.name == name)
    counts = sum(torch.bincount(ids.flatten(), minlength=100) for ids in inputs).double()  # SharedVocabulary looks up both inputs
    torch.testing.assert_close(context.lookup_counts[name], counts)
    assert set(context.lookup_counts) == {name}  # the sites without lookups are factored as before
    expected = decompose(site.weight(gm), context.covariances[name].covariance, "whitened", CompressionConfig().damping, lookup_row_weights(counts))
    torch.testing.assert_close(context.decompositions[name].up, expected.up)
    unweighted = decompose(site.weight(gm), context.covariances[name].covariance, "whitened", CompressionConfig().damping)
    assert not torch.allclose(context.decompositions[name].singular_values, unweighted.singular_values)


def test_a_tied_head_finalizes_to_its_factors_alone_counted_once_and_exports(tmp_path):
    model, inputs, _ = _tied_language_model()
    prepared = tunecomp_fx.prepare(model, inputs, ratio=RATIO)
    # the initial factors' error over the rows the example ids read, as often as they read them
    table, approximation = model.embed.weight.double(), student_weight(prepared.lowrank.head)
    reads = torch.bincount(inputs[0].flatten(), minlength=100).double()[:, None]
    lookup_error = ((reads * (table - approximation) ** 2).sum() / (reads * table**2).sum()).sqrt().item()
    assert 0 < lookup_error < 1
    tunecomp_fx.prune_slack(prepared)
    compact, _ = finalize_from_student_path(prepared, *inputs)
    assert not hasattr(compact, "embed") and not hasattr(compact, "head")  # the tied table is gone
    (lookup,) = [node for node in compact.graph.nodes if node.target is F.embedding]
    (product,) = lookup.users
    assert [lookup.args[1].target, product.target, product.args[1].target] == ["lowrank.head.up.weight", torch.matmul, "lowrank.head.down.weight"]
    report = tunecomp_fx.get_report(compact)
    rows = {row.name: row for row in report.sites}
    head = rows["head"]
    assert head.decision == "rank" and f"tied: its embedding lookup reads the student's factors (init error {lookup_error:.3g} over the calibration's lookups)" in head.reason
    assert head.params_before == 100 * 32 and head.params_after == head.rank * (100 + 32) + 100  # the factors and up's bias
    assert head.macs_before == 10 * 100 * 32 and head.macs_after == 10 * head.rank * (100 + 32) + 10 * head.rank * 32  # the head, the lookup
    assert count_parameters(compact) == sum(row.params_after for row in report.sites) == report.model_params_after
    assert report.kept_fraction <= 1 - RATIO
    result = to_onnx(compact, inputs, tmp_path / "tied.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


def test_hugging_face_gpt2s_tied_head_is_compressed_with_its_token_embedding(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64, use_cache=False, bos_token_id=1, eos_token_id=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    inputs = {"input_ids": torch.randint(3, 100, (2, 12))}
    prepared = tunecomp_fx.prepare(model, inputs, ratio=RATIO)
    state = prepared.meta["tunecomp"]
    assert state.capture_path == "torch.export"
    site = next(site for site in state.context.compressed_sites if site.name == "lm_head")
    (lookup,) = [prepared.graph.find_nodes(op="call_function", target=torch.ops.aten.embedding.default)[0].name]
    assert site.lookups == (lookup,)  # the token embedding; the position embedding is a table of its own
    with torch.no_grad():
        torch.testing.assert_close(prepared(**inputs)["logits"], model(**inputs).logits, rtol=0, atol=1e-5)
    tunecomp_fx.prune_slack(prepared)
    compact, _ = finalize_from_student_path(prepared, **inputs)
    names = dict(compact.named_parameters())
    assert "lm_head.weight" not in names and "transformer.wte.weight" not in names and "transformer.wpe.weight" in names
    assert count_parameters(compact) == tunecomp_fx.get_report(compact).model_params_after
    result = to_onnx(compact, inputs, tmp_path / "gpt2.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


@pytest.mark.parametrize(
    ("method", "embedding", "reason"),
    [
        ("union", nn.Embedding(100, 32), "also read by embedding lookups, compressed with them by method='tunecomp' alone"),
        ("tunecomp", nn.Embedding(100, 32, max_norm=1.0), "weight tied with embed.weight"),  # max_norm renormalizes the table in place
    ],
    ids=["union", "max_norm"],
)
def test_a_tied_head_stays_dense_where_its_lookups_cannot_read_factors(method, embedding, reason):
    model, inputs, _ = _tied_language_model()
    model.embed = embedding
    model.head.weight = model.embed.weight
    context = PassContext(config=CompressionConfig(method=method))
    run_passes(capture(model, inputs).graph_module, [FindLinearSites()], context)
    head = next(site for site in context.sites if site.name == "head")
    assert (head.status, head.lookups) == ("shared", ()) and reason in head.reason
