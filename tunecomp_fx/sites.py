"""A compressible linear site and the modules its teacher/student subgraph is built from."""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import fx
from torch import nn

from tunecomp_fx.errors import ConfigError
from tunecomp_fx.schedules import DEFAULT_MIX, blend_beta

LOWRANK_ROOT = "lowrank"  # the submodule of the rewritten model that holds every site's student
TABLE_FORM = "embedding"  # the form of a site that embedding lookups alone read (compress_embeddings)


def site_key(name: str) -> str:
    """A site's name as an attribute name, for its container under `lowrank`."""
    return re.sub(r"\W", "_", name)


@dataclass(frozen=True)
class Site:
    """One linear map y = W x + b found in the captured graph.

    `node` computes y (the teacher), `entry_node` reads x (`tunecomp_fx.forms.site_input`); they
    differ only for `x @ W.T + b`, whose entry is the matmul. `layout` is a key of `tunecomp_fx.forms.LAYOUTS`.
    `more_calls` lists the (node, entry_node) of each further call of a weight that several linear calls
    apply alike (ALBERT's layers, DeBERTa's projections of the relative embeddings): the site's one
    student is called at each of its `calls`, in graph order.
    `lookups` names the embedding lookups that read the weight too (an output head tied to its
    embedding): each gets the student's lookup, up.weight[ids] @ down.weight (`lookup_calls`).
    A table that lookups alone read (form `TABLE_FORM`, with compress_embeddings) is a site of no linear
    call: its (rows, features) weight seen as a head's, `node` its first lookup, its student's up
    without a bias.
    `status` is "compress" for sites the passes rewrite, else the reason class for leaving it dense
    ("excluded" by the user, "shared" weights, "hidden" inside a leaf module or an opaque function,
    "in_width" a squeeze-excitation's layer sliced with the pruned width it sits in), with the
    human reason in `reason`.
    """

    name: str
    node: str
    form: str  # "call_module", "F.linear", "aten.linear", "F.conv2d", "aten.conv2d", "F.conv1d", "aten.conv1d", "matmul" or TABLE_FORM
    in_features: int
    out_features: int
    weight_target: str
    bias_target: str | None
    status: str = "compress"
    reason: str = ""
    entry_node: str = ""
    layout: str = "linear"
    stride: int = 1  # a strided pointwise convolution reads every stride-th position (x[..., ::stride, ::stride] in 2-d)
    more_calls: tuple[tuple[str, str], ...] = ()
    lookups: tuple[str, ...] = ()
    # Neuron pruning (prune_neurons) keeps some neurons of a hidden width: the rows of the up-projection
    # that computes it, the columns of the down-projection that reads it. in/out_features count what
    # is kept; unpruned_shape is the weight's (out, in) before.
    kept_rows: tuple[int, ...] | None = None
    kept_columns: tuple[int, ...] | None = None
    unpruned_shape: tuple[int, int] | None = None

    @property
    def is_table(self) -> bool:
        """An embedding table read by lookups alone (no linear call)."""
        return self.form == TABLE_FORM

    @property
    def calls(self) -> list[tuple[str, str]]:
        """(node, entry_node) of every linear call of the site's weight, the first the site's own (none for a table)."""
        return [] if self.is_table else [(self.node, self.entry_node), *self.more_calls]

    @property
    def key(self) -> str:
        """The site's name as an attribute name, for its container under `lowrank`."""
        return site_key(self.name)

    @property
    def dense_params(self) -> int:
        bias = self.out_features if self.bias_target is not None else 0
        return self.out_features * self.in_features + bias

    @property
    def unpruned_params(self) -> int:
        """Parameters of the layer as the model holds it, before any neuron is pruned."""
        out_features, in_features = self.unpruned_shape or (self.out_features, self.in_features)
        return out_features * in_features + (out_features if self.bias_target is not None else 0)

    def sliced(self, rows: tuple[int, ...] | None = None, columns: tuple[int, ...] | None = None) -> Site:
        """This site restricted to the kept `rows` (output neurons) or `columns` (input neurons)."""
        return replace(
            self,
            kept_rows=rows if rows is not None else self.kept_rows,
            kept_columns=columns if columns is not None else self.kept_columns,
            out_features=len(rows) if rows is not None else self.out_features,
            in_features=len(columns) if columns is not None else self.in_features,
            unpruned_shape=self.unpruned_shape or (self.out_features, self.in_features),
        )

    def weight(self, gm: nn.Module) -> torch.Tensor:
        """The (out, in) matrix this site compresses, in every layout: the kept rows and columns."""
        weight = gm.get_parameter(self.weight_target).flatten(1)
        if self.kept_rows is not None:
            weight = weight[list(self.kept_rows)]
        if self.kept_columns is not None:
            weight = weight[:, list(self.kept_columns)]
        return weight

    def bias(self, gm: nn.Module) -> torch.Tensor | None:
        if self.bias_target is None:
            return None
        bias = gm.get_parameter(self.bias_target)
        return bias[list(self.kept_rows)] if self.kept_rows is not None else bias

    @property
    def student_has_bias(self) -> bool:
        """The student carries its own bias of the full output width (a table's lookups read none)."""
        return not self.is_table

    def factorized_params(self, rank: int) -> int:
        return rank * (self.in_features + self.out_features) + (self.out_features if self.student_has_bias else 0)

    @property
    def student_dense_params(self) -> int:
        """A student densified by finalize: the weight and the student's own bias (even where the site has
        none; a table's student has none)."""
        return self.out_features * (self.in_features + int(self.student_has_bias))

    def kept_params(self, rank: int) -> int:
        """Parameters this site's student holds after finalize at kept `rank`: the factors, or one dense
        linear once the rank is past break-even (densify_past_break_even)."""
        return min(self.factorized_params(rank), self.student_dense_params)

    @property
    def break_even_rank(self) -> int:
        """Smallest rank at which the factorization holds as many weights as the dense matrix."""
        m, n = self.out_features, self.in_features
        return -(-(m * n) // (m + n))


@dataclass(frozen=True)
class HiddenWidth:
    """ups -> the nodes between -> down: a width that structured pruning slices in groups of `group`
    neurons. kind "neurons": one up site (two for a gated activation, or one in 2 `parts`, chunked), an elementwise activation
    (perhaps a dropout, perhaps written out in arithmetic), groups of one (a transformer's FFN), or of a grouped
    convolution's channels per group (RegNet's, ResNeXt's). kind "heads": the query, key and value sites (or
    fused sites whose outputs hold several copies of the width side by side, `parts` per up site:
    3 for one fused qkv site, 1 and 2 for a query site and a packed key/value site), the head split,
    the attention (a scaled_dot_product_attention call or one written out) and the head merge, groups of a head's size (with grouped-query
    attention, a key/value head and the `repeats` query heads sharing it). `between` lists the
    nodes in graph order, `resized` the (node, shape entry) pairs that count the width (a literal
    head count or width in a view; several of one node for a split into listed sizes of parts that
    each hold heads), scaled to what is kept; `kept` the neurons the students start
    with and `target` how many of them finalize keeps (select_hidden_neurons decides; fewer than
    `kept` with width_slack, the rest pruned during the blend). `per_head_reads` names (reader, tensor)
    pairs of nodes: a tensor from outside the width with one entry per head (a relative position
    bias, a mask per head) that the reader, in the student path, takes sliced to the kept heads.
    Sites whose weights several linear calls apply (`Site.more_calls`, ALBERT's shared layer) make one
    width with the nodes between of each further call of the down site in `more_between`: every call
    keeps the same neurons, and `resized` and `per_head_reads` name the nodes of every call."""

    kind: str
    ups: tuple[str, ...]
    down: str
    between: tuple[str, ...]
    width: int
    group: int = 1
    resized: tuple[tuple[str, int], ...] = ()
    kept: tuple[int, ...] = ()
    target: int = 0
    parts: tuple[int, ...] = ()  # per up site (a fused qkv site's, a packed gate and up site's); none given: one each
    # per up site, per part: how many query heads share each of its heads (grouped-query key/value); 0: one
    # head shared by every query head (multi-query key/value), kept whole as query heads are pruned
    repeats: tuple[tuple[int, ...], ...] = ()
    per_head_reads: tuple[tuple[str, str], ...] = ()
    channelwise: tuple[str, ...] = ()  # nodes of per-channel modules (batch norms, depthwise or grouped convolutions): the student path's copies are sliced
    per_head_parts: tuple[str, ...] = ()  # up sites holding each head's parts side by side (MaxViT's q, k, v), not each part's heads
    # squeeze-excitations the width passes through: (the squeeze, the convolution reading the width, the one writing its gates)
    squeezes: tuple[tuple[str, str, str], ...] = ()
    bottleneck_norms: tuple[str, ...] = ()  # batch norms between a squeeze-excitation's two layers (ReXNet's)
    more_between: tuple[tuple[str, ...], ...] = ()
    heads_per_group: int = 1  # query heads pruned as one group (CodeGen's model-parallel groups, each holding its heads' q, v, k)

    @property
    def betweens(self) -> list[tuple[str, ...]]:
        """The nodes between of every call of the down site (`Site.calls`), in its calls' order."""
        return [self.between, *self.more_between]

    @property
    def channel_slices(self) -> dict[str, str]:
        """Node -> which channels of its module the width's neurons are (`per_channel.with_channels`):
        "each" for a per-channel module, "in" and "out" for a squeeze-excitation's layers, "none" for a
        batch norm of its bottleneck (the student path's copy is whole)."""
        sides = {name: "each" for name in self.channelwise} | {name: "none" for name in self.bottleneck_norms}
        return sides | {reduce: "in" for _, reduce, _ in self.squeezes} | {expand: "out" for _, _, expand in self.squeezes}

    def resized_entries(self, node: str) -> list[int]:
        """The shape entries of `node` that count the width (`resized`)."""
        return [index for name, index in self.resized if name == node]

    @property
    def sites(self) -> tuple[str, ...]:
        return (*self.ups, self.down)

    @property
    def head_dim(self) -> int:
        """A head's size: a group holds one key/value head and the query heads that share it (or
        `heads_per_group` heads)."""
        return self.group // max((repeats for parts in self.repeats for repeats in parts), default=1) // self.heads_per_group

    def parts_of(self, up: str) -> int:
        """How many copies of the width side by side the up site's output holds."""
        return self.parts[self.ups.index(up)] if self.parts else 1

    def repeats_of(self, up: str) -> tuple[int, ...]:
        """Per part of up site `up`: how many of the down site's heads share each of its heads (1 but for
        grouped-query key/value; 0 for a multi-query one). Its part i holds `part_width` neurons."""
        return self.repeats[self.ups.index(up)] if self.repeats else (1,) * self.parts_of(up)

    def part_width(self, repeats: int, size: int) -> int:
        """How many neurons a part of an up site holds for a width of `size`: size / repeats, or one
        head for a key/value head every query head shares (repeats 0)."""
        return size // repeats if repeats else self.head_dim

    def heads_of(self, kept: Sequence[int]) -> list[int]:
        """The (query) heads whose neurons `kept` holds, a head's neurons all kept or none."""
        return [neuron // self.head_dim for neuron in kept[:: self.head_dim]]

    def up_rows(self, up: str, kept: Sequence[int], size: int) -> tuple[int, ...]:
        """The rows of up site `up` that compute the `kept` neurons (as the down site reads them) of a
        width of `size`, in each of its parts. An up site whose heads are repeated holds each kept
        group's first head alone (group // repeats rows of the part); one in `per_head_parts` holds each
        kept group's parts side by side (MaxViT's q, k, v of each head; Falcon's queries, key and
        value of each key/value group), the others each part's groups side by side."""
        per_group = [self.part_width(repeats, self.group) for repeats in self.repeats_of(up)]  # each part's rows of one group
        if up in self.per_head_parts:
            groups: dict[int, list[int]] = {}
            for neuron in kept:
                groups.setdefault(neuron // self.group, []).append(neuron % self.group)
            starts = [0, *itertools.accumulate(per_group)]
            return tuple(
                group * starts[-1] + start + offset
                for group, offsets in groups.items() for start, rows in zip(starts, per_group) for offset in offsets if offset < rows
            )  # fmt: skip
        rows: list[int] = []
        offset = 0
        for repeats, part_rows in zip(self.repeats_of(up), per_group):  # part by part, side by side in the site's rows
            if repeats:
                rows += [offset + neuron // self.group * part_rows + neuron % self.group for neuron in kept if neuron % self.group < part_rows]
            else:  # the key/value head every query head shares
                rows += range(offset, offset + self.head_dim)
            offset += self.part_width(repeats, size)
        return tuple(rows)


def final_sites(sites: Iterable[Site], widths: Iterable[HiddenWidth]) -> list[Site]:
    """`sites` with the shapes finalize leaves them: a hidden width's sites at its target width
    (the students start wider with width_slack). Budgets and rank allocation count these."""
    targets = {up: ("out_features", sum(width.part_width(repeats, width.target) for repeats in width.repeats_of(up))) for width in widths for up in width.ups}
    targets.update({width.down: ("in_features", width.target) for width in widths})
    return [replace(site, **dict([targets[site.name]])) if site.name in targets else site for site in sites]


class Blend(nn.Module):
    """The blend node of a site: alpha * teacher + beta * student, alpha/beta as buffers the
    schedules write (beta from alpha by the run's blend_mix). Within `students_alone` it passes
    the student through."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("alpha", torch.ones(()))
        self.register_buffer("beta", torch.zeros(()))
        self.student_alone = False

    def forward(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        if self.student_alone:
            return student
        return self.alpha * teacher + self.beta * student


@contextlib.contextmanager
def students_alone(gm: nn.Module) -> Iterator[None]:
    """Within: every blend of gm outputs its student alone, what the model computes once the
    teachers are gone. A flag rather than set_blend(gm, 0.0), whose in-place writes would break the
    backward of a forward already run at the current alpha."""
    blends = [module for module in gm.modules() if isinstance(module, Blend)]
    for blend in blends:
        blend.student_alone = True
    try:
        yield
    finally:
        for blend in blends:
            blend.student_alone = False


def teacher_parameters(gm: nn.Module, sites: Iterable[Site]) -> list[nn.Parameter]:
    """The weight and bias the teachers of `sites` read (insert_teacher_student freezes them)."""
    return [gm.get_parameter(target) for site in sites for target in (site.weight_target, site.bias_target) if target]


def site_container(gm: nn.Module, site: Site) -> nn.Module:
    return gm.get_submodule(f"{LOWRANK_ROOT}.{site.key}")


def set_blend(gm: nn.Module, alpha: float, mix: str = DEFAULT_MIX) -> None:
    """Set every blend of a prepared model to alpha, and beta = 1 - alpha (mix "convex") or
    sqrt(1 - alpha^2) ("power")."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1] (1: the teacher alone, 0: the student alone); got {alpha}")
    beta = blend_beta(alpha, mix)
    for module in gm.modules():
        if isinstance(module, Blend):
            module.alpha.fill_(alpha)
            module.beta.fill_(beta)


def student_calls(gm: fx.GraphModule) -> dict[str, list[dict[str, fx.Node]]]:
    """Each rewritten site's nodes by role (down, rank_mask, masked, up, blend, dense, teacher; a down
    site of a hidden width pruned gradually also width_mask, width_masked), one dict per call of its
    student (`Site.calls`; the nodes of a role in graph order, a call's nodes inserted together),
    keyed by the site's container key, found from the targets under `lowrank`."""
    prefix = f"{LOWRANK_ROOT}."
    found: dict[str, dict[str, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        if _lookup_part(node):  # a tied embedding's lookup reads the student's modules too (`lookup_calls`)
            continue
        if node.op in ("call_module", "get_attr") and isinstance(node.target, str) and node.target.startswith(prefix):
            key, _, role = node.target[len(prefix) :].partition(".")
            found.setdefault(key, {}).setdefault(role, []).append(node)
    calls: dict[str, list[dict[str, fx.Node]]] = {}
    for key, by_role in found.items():
        # roles a hidden width adds (kept_heads, channels_*) belong to its one call
        count = max(len(by_role.get(role, ())) for role in ("down", "dense", "rank_mask", "blend"))
        calls[key] = [{role: nodes[min(index, len(nodes) - 1)] for role, nodes in by_role.items()} for index in range(max(count, 1))]
        for roles in calls[key]:
            if "rank_mask" in roles:
                roles["masked"] = next(iter(roles["rank_mask"].users))
            if "width_mask" in roles:
                roles["width_masked"] = next(iter(roles["width_mask"].users))
            if "blend" in roles:
                roles["teacher"] = roles["blend"].args[0]
    return calls


def student_nodes(gm: fx.GraphModule) -> dict[str, dict[str, fx.Node]]:
    """`student_calls` of each site's first call: the nodes of a site whose weight one linear call applies."""
    return {key: calls[0] for key, calls in student_calls(gm).items()}


def _lookup_part(node: fx.Node) -> str | None:
    meta = node.meta.get("tunecomp", {})
    return meta.get("part") if meta.get("role") == "lookup" else None


def lookup_calls(gm: fx.GraphModule) -> dict[str, list[dict[str, fx.Node]]]:
    """The student lookups of each rewritten site whose weight embedding lookups read too
    (`Site.lookups`), by container key: per lookup its nodes by part, as insert_teacher_student adds
    them (table = up.weight, rows = embedding(ids, table), rank_mask, masked, factor = down.weight,
    student = masked @ factor, blend, teacher) and as later passes leave them; a lookup's nodes start
    at its table (densify_past_break_even leaves table and rows, reading the dense weight)."""
    calls: dict[str, list[dict[str, fx.Node]]] = {}
    for node in gm.graph.nodes:
        part = _lookup_part(node)
        if part is None:
            continue
        lookups = calls.setdefault(site_key(node.meta["tunecomp"]["site"]), [])
        if part == "table":
            lookups.append({})
        lookups[-1][part] = node
        if part == "blend":
            lookups[-1]["teacher"] = node.args[0]
    return calls


def student_roles(gm: fx.GraphModule) -> dict[str, list[dict[str, fx.Node]]]:
    """Every place each rewritten site's student is read, by container key: the roles of each of its
    linear calls (`student_calls`), then of each of its lookups (`lookup_calls`); a table's lookups alone."""
    calls, lookups = student_calls(gm), lookup_calls(gm)
    return {key: calls.get(key, []) + lookups.get(key, []) for key in [*calls, *(key for key in lookups if key not in calls)]}
