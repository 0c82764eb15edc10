"""Analysis: stream labelled calibration batches through the model with the loss and accumulate, per
site, the second moment of the gradient of the loss with respect to the site's output
(pre-activation), G = sum g g^T over output rows (of every call of its weight), in float64 (method="union").

Observers are inserted after each site's linear node for the run and removed after it; they keep
the site outputs of one batch so that torch.autograd.grad returns every site's gradient at once
without touching any parameter's .grad. Gradients are taken per example (the batch-mean loss
times the batch size), so G estimates the per-example Fisher of the site's output."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import fx, nn

from tunecomp_fx.passes.calibrate_input_covariance import InputCovariance
from tunecomp_fx.errors import CalibrationError
from tunecomp_fx.forms import LAYOUTS
from tunecomp_fx.inputs import call_model
from tunecomp_fx.pipeline import GraphPass, PassContext, observing

_OBSERVERS = "_tunecomp_gradient_observers"


class _OutputKeeper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[torch.Tensor] = []

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        self.outputs.append(y)
        return y


@contextmanager
def _site_weights_require_grad(gm: fx.GraphModule, ctx: PassContext) -> Iterator[None]:
    """Site outputs need a graph to differentiate through, even for a frozen model."""
    weights = [gm.get_parameter(site.weight_target) for site in ctx.compressed_sites]
    flags = [w.requires_grad for w in weights]
    for weight in weights:
        weight.requires_grad_(True)
    try:
        yield
    finally:
        for weight, flag in zip(weights, flags):
            weight.requires_grad_(flag)


class CalibrateOutputGradients(GraphPass):
    name = "calibrate_output_gradients"
    preserves_outputs = True

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        if not ctx.compressed_sites:
            return "no sites to calibrate (run find_linear_sites first)"
        if len(ctx.calibration_targets) != len(ctx.calibration) or not ctx.calibration_targets:
            raise CalibrationError(
                "gradient calibration needs labelled batches: pass calib=[(inputs, targets), ...] "
                "(or data= to compress, whose first batches are used)"
            )
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        from tunecomp_fx.train import checked_loss, prediction  # the driver's view of outputs and losses

        loss_fn = ctx.loss_fn or F.cross_entropy
        nodes = {node.name: node for node in gm.graph.nodes}
        sites = ctx.compressed_sites
        # one keeper per site, at each call of its weight (`Site.calls`): the gradients of every call add up
        keepers = {site.name: _OutputKeeper() for site in sites}
        grams = {s.name: torch.zeros(s.out_features, s.out_features, dtype=torch.float64) for s in sites}
        rows = dict.fromkeys(grams, 0)
        routes = [(nodes[node], None, keepers[site.name]) for site in sites for node, _ in site.calls]
        with observing(gm, _OBSERVERS, routes), _site_weights_require_grad(gm, ctx), torch.enable_grad():
            for index, (batch, targets) in enumerate(zip(ctx.calibration, ctx.calibration_targets)):
                outputs = prediction(call_model(gm, batch))
                where = f"on calibration batch {index} (gradient calibration of method='union')"
                loss = checked_loss(loss_fn(outputs, targets), where) * (targets.shape[0] if targets.dim() else 1)
                kept = [keepers[s.name].outputs for s in sites]
                flat = [y for ys in kept for y in ys]
                gradients = torch.autograd.grad(loss, flat, allow_unused=True)
                position = 0
                for site, ys in zip(sites, kept):
                    for g in gradients[position : position + len(ys)]:
                        if g is None:
                            continue
                        g = LAYOUTS[site.layout].rows(g.detach()).float()
                        if not torch.isfinite(g).all():
                            raise CalibrationError(
                                f"calibration batch {index} gives NaN or inf gradients at the output of site "
                                f"'{site.name}'; check the labels and the loss"
                            )
                        grams[site.name] += (g.T @ g).to(torch.float64).cpu()
                        rows[site.name] += g.shape[0]
                    position += len(ys)
                    ys.clear()
        for site in sites:
            if rows[site.name] == 0:
                raise CalibrationError(
                    f"the loss does not depend on site '{site.name}'; no gradient reached it. method='union' needs every "
                    f"compressed site on the loss's path: exclude it (exclude=('{site.name}',)) or use method='tunecomp'"
                )
            ctx.gradient_covariances[site.name] = InputCovariance(grams[site.name], rows[site.name])
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        if any(name.startswith(_OBSERVERS) for name, _ in gm.named_modules()):
            return "gradient observers left in the graph"
        return None
