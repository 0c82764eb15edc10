"""Pass infrastructure: a pass declares what it requires and ensures; the runner lints the graph
after every pass, optionally checks numerics, logs what each pass added and removed, and names the
pass in any error (after torch/fx/passes/infra)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx, nn

from tunecomp_fx.config import CompressionConfig
from tunecomp_fx.errors import PassError, TunecompError
from tunecomp_fx.inputs import Inputs, call_model, flatten_outputs
from tunecomp_fx.mode import evaluating
from tunecomp_fx.sites import HiddenWidth, Site


@dataclass(frozen=True)
class RankDecision:
    """What allocation decided for one site: a rank, or dense (rank None) with the reason."""

    rank: int | None
    reason: str = ""


@dataclass(frozen=True)
class PassRecord:
    name: str
    seconds: float
    added: tuple[str, ...]
    removed: tuple[str, ...]


@dataclass
class PassContext:
    """State the passes share: analysis passes write it, transform passes read it."""

    config: CompressionConfig
    calibration: Sequence[Inputs] = ()
    calibration_targets: Sequence[Any] = ()  # labels of the calibration batches (method="union")
    loss_fn: Any = None  # loss(outputs, targets) for gradient calibration; None: cross-entropy
    check_inputs: Inputs | None = None
    capture_reason: str = ""  # how the graph was captured, and what that left hidden
    sites: list[Site] = field(default_factory=list)
    hidden_widths: list[HiddenWidth] = field(default_factory=list)  # pairs whose neurons are pruned
    covariances: dict[str, Any] = field(default_factory=dict)
    # the covariance blocks of the groups of each width pruned during training, by down site (RankPruner ranks them)
    width_covariances: dict[str, torch.Tensor] = field(default_factory=dict)
    gradient_covariances: dict[str, Any] = field(default_factory=dict)  # of the loss at each site's output
    rows_per_sample: dict[str, float] = field(default_factory=dict)  # by site node: input rows (tokens) per example
    # by site whose weight embedding lookups read too: how often the calibration's lookups read each row
    lookup_counts: dict[str, torch.Tensor] = field(default_factory=dict)
    decompositions: dict[str, Any] = field(default_factory=dict)
    ranks: dict[str, RankDecision] = field(default_factory=dict)
    # ||(W - BA) X|| / ||W X|| of each initialized student on the calibration inputs
    init_errors: dict[str, float] = field(default_factory=dict)
    # ||W[ids] - (BA)[ids]|| / ||W[ids]|| over the rows the calibration's lookups read, of each tied site
    lookup_init_errors: dict[str, float] = field(default_factory=dict)
    log: list[PassRecord] = field(default_factory=list)

    @property
    def compressed_sites(self) -> list[Site]:
        return [s for s in self.sites if s.status == "compress"]

    def factorized_sites(self) -> list[Site]:
        return [s for s in self.compressed_sites if s.name in self.ranks and self.ranks[s.name].rank is not None]


class GraphPass:
    """A GraphModule-to-GraphModule step. Subclasses set `name`, implement `run`, and may override
    `requires`/`ensures` (raise PassError or return a message string on violation)."""

    name: ClassVar[str] = "pass"
    preserves_outputs: ClassVar[bool] = False  # the runner checks this when config.check_numerics

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        raise NotImplementedError

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        return None


def run_passes(gm: fx.GraphModule, passes: Sequence[GraphPass], ctx: PassContext, progress: bool = False) -> fx.GraphModule:
    for graph_pass in passes:
        problem = graph_pass.requires(gm, ctx)
        if problem:
            raise PassError(f"pass '{graph_pass.name}' cannot run: {problem}")
        reference = _outputs(gm, ctx) if _checks_numerics(graph_pass, ctx) else None
        before = {n.name for n in gm.graph.nodes}
        start = time.perf_counter()
        try:
            gm = graph_pass.run(gm, ctx)
        except TunecompError:
            raise
        except Exception as error:
            raise PassError(f"pass '{graph_pass.name}' failed: {type(error).__name__}: {error}") from error
        try:
            gm.graph.lint()
        except Exception as error:
            raise PassError(f"pass '{graph_pass.name}' left an invalid graph: {error}") from error
        gm.recompile()
        seconds = time.perf_counter() - start
        problem = graph_pass.ensures(gm, ctx)
        if problem:
            raise PassError(f"pass '{graph_pass.name}' broke its guarantee: {problem}")
        if reference is not None:
            _check_same_outputs(graph_pass.name, reference, _outputs(gm, ctx))
        after = {n.name for n in gm.graph.nodes}
        ctx.log.append(PassRecord(graph_pass.name, seconds, tuple(sorted(after - before)), tuple(sorted(before - after))))
        if progress:
            print(f"  {graph_pass.name:<32} {seconds:7.2f} s  +{len(after - before)} / -{len(before - after)} nodes")
    return gm


def _checks_numerics(graph_pass: GraphPass, ctx: PassContext) -> bool:
    return ctx.config.check_numerics and graph_pass.preserves_outputs and ctx.check_inputs is not None


def _outputs(gm: fx.GraphModule, ctx: PassContext) -> list[torch.Tensor]:
    # In eval mode: dropout would make two runs differ, and batch norm would update its statistics.
    with evaluating(gm), torch.no_grad():
        return [t.detach().clone() for t in flatten_outputs(call_model(gm, ctx.check_inputs))]


def output_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of an output-preserving pass: re-associating products (a dense W = up @ down
    rounded once instead of twice) moves half-precision outputs by an ulp or so."""
    return max(1e-4, 4 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-4


def _check_same_outputs(name: str, expected: list[torch.Tensor], actual: list[torch.Tensor]) -> None:
    for index, (e, a) in enumerate(zip(expected, actual, strict=True)):
        scale = e.abs().max().item() if e.numel() else 0.0
        error = (e.float() - a.float()).abs().max().item() if e.numel() else 0.0
        tolerance = output_tolerance(e.dtype) * max(1.0, scale)
        if not error <= tolerance:
            raise PassError(
                f"pass '{name}' promises unchanged outputs, but output {index} moved by {error:.3g} "
                f"(scale {scale:.3g}, tolerance {tolerance:.3g})"
            )


@contextmanager
def observing(gm: fx.GraphModule, root: str, observers: Sequence[tuple[fx.Node, fx.Node | None, nn.Module]]) -> Iterator[None]:
    """While open, each (value, reader, observer) routes `value` through `observer`, a module that
    returns its input, on its way to `reader` (to every reader when None); the observers live at
    gm.<root>.<index> and are removed on exit (the prepare/convert idea of torch.ao)."""
    holder = nn.Module()
    gm.add_module(root, holder)
    inserted = []
    for index, (value, reader, observer) in enumerate(observers):
        holder.add_module(str(index), observer)
        # before its reader, so that an observed placeholder stays among the placeholders
        with gm.graph.inserting_after(value) if reader is None else gm.graph.inserting_before(reader):
            observed = gm.graph.call_module(f"{root}.{index}", (value,))
        if reader is None:
            value.replace_all_uses_with(observed, delete_user_cb=lambda user, observed=observed: user is not observed)
        else:
            reader.replace_input_with(value, observed)
        inserted.append(observed)
    gm.recompile()
    try:
        yield
    finally:
        for observed in inserted:
            observed.replace_all_uses_with(observed.args[0])
            gm.graph.erase_node(observed)
        delattr(gm, root)
        gm.recompile()
