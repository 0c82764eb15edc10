"""Analysis: stream calibration batches through the model once and accumulate, per compressed site,
the input second moment X^T X (float64 accumulation) and the number of rows, over every call of its
weight (`Site.calls`: the one student serves them all); at the sites left
alone (excluded, shared, in a width) only the rows, for the report's MACs; at the embedding lookups
of a tied weight or a table (`Site.lookups`) the ids (a bag's: its bags) per example and how often
each row of the table is read (decompose_weights weights the rows by it; a table's metric on its
features is the identity, as its lookups read whole rows). Observers are inserted as call_module
nodes for the run and removed after it (the prepare/convert idea of torch.ao)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import fx, nn

from tunecomp_fx.errors import CalibrationError, TunecompError, first_line
from tunecomp_fx.forms import LAYOUTS, Layout, match_lookup, site_input
from tunecomp_fx.inputs import Inputs, call_model, describe_inputs
from tunecomp_fx.pipeline import GraphPass, PassContext, observing
from tunecomp_fx.progress import progress_bar

_OBSERVERS = "_tunecomp_observers"


@dataclass
class InputCovariance:
    """Sum of x x^T over every input row seen at a site, with the row count."""

    gram: torch.Tensor  # (n, n), float64
    rows: int

    @property
    def covariance(self) -> torch.Tensor:
        return self.gram / max(self.rows, 1)


class _RowCounter(nn.Module):
    """Counts the rows (tokens, pixels) a site reads and the examples they came from."""

    def __init__(self, layout: Layout, stride: int) -> None:
        super().__init__()
        self.layout = layout
        self.stride = stride
        self.rows = 0
        self.samples = 0

    def count(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as the site's (rows, features), counted."""
        rows = self.layout.rows(x.detach(), self.stride)
        self.rows += rows.shape[0]
        self.samples += x.shape[0] if x.dim() > 1 else 1
        return rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count(x)
        return x


class _IdCounter(nn.Module):
    """Counts the ids an embedding lookup reads, the examples they came from, and each row's reads."""

    def __init__(self, table_rows: int) -> None:
        super().__init__()
        self.rows = 0
        self.samples = 0
        self.counts = torch.zeros(table_rows, dtype=torch.float64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.rows += ids.numel()
        self.samples += ids.shape[0] if ids.dim() > 1 else 1
        self.counts += torch.bincount(ids.detach().flatten().cpu(), minlength=len(self.counts)).to(torch.float64)
        return ids


def _rows_per_sample(calls: list[_RowCounter] | list[_IdCounter]) -> float:
    """The rows a site's weight reads per example: every call's rows, per example of the first call's
    batches (a later call may read a tensor without a batch, as DeBERTa's relative embeddings)."""
    return sum(counter.rows for counter in calls) / max(calls[0].samples, 1)


class _Observer(_RowCounter):
    """Adds the rows of one call of a site into `gram`, which the observers of its other calls share."""

    def __init__(self, site_name: str, gram: torch.Tensor, layout: Layout, stride: int) -> None:
        super().__init__(layout, stride)
        self.site_name = site_name
        self.gram = gram
        self.batch_index = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.count(x).float()
        if not torch.isfinite(rows).all():
            raise CalibrationError(
                f"calibration batch {self.batch_index} gives NaN or inf at the input of site '{self.site_name}'; "
                "clean the calibration data (or the model's weights) before compressing"
            )
        # Gram in float32 through BLAS, accumulated across batches in float64.
        self.gram += (rows.T @ rows).to(self.gram.device, torch.float64)
        return x


def _calibrate_on(gm: fx.GraphModule, batch: Inputs, index: int) -> None:
    try:
        call_model(gm, batch)
    except TunecompError:
        raise
    except Exception as error:
        raise CalibrationError(
            f"calibration batch {index} does not fit the model ({type(error).__name__}: {first_line(error)}); "
            f"it holds {describe_inputs(batch)}. Give calibration batches the form of the example inputs "
            "(same arguments, feature sizes, dtypes and device)"
        ) from error


class CalibrateInputCovariance(GraphPass):
    name = "calibrate_input_covariance"
    preserves_outputs = True

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        if not ctx.compressed_sites:
            return "no sites to calibrate (run find_linear_sites first)"
        if len(ctx.calibration) == 0:
            raise CalibrationError("the calibration data is empty; pass at least one batch of example inputs")
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        nodes = {node.name: node for node in gm.graph.nodes}
        grams = {site.name: torch.zeros(site.in_features, site.in_features, dtype=torch.float64) for site in ctx.compressed_sites}
        observers = {
            site.name: [_Observer(site.name, grams[site.name], LAYOUTS[site.layout], site.stride) for _ in site.calls] for site in ctx.compressed_sites
        }
        # a layer hidden inside a leaf module has no input of its own in the graph
        left_alone = [site for site in ctx.sites if site.status not in ("compress", "hidden")]
        counters = {site.node: [_RowCounter(LAYOUTS[site.layout], site.stride) for _ in site.calls] for site in left_alone}
        per_call = [(site, observers[site.name]) for site in ctx.compressed_sites] + [(site, counters[site.node]) for site in left_alone]
        routes = [(site_input(nodes[entry]), nodes[entry], counter) for site, calls in per_call for (_, entry), counter in zip(site.calls, calls)]
        lookups = {name: (site, match_lookup(gm, nodes[name])) for site in ctx.compressed_sites for name in site.lookups}
        id_counters = {name: _IdCounter(site.out_features) for name, (site, _) in lookups.items()}
        routes += [(lookup.ids, lookup.table_reader, id_counters[name]) for name, (_, lookup) in lookups.items()]
        # the rows each lookup's student multiplies by down.weight: its ids, or a bag's bags
        bags = {name: _RowCounter(LAYOUTS["linear"], 1) for name, (_, lookup) in lookups.items() if lookup.bag is not None}
        routes += [(nodes[name], None, counter) for name, counter in bags.items()]
        looked_up = id_counters | bags
        with observing(gm, _OBSERVERS, routes), torch.no_grad():
            for index, batch in enumerate(progress_bar(ctx.calibration, desc="calibrate", leave=False, enabled=len(ctx.calibration) >= 4)):
                for observer in itertools.chain.from_iterable(observers.values()):
                    observer.batch_index = index
                _calibrate_on(gm, batch, index)
        for site in ctx.compressed_sites:
            rows = sum(observer.rows for observer in observers[site.name])
            if site.is_table:  # a lookup reads whole rows: the metric on the features is the plain one
                rows = sum(looked_up[name].rows for name in site.lookups)
                grams[site.name] += rows * torch.eye(site.in_features, dtype=torch.float64)
            if rows == 0:
                raise CalibrationError(f"site '{site.name}' saw no input during calibration; is it reachable from forward()?")
            ctx.covariances[site.name] = InputCovariance(grams[site.name], rows)
        ctx.rows_per_sample.update((site.node, _rows_per_sample(calls)) for site, calls in per_call if any(counter.rows for counter in calls))
        ctx.rows_per_sample.update((name, _rows_per_sample([counter])) for name, counter in looked_up.items() if counter.rows)
        ctx.lookup_counts.update((site.name, sum(id_counters[name].counts for name in site.lookups)) for site in ctx.compressed_sites if site.lookups)
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        if any(name.startswith(_OBSERVERS) for name, _ in gm.named_modules()):
            return "observers left in the graph"
        for site in ctx.compressed_sites:
            covariance = ctx.covariances.get(site.name)
            if covariance is None or covariance.gram.shape != (site.in_features, site.in_features):
                return f"no {site.in_features}x{site.in_features} input covariance for site '{site.name}'"
            if not torch.isfinite(covariance.gram).all():
                return f"the input covariance of site '{site.name}' holds NaN or inf (float64 overflow?)"
        return None
