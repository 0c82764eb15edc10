"""compress_embeddings: an embedding table that plain lookups (or sum and mean bags) alone read, and
that has more rows than features, is a site of its own. Its student W ~ up.weight @ down.weight (no
bias) is looked up as up.weight[ids] @ down.weight (a bag: the bag of up.weight's rows @ down.weight),
blended with the table's lookup as a tied head's lookups are, its rows weighted by how often the
calibration reads them; the compact model holds the factors alone."""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tests.graph_checks import finalize_from_student_path, train_with_hook
from tests.joint_task import Interrupted, single_thread  # noqa: F401
from tests.models import TiedLanguageModel, TokenClassifier
from torch import nn

import tunecomp_fx
from tunecomp_fx import JointTrainer
from tunecomp_fx.capture import capture
from tunecomp_fx.config import CompressionConfig
from tunecomp_fx.errors import ConfigError
from tunecomp_fx.export import to_onnx
from tunecomp_fx.inspect import site_subgraph
from tunecomp_fx.metrics import count_parameters
from tunecomp_fx.passes.calibrate_input_covariance import CalibrateInputCovariance
from tunecomp_fx.passes.decompose_weights import DecomposeWeights, decompose, lookup_row_weights
from tunecomp_fx.passes.find_linear_sites import FindLinearSites
from tunecomp_fx.pipeline import PassContext, run_passes
from tunecomp_fx.pruning import RankPruner, scheduled_count
from tunecomp_fx.sites import TABLE_FORM, Blend, lookup_calls, student_calls, students_alone

pytestmark = pytest.mark.usefixtures("single_thread")

RATIO = 0.4
TOKENS = 10


def _model_and_inputs(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(seed)
    return TokenClassifier().eval(), (torch.randint(0, 100, (4, TOKENS)),)


def _sites(model: nn.Module, inputs: tuple[torch.Tensor], **options: object) -> dict[str, object]:
    context = PassContext(config=CompressionConfig(**options))
    run_passes(capture(model, inputs).graph_module, [FindLinearSites()], context)
    return {site.name: site for site in context.sites}


def test_a_vocabulary_table_is_a_site_only_with_compress_embeddings():
    model, inputs = _model_and_inputs()
    assert list(_sites(model, inputs)) == ["fc", "back", "classifier"]
    sites = _sites(model, inputs, compress_embeddings=True)
    assert list(sites) == ["embed", "fc", "back", "classifier"]  # in graph order; the position table (10 x 16) is none
    table = sites["embed"]
    assert (table.form, table.status, table.out_features, table.in_features) == (TABLE_FORM, "compress", 100, 16)
    assert table.is_table and table.calls == [] and table.lookups == (table.node,) == ("embed",)
    assert (table.factorized_params(4), table.break_even_rank) == (4 * 116, 14)  # no bias: its lookups read none


class ReadElsewhere(TokenClassifier):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) + self.embed.weight.mean()


class MaxNormLookup(TokenClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16, max_norm=1.0)  # renormalizes the rows it reads, in place


class BagOfWords(TokenClassifier):
    """Each text's tokens averaged (or summed, or their maximum taken) by an nn.EmbeddingBag."""

    def __init__(self, mode: str = "mean") -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(100, 16, mode=mode)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.back(torch.relu(self.fc(self.embed(ids)))))


READ_OTHERWISE = "table also read outside embedding lookups and sum or mean bags"


@pytest.mark.parametrize(
    ("model", "options", "status", "reason"),
    [
        (TokenClassifier(), {"exclude": ("embed",)}, "excluded", "excluded by the user's pattern"),
        (ReadElsewhere(), {}, "shared", READ_OTHERWISE),
        (MaxNormLookup(), {}, "shared", READ_OTHERWISE),
        (BagOfWords("max"), {}, "shared", READ_OTHERWISE),  # a maximum of rows is no product with down.weight
    ],
    ids=["excluded", "read-elsewhere", "max-norm", "max-bag"],
)
def test_a_table_stays_dense_where_its_lookups_could_not_read_factors(model, options, status, reason):
    _, inputs = _model_and_inputs()
    table = _sites(model.eval(), inputs, compress_embeddings=True, **options)["embed"]
    assert (table.status, table.reason, table.lookups) == (status, reason, ())


def test_compress_embeddings_must_be_a_bool_and_needs_the_default_method():
    with pytest.raises(ConfigError, match="compress_embeddings must be True or False; got 'yes'"):
        CompressionConfig(compress_embeddings="yes")
    with pytest.raises(ConfigError, match="method='union' does not compress embedding tables"):
        CompressionConfig(method="union", compress_embeddings=True)


def test_a_tables_factors_are_its_row_weighted_truncation():
    model, inputs = _model_and_inputs()
    context = PassContext(config=CompressionConfig(compress_embeddings=True), calibration=[inputs])
    run_passes(capture(model, inputs).graph_module, [FindLinearSites(), CalibrateInputCovariance(), DecomposeWeights()], context)
    counts = torch.bincount(inputs[0].flatten(), minlength=100).double()
    torch.testing.assert_close(context.lookup_counts["embed"], counts)
    assert context.covariances["embed"].rows == inputs[0].numel()
    torch.testing.assert_close(context.covariances["embed"].covariance, torch.eye(16, dtype=torch.float64))  # whole rows: the plain metric
    # the rank-r truncation of P^1/2 W in the plain metric, P the reads add-one smoothed
    plain = decompose(model.embed.weight, None, "svd", 0.0, lookup_row_weights(counts))
    factors = context.decompositions["embed"]
    unweighted = decompose(model.embed.weight, None, "svd", 0.0)
    for rank in (2, 6):
        truncation = factors.up[:, :rank] @ factors.down[:rank]
        torch.testing.assert_close(truncation, plain.up[:, :rank] @ plain.down[:rank], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(truncation, unweighted.up[:, :rank] @ unweighted.down[:rank], atol=1e-3)


def _with_student_maps(model: nn.Module, prepared: torch.fx.GraphModule) -> nn.Module:
    """`model` with each compressed weight (the table among them) replaced by its student's map,
    up.weight @ (rank_mask * down.weight), and each bias by up's."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for site in prepared.meta["tunecomp"].context.factorized_sites():
            student = prepared.get_submodule(f"lowrank.{site.key}")
            reference.get_parameter(site.weight_target).copy_(student.up.weight @ (student.rank_mask[:, None] * student.down.weight))
            if site.bias_target is not None:
                reference.get_parameter(site.bias_target).copy_(student.up.bias)
    return reference


def test_a_tables_lookup_reads_its_student_and_blends_with_it():
    model, inputs = _model_and_inputs()
    prepared = tunecomp_fx.prepare(model, inputs, ratio=RATIO, compress_embeddings=True)
    nodes = {node.name: node for node in prepared.graph.nodes}
    (parts,) = lookup_calls(prepared)["embed"]
    assert "embed" not in student_calls(prepared)  # no linear call of its own
    assert parts["teacher"] is nodes["embed"] and list(nodes["embed"].users) == [parts["blend"]]
    assert parts["blend"].target == "lowrank.embed.lookup_blend" and parts["blend"].args == (nodes["embed"], parts["student"])
    assert parts["rows"].target is F.embedding and parts["rows"].args == (nodes["ids"], parts["table"])
    assert parts["table"].target == "lowrank.embed.up.weight" and parts["factor"].target == "lowrank.embed.down.weight"
    assert parts["masked"].target is operator.mul and parts["masked"].args == (parts["rows"], parts["rank_mask"])
    assert parts["student"].target is torch.matmul and parts["student"].args == (parts["masked"], parts["factor"])
    shown = site_subgraph(prepared, "embed").splitlines()
    assert shown[0].startswith("site embed: embedding 100 x 16, rank ") and shown[0].endswith(", 1 embedding lookup of the weight (prepared model)")
    assert [line.split("[")[1].split("]")[0] for line in shown if "[" in line][:2] == ["teacher", "lookup table"]
    student = prepared.lowrank.embed
    assert student.up.bias is None and not hasattr(student, "blend")  # the lookup's blend is its own
    assert not prepared.get_parameter("embed.weight").requires_grad  # the teacher table is frozen
    with torch.no_grad():
        torch.testing.assert_close(prepared(*inputs), model(*inputs), rtol=0, atol=1e-6)  # alpha = 1: the teachers alone
        with students_alone(prepared):
            torch.testing.assert_close(prepared(*inputs), _with_student_maps(model, prepared)(*inputs), rtol=1e-5, atol=1e-5)


def test_the_students_lookup_leaves_the_padding_row_out_of_the_gradient_as_the_tables_does():
    model, inputs = _model_and_inputs()
    model.embed.padding_idx = 0
    ids = torch.cat([torch.zeros(4, 1, dtype=torch.long), inputs[0][:, 1:]], 1)  # every text starts with the padding id
    prepared = tunecomp_fx.prepare(model, inputs, ratio=RATIO, compress_embeddings=True)
    (parts,) = lookup_calls(prepared)["embed"]
    assert parts["rows"].kwargs == {"padding_idx": 0}
    with students_alone(prepared):
        prepared(ids).square().sum().backward()
    gradient = prepared.lowrank.embed.up.weight.grad
    assert not gradient[0].any() and gradient[ids[:, 1:].flatten()].abs().sum(1).min() > 0


def test_a_table_finalizes_to_its_factors_counted_in_the_ratio_and_exports(tmp_path):
    model, inputs = _model_and_inputs()
    prepared = tunecomp_fx.prepare(model, inputs, ratio=RATIO, compress_embeddings=True)
    tunecomp_fx.prune_slack(prepared)
    compact, _ = finalize_from_student_path(prepared, *inputs)
    assert "embed.weight" not in dict(compact.named_parameters()) and "position.weight" in dict(compact.named_parameters())
    (lookup,) = [node for node in compact.graph.nodes if node.target is F.embedding]
    (product,) = lookup.users
    assert [lookup.args[1].target, product.target, product.args[1].target] == ["lowrank.embed.up.weight", torch.matmul, "lowrank.embed.down.weight"]
    report = tunecomp_fx.get_report(compact)
    table = {row.name: row for row in report.sites}["embed"]
    assert (table.form, table.decision) == (TABLE_FORM, "rank")
    assert table.reason.startswith("table: its embedding lookup reads the student's factors (init error ")
    assert table.params_before == 100 * 16 and table.params_after == table.rank * (100 + 16)  # the factors alone
    assert table.macs_before == 0 and table.macs_after == TOKENS * table.rank * 16  # a lookup, then rank x features per id
    assert count_parameters(compact) == sum(row.params_after for row in report.sites) + 10 * 16 == report.model_params_after
    assert report.kept_fraction <= 1 - RATIO  # the table counts in the ratio's parameters
    result = to_onnx(compact, inputs, tmp_path / "table.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


class WeightedBags(nn.Module):
    """F.embedding_bag over 1-D ids cut into bags by offsets, each id's row scaled by its weight."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(100, 16))
        self.fc = nn.Linear(16, 64)
        self.classifier = nn.Linear(64, 3)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        bags = F.embedding_bag(ids, self.table, offsets, mode="sum", per_sample_weights=weights, padding_idx=0)
        return self.classifier(torch.relu(self.fc(bags)))


class ExportedBags(BagOfWords):
    """Summed bags behind a branch on a size: torch.export captures them, as aten's embedding_bag (y its first output)."""

    def __init__(self) -> None:
        super().__init__("sum")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        bags = self.embed(ids)
        if bags.shape[-1] > 8:  # a proxy bool: symbolic tracing cannot evaluate this
            bags = torch.relu(bags)
        return self.classifier(self.back(torch.relu(self.fc(bags))))


def _text_ids() -> tuple[torch.Tensor]:
    return (torch.randint(0, 100, (4, TOKENS)),)


def _weighted_bags() -> tuple[torch.Tensor, ...]:
    ids = torch.cat([torch.zeros(2, dtype=torch.long), torch.randint(0, 100, (18,))])  # padding ids, then words
    return ids, torch.tensor([0, 5, 5, 12]), torch.rand(20)  # four bags, the second empty


@pytest.mark.parametrize(
    ("build", "make_inputs", "capture_path", "teacher", "options"),
    [
        (BagOfWords, _text_ids, "symbolic_trace", "embed", {"mode": "mean", "per_sample_weights": None, "include_last_offset": False}),
        (
            WeightedBags, _weighted_bags, "symbolic_trace", "embedding_bag",
            {"mode": "sum", "per_sample_weights": "weights", "include_last_offset": False, "padding_idx": 0},
        ),
        # aten's bag returns a tuple: the lookup is its first output
        (ExportedBags, _text_ids, "torch.export", "getitem", {"mode": "sum", "per_sample_weights": None, "include_last_offset": False}),
    ],
    ids=["mean-bag-module", "weighted-sum-bag-function", "sum-bag-exported"],
)  # fmt: skip
def test_a_bag_of_rows_reads_the_same_bag_of_the_students_rows_and_finalizes_to_it(
    tmp_path, build, make_inputs, capture_path, teacher, options
):
    # a sum or mean of rows is linear: the bag of up.weight's rows times down.weight is the bag of W's
    torch.manual_seed(0)
    model, inputs = build().eval(), make_inputs()
    prepared = tunecomp_fx.prepare(model, inputs, ratio=RATIO, compress_embeddings=True)
    context = prepared.meta["tunecomp"].context
    (table,) = [site for site in context.sites if site.is_table]
    assert table.status == "compress" and table.lookups == (teacher,)
    (parts,) = lookup_calls(prepared)[table.key]
    assert parts["teacher"].name == teacher
    assert parts["rows"].target is F.embedding_bag and parts["rows"].args[1] is parts["table"]
    assert {key: getattr(value, "name", value) for key, value in parts["rows"].kwargs.items()} == options
    calibrated = PassContext(config=CompressionConfig(compress_embeddings=True), calibration=[inputs])
    captured = capture(model, inputs)
    assert captured.path == capture_path
    run_passes(captured.graph_module, [FindLinearSites(), CalibrateInputCovariance()], calibrated)
    counts = torch.bincount(inputs[0].flatten(), minlength=100).double()
    torch.testing.assert_close(calibrated.lookup_counts[table.name], counts)  # the ids of every bag
    assert calibrated.rows_per_sample[table.lookups[0]] == 1.0  # its student multiplies each bag by down.weight, one a text
    with torch.no_grad():
        torch.testing.assert_close(prepared(*inputs), model(*inputs), rtol=0, atol=1e-6)
        with students_alone(prepared):
            torch.testing.assert_close(prepared(*inputs), _with_student_maps(model, prepared)(*inputs), rtol=1e-5, atol=1e-5)
    tunecomp_fx.prune_slack(prepared)
    compact, _ = finalize_from_student_path(prepared, *inputs)
    assert table.weight_target not in dict(compact.named_parameters())
    row = {row.name: row for row in tunecomp_fx.get_report(compact).sites}[table.name]
    assert (row.decision, row.params_after) == ("rank", row.rank * (100 + 16))
    assert row.macs_after == row.rank * 16  # rank x features MACs per bag (one a text), not per id
    result = to_onnx(compact, inputs, tmp_path / "bags.onnx")  # the offsets' length an axis of its own
    assert all(error < 1e-4 for error in result.max_errors.values())


# the sites whose lookups read their students: a table (compress_embeddings; looked up or read in bags) and a head tied to its embedding
LOOKUP_SITES = pytest.mark.parametrize(
    ("build", "name", "options", "targets", "loss_fn"),
    [
        (TokenClassifier, "embed", {"compress_embeddings": True}, (3, (4,)), F.cross_entropy),
        (BagOfWords, "embed", {"compress_embeddings": True}, (3, (4,)), F.cross_entropy),
        (TiedLanguageModel, "head", {}, (100, (4, TOKENS)), lambda logits, targets: F.cross_entropy(logits.flatten(0, 1), targets.flatten())),
    ],
    ids=["table", "bag", "tied-head"],
)


@LOOKUP_SITES
def test_joint_training_blends_the_lookups_out(build, name, options, targets, loss_fn):
    torch.manual_seed(0)
    model, inputs = build().eval(), (torch.randint(0, 100, (4, TOKENS)),)
    prepared = tunecomp_fx.prepare(model, inputs, ratio=RATIO, rank_slack=0.5, **options)
    torch.manual_seed(1)
    classes, shape = targets
    data = [(torch.randint(0, 100, (4, TOKENS)), torch.randint(0, classes, shape)) for _ in range(6)]
    hook = train_with_hook(prepared, data, loss_fn, steps=6, blend_steps=4)
    assert hook.teacher_removed and not any(isinstance(module, Blend) for module in prepared.modules())
    assert not any(node.op == "call_module" and node.target in ("embed", "head") for node in prepared.graph.nodes)
    (parts,) = lookup_calls(prepared)[name]
    assert set(parts) == {"table", "rows", "rank_mask", "masked", "factor", "student"}
    mask = prepared.get_submodule(f"lowrank.{name}").rank_mask
    assert 0 < int(mask.count_nonzero()) < mask.numel()  # the slack the pruner switched off, for the site and its lookup alike
    with torch.no_grad():
        trained = prepared(*inputs)
    compact = tunecomp_fx.finalize(prepared)
    with torch.no_grad():
        torch.testing.assert_close(compact(*inputs), trained, rtol=1e-5, atol=1e-5)
    assert tunecomp_fx.get_report(compact).kept_fraction <= 1 - RATIO


def test_global_rank_selection_leaves_a_table_on_its_own_schedule_and_meets_the_budget_with_the_layers():
    # On the per-parameter score a table's rank (rows + features parameters) would go first, for no MACs saved.
    model, inputs = _model_and_inputs()
    prepared = tunecomp_fx.prepare(model, inputs, ratio=RATIO, rank_slack=0.5, compress_embeddings=True)
    context = prepared.meta["tunecomp"].context
    pruner = RankPruner(prepared, context, "global")
    table = next(student for student in pruner.students if student.site.is_table)
    for progress in (0.25, 0.5, 0.75, 1.0):
        pruner.update(progress)
        assert table.kept == scheduled_count(table.start_rank, table.target_rank, progress), progress
    assert table.kept == context.ranks["embed"].rank
    assert pruner.kept_params() <= pruner.budget and pruner.slack_left() is None


def test_global_allocation_gives_a_table_its_own_share_and_the_layers_theirs_by_energy():
    # on the energy per parameter a table's rank (rows + features parameters, no MACs saved) would take the cut
    model, inputs = _model_and_inputs()
    sites = {}
    for allocation in ("uniform", "global"):
        prepared = tunecomp_fx.prepare(model, inputs, ratio=RATIO, compress_embeddings=True, allocation=allocation)
        context = prepared.meta["tunecomp"].context
        sites[allocation] = {site.name: (site, context.ranks[site.name].rank) for site in context.compressed_sites}
    assert sites["global"]["embed"][1] == sites["uniform"]["embed"][1]  # the table's own share
    layers = [site for site, _ in sites["global"].values() if not site.is_table]
    kept = sum(site.dense_params if rank is None else site.kept_params(rank) for site, rank in sites["global"].values() if not site.is_table)
    assert kept <= (1 - RATIO) * sum(site.dense_params for site in layers)  # the layers meet theirs
    assert [sites["global"][site.name][1] for site in layers] != [sites["uniform"][site.name][1] for site in layers]  # by energy


def _trainer(build: type[nn.Module], options: dict[str, Any], loss_fn: Callable[..., torch.Tensor], data: Any, checkpoints: Path) -> JointTrainer:
    torch.manual_seed(0)
    prepared = tunecomp_fx.prepare(build().eval(), (torch.randint(0, 100, (4, TOKENS)),), ratio=RATIO, rank_slack=0.5, **options)
    return JointTrainer(
        prepared, data=data, loss_fn=loss_fn, steps=12, blend_steps=6, lr=1e-3, warmup=2,
        checkpoint_dir=checkpoints, checkpoint_every=3, progress=False,
    )  # fmt: skip


@LOOKUP_SITES
@pytest.mark.parametrize("interrupt_after", [4, 10], ids=["during-blend", "after-teacher-removal"])
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, build, name, options, targets, loss_fn, interrupt_after):
    torch.manual_seed(1)
    classes, shape = targets
    batches = [(torch.randint(0, 100, (4, TOKENS)), torch.randint(0, classes, shape)) for _ in range(4)]
    full = _trainer(build, options, loss_fn, batches, tmp_path / "full")
    full.fit()
    broken = _trainer(build, options, loss_fn, Interrupted(batches, interrupt_after), tmp_path / "broken")
    with pytest.raises(KeyboardInterrupt):
        broken.fit()
    assert sorted((tmp_path / "broken").glob("step_*.pt"))[-1].name == f"step_{interrupt_after // 3 * 3:07d}.pt"
    resumed = _trainer(build, options, loss_fn, batches, tmp_path / "broken")
    resumed.fit(resume=tmp_path / "broken")
    expected, actual = full.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == actual.keys() and f"lowrank.{name}.rank_mask" in actual
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert resumed.history == full.history


@LOOKUP_SITES
def test_a_lookup_site_kept_past_break_even_is_densified_and_its_lookups_read_the_dense_rows(build, name, options, targets, loss_fn):
    # "global" rank selection may leave a site above its allocated rank; from the slack rank that can be past break-even
    torch.manual_seed(0)
    model, inputs = build().eval(), (torch.randint(0, 100, (4, TOKENS)),)
    prepared = tunecomp_fx.prepare(model, inputs, ratio=0.3, rank_slack=1.0, **options)
    site = next(site for site in prepared.meta["tunecomp"].context.factorized_sites() if site.name == name)
    assert prepared.get_submodule(f"lowrank.{site.key}").rank_mask.numel() >= site.break_even_rank
    with torch.no_grad():
        for other in prepared.meta["tunecomp"].context.factorized_sites():
            if other.name != name:  # the others give their ranks up, so that the kept parameters meet the budget
                prepared.get_submodule(f"lowrank.{other.key}").rank_mask[1:] = 0
    compact, _ = finalize_from_student_path(prepared, *inputs)
    (lookup,) = [node for node in compact.graph.nodes if node.target in (F.embedding, F.embedding_bag)]
    assert lookup.args[1].target == f"lowrank.{site.key}.dense.weight" and not any(node.target is torch.matmul for node in lookup.users)
    row = {row.name: row for row in tunecomp_fx.get_report(compact).sites}[name]
    assert (row.decision, row.params_after) == ("dense", site.student_dense_params)
    assert count_parameters(compact) == tunecomp_fx.get_report(compact).model_params_after
