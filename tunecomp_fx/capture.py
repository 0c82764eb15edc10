"""Model capture: symbolic tracing with a registry of leaf modules and wrapped functions, falling
back to torch.export with a dynamic batch dimension. The result says which path was used and why."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import fx, nn

from tunecomp_fx.errors import CaptureError, InputError
from tunecomp_fx.inputs import Inputs, call_model, flatten_outputs

# Module types not to trace into, each with its reason (after timm's _features_fx registry).
# Their own linear layers stay inside the leaf and are not compressible sites.
LEAF_MODULES: dict[type[nn.Module], str] = {}
# Functions kept as single call_function nodes instead of being traced through, with reasons.
WRAPPED_FUNCTIONS: dict[Callable, str] = {}


def register_leaf_module(module_type: type[nn.Module], reason: str) -> None:
    LEAF_MODULES[module_type] = reason


def register_wrapped_function(function: Callable, reason: str) -> None:
    WRAPPED_FUNCTIONS[function] = reason


def _timm_registry() -> tuple[set[type[nn.Module]], set[Callable]]:
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:
        return set(), set()
    return set(timm_fx.get_notrace_modules()), set(timm_fx.get_notrace_functions())


@dataclass
class Capture:
    graph_module: fx.GraphModule
    path: str  # "symbolic_trace" or "torch.export"
    reason: str


class _LeafTracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type[nn.Module], ...], functions: tuple[Callable, ...]) -> None:
        super().__init__(autowrap_functions=functions)
        self._leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._leaf_types) or super().is_leaf_module(m, module_qualified_name)


def symbolic_capture(model: nn.Module, inputs: Inputs) -> fx.GraphModule:
    timm_leaves, timm_functions = _timm_registry()
    leaves = tuple(set(LEAF_MODULES) | timm_leaves)
    functions = tuple(set(WRAPPED_FUNCTIONS) | timm_functions)
    tracer = _LeafTracer(leaves, functions)
    concrete_args = None
    if isinstance(inputs, Mapping):
        # Keyword models (Hugging Face) have many optional arguments: those not given are constants.
        import inspect

        params = inspect.signature(model.forward).parameters
        concrete_args = {name: p.default for name, p in params.items() if name not in inputs and p.default is not inspect.Parameter.empty}
    graph = tracer.trace(model, concrete_args=concrete_args)
    graph._tracer_cls = None  # so that pickles of the result never reference this module
    return fx.GraphModule(tracer.root, graph, model.__class__.__name__)


def export_capture(model: nn.Module, inputs: Inputs) -> fx.GraphModule:
    batch = torch.export.Dim.AUTO

    def dynamic(value: object) -> object:
        return {0: batch} if isinstance(value, torch.Tensor) and value.dim() > 0 else None

    if isinstance(inputs, Mapping):
        args, kwargs = (), dict(inputs)
        shapes = {k: dynamic(v) for k, v in kwargs.items()}
    else:
        args, kwargs = tuple(inputs), {}
        shapes = tuple(dynamic(v) for v in args)
    program = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
    return _plain_graph_module(program.module())


def _plain_graph_module(module: fx.GraphModule) -> fx.GraphModule:
    """ExportedProgram.module() holds shape-guard hooks that cannot be pickled; rebuild it as a plain
    GraphModule (same graph, pytree calling convention kept) without the guard call."""
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    graph._tracer_cls = None
    return fx.GraphModule(module, graph, module.__class__.__name__)


def check_inputs_fit(model: nn.Module, inputs: Inputs) -> list[torch.Tensor]:
    """Run the model once on the example inputs; a failure is the user's input, not our bug."""
    try:
        with torch.no_grad():
            return flatten_outputs(call_model(model, inputs))
    except Exception as error:
        raise InputError(
            f"the example inputs do not fit the model ({type(error).__name__}: {_first_line(error)}). "
            "Pass a tuple of tensors in the order of forward()'s arguments, or a dict of keyword tensors, "
            "with the shapes, dtypes and device the model expects"
        ) from error


def capture(model: nn.Module, inputs: Inputs, reference: list[torch.Tensor] | None = None) -> Capture:
    """Capture `model` as a GraphModule that reproduces it on `inputs`."""
    if reference is None:
        reference = check_inputs_fit(model, inputs)
    try:
        gm = symbolic_capture(model, inputs)
        _check_reproduces(gm, inputs, reference)
        return Capture(gm, "symbolic_trace", "symbolic tracing succeeded")
    except Exception as trace_error:
        why = f"symbolic tracing failed ({type(trace_error).__name__}: {_first_line(trace_error)})"
    try:
        gm = export_capture(model, inputs)
        _check_reproduces(gm, inputs, reference)
    except Exception as export_error:
        raise CaptureError(
            f"could not capture {model.__class__.__name__}: {why}; torch.export failed too "
            f"({type(export_error).__name__}: {_first_line(export_error)}). Register the module that holds "
            "the untraceable construct with tunecomp_fx.capture.register_leaf_module(Type, reason), or "
            "remove data-dependent control flow from forward()"
        ) from export_error
    return Capture(gm, "torch.export", f"{why}; used torch.export with a dynamic batch dimension")


def _check_reproduces(gm: fx.GraphModule, inputs: Inputs, reference: list[torch.Tensor]) -> None:
    with torch.no_grad():
        outputs = flatten_outputs(call_model(gm, inputs))
    if len(outputs) != len(reference) or not all(
        o.shape == r.shape and torch.allclose(o.float(), r.float(), rtol=1e-4, atol=1e-5, equal_nan=True)
        for o, r in zip(outputs, reference)
    ):
        raise CaptureError("the captured graph does not reproduce the model's outputs")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
