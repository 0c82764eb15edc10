"""Transform: rewrite every factorized site into an explicit teacher/student subgraph.

    x --> teacher (the original linear node, weights frozen) ------------------.
    x --> lowrank.<site>.down --> mul(lowrank.<site>.rank_mask) --> lowrank.<site>.up --> lowrank.<site>.blend
                                                                                          (alpha*teacher + beta*student)

The student starts with `rank * (1 + rank_slack)` ranks (the slack is pruned during training);
alpha starts at 1 and beta at 0, so the rewritten model computes exactly what the original did.
A weight that several linear calls apply (`Site.calls`) has one student, inserted and blended at each
call: the same lowrank.<site> modules, one node of each role per call (`sites.student_calls`).
A weight that embedding lookups read too (`Site.lookups`, a head tied to its embedding) is looked up
in the student's factors at each of them, W[ids] = up.weight[ids] @ down.weight:
    ids --> teacher lookup (W[ids]) ----------------------------------------------------------------.
    ids --> embedding(ids, lowrank.<site>.up.weight) --> mul(rank_mask) --> matmul(lowrank.<site>.down.weight) --> lookup_blend
(`sites.lookup_calls`), the lookup blended as the calls are; a bag of rows summed or averaged (an
nn.EmbeddingBag) reads the same bag of up.weight's rows. A table that lookups alone read
(compress_embeddings, `Site.is_table`) gets the student lookups alone, its up without a bias.

method="union" puts a trainable core between fixed orthonormal bases:
    down (V^T, frozen) --> lowrank.<site>.core (rank x rank, trained) --> mul(rank_mask) --> up (U, frozen; bias trained)
The mask sits on the core's output, where the default method's sits on down's, so finalize's
fold_cores (core into down) leaves the default method's student behind.

A pruned hidden width (prune_neurons, prune_heads) gets one student path, blended at its down site
only: the up sites' students compute the kept neurons, a copy of the nodes between acts on them (the
activation; or the head split, attention and merge, with a literal head count scaled to the kept
heads and a mask or bias with one entry per head read through index_select(..., -3,
lowrank.<down>.kept_heads); a batch norm or depthwise convolution between pointwise convolutions
copied with the kept channels alone, lowrank.<down>.channels_<node>, as a squeeze-excitation's
convolutions are with the inputs and outputs of the kept channels), and the down site's student
reads that copy:
    x --> teacher up --> gelu --> teacher down ----------------------------------------------.
    x --> up site's student (kept rows) --> gelu (copy) --> down site's student (kept columns) --> blend
so the teacher path keeps the full width until the blend drops it. Sites whose weights several linear
calls apply get a copy of the nodes between for each call (`HiddenWidth.betweens`), each reading the
up sites' students at that call, and one mask (and one kept_heads) read at every call. With width_slack the students
start wider than the target and the down site's student reads the copy through a mask,
    gelu (copy) --> mul(lowrank.<down>.width_mask) --> down site's student,
whose groups the rank pruner switches off during the blend (tunecomp_fx.pruning says how it ranks
them), as it is for a squeeze-excitation's squeeze; finalize's eliminate_pruned_neurons slices them away.
The pass ensures that the students alone run on the example inputs and compute outputs of the
model's shapes, so that a layout the width analysis misread stops prepare, naming the pass."""

from __future__ import annotations

import math
import operator

import torch
from torch import fx, nn

from tunecomp_fx.forms import LAYOUTS, match_lookup, site_input
from tunecomp_fx.graph_nodes import rescale_shape_entry, tensor_rank
from tunecomp_fx.inputs import Inputs, call_model, flatten_outputs
from tunecomp_fx.mode import evaluating
from tunecomp_fx.per_channel import channels_key, per_channel_module, read_channels, with_channels
from tunecomp_fx.pipeline import GraphPass, PassContext
from tunecomp_fx.sites import (
    LOWRANK_ROOT, Blend, HiddenWidth, Site, lookup_calls, site_container, student_calls, students_alone, teacher_parameters,
)


def student_rank(site: Site, rank: int, slack: float) -> int:
    return min(math.ceil(rank * (1.0 + slack)), min(site.in_features, site.out_features))


def _new_student(site: Site, rank: int, weight: torch.Tensor, core: bool, blended: bool) -> nn.Module:
    """down and up in the site's layout (nn.Linear, or a pointwise nn.Conv2d or nn.Conv1d, down
    taking the site's stride); the rank mask has shape (rank,), (rank, 1, 1) or (rank, 1), so that
    it broadcasts over the hidden activation in each layout. With a core (method="union") only the core trains between fixed bases."""
    layout = LAYOUTS[site.layout]
    container = nn.Module()
    container.down = layout.make(site.in_features, rank, False, weight, site.stride)
    container.up = layout.make(rank, site.out_features, site.student_has_bias, weight)
    if core:
        container.core = layout.make(rank, rank, False, weight)
        container.down.weight.requires_grad_(False)
        container.up.weight.requires_grad_(False)
    container.register_buffer("rank_mask", torch.ones(layout.mask_shape(rank), device=weight.device, dtype=weight.dtype))
    if blended:  # an up site of a pruned hidden width is blended at its down site
        container.blend = Blend().to(weight.device)
    return container


class InsertTeacherStudent(GraphPass):
    name = "insert_teacher_student"
    preserves_outputs = True  # alpha = 1, beta = 0

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        if not ctx.ranks:
            return "no rank decisions (run allocate_ranks first)"
        if hasattr(gm, LOWRANK_ROOT):
            return f"the graph already has '{LOWRANK_ROOT}' students"
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        nodes = {node.name: node for node in gm.graph.nodes}
        sites = {site.name: site for site in ctx.sites}
        unblended = {up for width in ctx.hidden_widths for up in width.ups}
        widths_by_down = {width.down: width for width in ctx.hidden_widths}
        student_outputs: dict[fx.Node, fx.Node] = {}  # a call of an up site of a hidden width -> its student's output
        root = nn.Module()
        gm.add_module(LOWRANK_ROOT, root)
        for site in ctx.factorized_sites():
            weight = gm.get_parameter(site.weight_target)
            rank = student_rank(site, ctx.ranks[site.name].rank, ctx.config.rank_slack)
            core = ctx.config.method == "union"
            blended = site.name not in unblended and not site.is_table  # a table's lookups have a blend of their own
            root.add_module(site.key, _new_student(site, rank, weight, core, blended))
            for parameter in teacher_parameters(gm, [site]):
                parameter.requires_grad_(False)
            width = widths_by_down.get(site.name)
            for index, (node, entry) in enumerate(site.calls):
                x = site_input(nodes[entry])
                if width is not None:
                    x = _copy_between(gm, nodes, sites[width.down], width, width.betweens[index], nodes[entry], student_outputs)
                    if width.target < len(width.kept):
                        x = _mask_width(gm, x, site, width)
                _insert_student_call(gm, site, nodes[node], x, site.name not in unblended, student_outputs)
            for name in site.lookups:
                _insert_student_lookup(gm, site, nodes[name])
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        found = student_calls(gm)
        nodes = {node.name: node for node in gm.graph.nodes}
        sites = ctx.factorized_sites()
        unblended = {up for width in ctx.hidden_widths for up in width.ups}
        hidden_inputs = {width.down for width in ctx.hidden_widths}
        lookups = lookup_calls(gm)
        called = [site for site in sites if site.calls]
        if len(found) != len(called):
            return f"{len(found)} students called by linear calls for {len(called)} factorized sites with such calls"
        for site in sites:
            calls = found.get(site.key, [])
            if len(calls) != len(site.calls):
                return f"the student of site '{site.name}' is called {len(calls)} times for its weight's {len(site.calls)} calls"
            for (node, entry), roles in zip(site.calls, calls):
                problem = _call_problem(site, roles, nodes[node], nodes[entry], site.name in unblended, site.name in hidden_inputs)
                if problem:
                    return problem
            if [roles.get("teacher") for roles in lookups.get(site.key, [])] != [nodes[name] for name in site.lookups]:
                return f"the embedding lookups {list(site.lookups)} of site '{site.name}' are not each blended with a student lookup"
        if ctx.hidden_widths and ctx.check_inputs is not None:
            return _student_path_problem(gm, ctx.check_inputs)
        return None


def _call_problem(site: Site, roles: dict[str, fx.Node], teacher: fx.Node, entry: fx.Node, unblended: bool, hidden_input: bool) -> str | None:
    """What is wrong with one call of the site's student (`student_calls`' roles), if anything."""
    expected = {"down", "rank_mask", "masked", "up"} | (set() if unblended else {"blend"})
    missing = sorted(expected - set(roles))
    if missing:
        return f"the student of site '{site.name}' lacks its {missing} nodes"
    if unblended:
        if "blend" in roles or any(user.meta.get("tunecomp", {}).get("role") != "hidden" for user in roles["up"].users):
            return f"the student of site '{site.name}' must feed its hidden width's copy alone, unblended"
    student_input = roles["down"].args[0]
    if hidden_input:
        meta = student_input.meta.get("tunecomp", {})
        if (meta.get("site"), meta.get("role")) != (site.name, "hidden"):
            return f"the student of site '{site.name}' does not read its hidden width's student path"
    elif student_input is not site_input(entry):
        return f"the student of site '{site.name}' does not read the site's input"
    # method="union" puts its core between down and the mask
    masked_input = roles.get("core", roles["down"])
    if "core" in roles and roles["core"].args != (roles["down"],):
        return f"the core of site '{site.name}' does not read its down-projection"
    if roles["masked"].args != (masked_input, roles["rank_mask"]) or roles["up"].args != (roles["masked"],):
        return f"the student of site '{site.name}' is not down -> {'core -> ' * ('core' in roles)}mul(rank_mask) -> up"
    if unblended:
        return None
    if roles["teacher"] is not teacher:
        return f"the blend of site '{site.name}' does not read the site's output"
    if list(teacher.users) != [roles["blend"]] or roles["blend"].args != (teacher, roles["up"]):
        return f"the teacher of site '{site.name}' is not read by its blend alone"
    return None


def _insert_student_call(gm: fx.GraphModule, site: Site, teacher: fx.Node, x: fx.Node, blended: bool, student_outputs: dict[fx.Node, fx.Node]) -> None:
    """down -> (core ->) mul(rank_mask) -> up on `x`, after `teacher` (one call of the site's weight),
    and the blend of the two in place of the teacher; an up site of a pruned width is left unblended,
    its student's output in `student_outputs`."""
    prefix = f"{LOWRANK_ROOT}.{site.key}"
    graph = gm.graph
    with graph.inserting_after(teacher):
        down = graph.call_module(f"{prefix}.down", (x,))
    projected = down
    if hasattr(site_container(gm, site), "core"):
        with graph.inserting_after(down):
            projected = graph.call_module(f"{prefix}.core", (down,))
        projected.meta["tunecomp"] = {"site": site.name, "role": "core"}
    with graph.inserting_after(projected):
        mask = graph.get_attr(f"{prefix}.rank_mask")
    with graph.inserting_after(mask):
        masked = graph.call_function(operator.mul, (projected, mask))
    with graph.inserting_after(masked):
        up = graph.call_module(f"{prefix}.up", (masked,))
    for node, role in ((down, "down"), (masked, "rank_mask"), (up, "up")):
        node.meta["tunecomp"] = {"site": site.name, "role": role}
    if blended:
        with graph.inserting_after(up):
            blend = graph.call_module(f"{prefix}.blend", (teacher, up))
        teacher.replace_all_uses_with(blend, delete_user_cb=lambda user: user is not blend)
        blend.meta["tunecomp"] = {"site": site.name, "role": "blend"}
    else:
        student_outputs[teacher] = up
    teacher.meta["tunecomp"] = {"site": site.name, "role": "teacher"}


def _insert_student_lookup(gm: fx.GraphModule, site: Site, lookup: fx.Node) -> None:
    """embedding(ids, up.weight) (or the bag of the lookup) -> mul(rank_mask) -> matmul(down.weight)
    after `lookup`, an embedding lookup of the site's weight W ~ up.weight @ down.weight (up's bias is
    no part of W; a sum or mean of rows is linear, so a bag of up.weight's rows times down.weight is
    the bag of W's), and lowrank.<site>.lookup_blend of the two in its place."""
    prefix = f"{LOWRANK_ROOT}.{site.key}"
    container = site_container(gm, site)
    if not hasattr(container, "lookup_blend"):  # one blend for every lookup
        container.lookup_blend = Blend().to(container.up.weight.device)
    graph = gm.graph
    with graph.inserting_before(lookup.next):
        table = graph.get_attr(f"{prefix}.up.weight")
        # the same read (a bag's too) of the student's table; padding_idx: its row gets no gradient either
        rows = match_lookup(gm, lookup).read(graph, table)
        mask = graph.get_attr(f"{prefix}.rank_mask")
        masked = graph.call_function(operator.mul, (rows, mask))
        factor = graph.get_attr(f"{prefix}.down.weight")
        student = graph.call_function(torch.matmul, (masked, factor))
        blend = graph.call_module(f"{prefix}.lookup_blend", (lookup, student))
    lookup.replace_all_uses_with(blend, delete_user_cb=lambda user: user is not blend)
    parts = {"table": table, "rows": rows, "rank_mask": mask, "masked": masked, "factor": factor, "student": student, "blend": blend}
    for part, node in parts.items():
        node.meta["tunecomp"] = {"site": site.name, "role": "lookup", "part": part}
    lookup.meta["tunecomp"] = {"site": site.name, "role": "teacher"}


def _student_path_problem(gm: fx.GraphModule, inputs: Inputs) -> str | None:
    """Why the students alone do not compute outputs of the blended model's shapes on the example
    inputs, if they do not: the copied split, attention and merge of a pruned width would then fail
    (or broadcast against the teacher's output) only in training. Two forwards, without gradients."""
    with evaluating(gm), torch.no_grad():
        try:
            blended = [tuple(t.shape) for t in flatten_outputs(call_model(gm, inputs))]
            with students_alone(gm):
                alone = [tuple(t.shape) for t in flatten_outputs(call_model(gm, inputs))]
        except Exception as error:  # noqa: BLE001 - the teachers run as captured: a failure is the copied nodes'
            problem = f"fail ({type(error).__name__}: {error})"
        else:
            problem = None if alone == blended else f"compute outputs of shapes {alone}, not {blended}"
    if problem is None:
        return None
    return (
        f"the students' path through the pruned widths would {problem} on the example inputs: a layout the "
        "width analysis misread. Use prune_heads=0 and prune_neurons=0 for this model (and report it)"
    )


def _copy_between(
    gm: fx.GraphModule, nodes: dict[str, fx.Node], down: Site, width: HiddenWidth, between: tuple[str, ...], entry: fx.Node,
    student_outputs: dict[fx.Node, fx.Node],
) -> fx.Node:
    """One call's nodes `between` the width's ups and its down (whose call reads at `entry`) again,
    reading the up sites' students, each shape entry that counts the width scaled to the kept neurons,
    each tensor with one entry per head read sliced to the kept heads (`_kept_heads`); returns the copy
    the down site's student reads."""
    graph = gm.graph
    copies = dict(student_outputs)
    per_head = dict(width.per_head_reads)
    sides = width.channel_slices
    with graph.inserting_before(entry):
        for name in between:
            original = nodes[name]
            copy = graph.node_copy(original, lambda node: copies.get(node, node))
            if name in sides:
                read_channels(gm, copy, _kept_channels(gm, original, down, width, sides[name]), sides[name])
            if name in per_head:
                tensor = nodes[per_head[name]]
                copy.replace_input_with(tensor, _kept_heads(gm, copy, tensor, down, width, tensor_rank(original) == 3))
            for index in width.resized_entries(name):
                rescale_shape_entry(copy, index, len(width.kept), width.width)
            for stale in ("val", "tensor_meta"):  # the copy computes fewer neurons
                copy.meta.pop(stale, None)
            # eliminate_pruned_neurons rescales the copies of `resized` nodes again
            copy.meta["tunecomp"] = {"site": width.down, "role": "hidden", "copy_of": name}
            copies[original] = copy
    return copies[site_input(entry)]


def _kept_channels(gm: fx.GraphModule, original: fx.Node, down: Site, width: HiddenWidth, side: str) -> str:
    """lowrank.<down>.channels_<node>: the per-channel module (a batch norm, a depthwise convolution)
    or aten call's tensors, or a squeeze-excitation's layer, that the student path's copy of
    `original` reads, with the kept channels alone (on its `side`, `HiddenWidth.channel_slices`)."""
    container = site_container(gm, down)
    index = torch.tensor(width.kept)
    container.add_module(channels_key(original.name), with_channels(per_channel_module(gm, original), index, side))
    return f"{LOWRANK_ROOT}.{down.key}.{channels_key(original.name)}"


def _kept_heads(gm: fx.GraphModule, reader: fx.Node, tensor: fx.Node, down: Site, width: HiddenWidth, merged_batch: bool) -> fx.Node:
    """index_select(tensor, -3, lowrank.<down>.kept_heads), for `reader`: a tensor with one entry per
    head (dim -3, where it meets the scores' heads) cut to the heads the students keep
    (eliminate_pruned_neurons narrows the buffer with the width). Where `reader` works on batch * heads
    in one dim (`merged_batch`: attention written with bmm, as BLOOM adds its ALiBi), that dim is
    unflattened into (batch, heads) for the selection and flattened back."""
    container = site_container(gm, down)
    if not hasattr(container, "kept_heads"):  # one buffer for every call of a shared weight and every tensor read
        container.register_buffer("kept_heads", torch.tensor(width.heads_of(width.kept), device=container.down.weight.device))
    graph = gm.graph
    with graph.inserting_before(reader):
        index = graph.get_attr(f"{LOWRANK_ROOT}.{down.key}.kept_heads")
        by_head = graph.call_function(torch.unflatten, (tensor, -3, (-1, width.width // width.head_dim))) if merged_batch else tensor
        sliced = graph.call_function(torch.index_select, (by_head, -3, index))
        added = [index, *([by_head] if merged_batch else []), sliced]
        if merged_batch:
            sliced = graph.call_function(torch.flatten, (sliced, -4, -3))
            added.append(sliced)
    for node in added:
        node.meta["tunecomp"] = {"site": down.name, "role": "hidden"}
    return sliced


def _mask_width(gm: fx.GraphModule, hidden: fx.Node, site: Site, width: HiddenWidth) -> fx.Node:
    """mul(hidden, lowrank.<down>.width_mask): the hidden width the down site's student reads, with
    its kept neurons masked (all kept at first); a squeeze-excitation's squeeze reads its input through
    the mask too, so that a neuron switched off moves no other neuron's gate (as once sliced away)."""
    container = site_container(gm, site)
    weight = container.down.weight
    if not hasattr(container, "width_mask"):  # one mask for every call of a shared weight
        container.register_buffer("width_mask", torch.ones(LAYOUTS[site.layout].mask_shape(len(width.kept)), device=weight.device, dtype=weight.dtype))
    squeezed = {squeeze for squeeze, _, _ in width.squeezes}
    squeezes = [n for n in gm.graph.nodes if n.meta.get("tunecomp", {}).get("copy_of") in squeezed] if squeezed else []
    graph = gm.graph
    with graph.inserting_before(squeezes[0] if squeezes else hidden.next):
        mask = graph.get_attr(f"{LOWRANK_ROOT}.{site.key}.width_mask")
    with graph.inserting_after(hidden if squeezes else mask):
        masked = graph.call_function(operator.mul, (hidden, mask))  # the mask's first reader (student_nodes' width_masked)
    masked.meta["tunecomp"] = {"site": site.name, "role": "hidden"}
    for squeeze in squeezes:
        with graph.inserting_before(squeeze):
            squeezed_input = graph.call_function(operator.mul, (squeeze.args[0], mask))
        squeeze.replace_input_with(squeeze.args[0], squeezed_input)
        squeezed_input.meta["tunecomp"] = {"site": site.name, "role": "hidden"}
    return masked
