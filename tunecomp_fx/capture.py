"""Model capture: symbolic tracing with a registry of leaf modules and wrapped functions, falling
back to torch.export with a dynamic batch dimension. The result says which path was used and why."""

from __future__ import annotations

import linecache
import os
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import fx, nn

from tunecomp_fx.errors import CaptureError, InputError, first_line
from tunecomp_fx.inputs import Inputs, call_model, describe_inputs, flatten_outputs, named_tensors

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
    doubled = _batch_of_two(inputs)
    if doubled is not inputs:
        try:
            return _export(model, doubled)
        except Exception:
            pass  # dim 0 cannot grow here: capture at the size given, where torch.export fixes it
    return _export(model, inputs)


def _export(model: nn.Module, inputs: Inputs) -> fx.GraphModule:
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


def _batch_of_two(inputs: Inputs) -> Inputs:
    """torch.export specializes a dimension of size 1 to the constant 1 (its 0/1 specialization), so
    a batch of one would give a graph that runs only at batch size 1 (reshapes bake it in). When every
    batched input has batch size 1, capture on each repeated twice instead (the capture is still
    checked against the model on the original inputs); returns `inputs` itself otherwise."""
    tensors = [t for _, t in named_tensors(inputs) if t.dim() > 0]
    if not tensors or any(t.shape[0] != 1 for t in tensors):
        return inputs

    def doubled(value: object) -> object:
        return torch.cat([value, value]) if isinstance(value, torch.Tensor) and value.dim() > 0 else value

    if isinstance(inputs, Mapping):
        return {key: doubled(value) for key, value in inputs.items()}
    return tuple(doubled(value) for value in inputs)


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
    """Check the model holds real weights and the inputs sit on its device, then run it once on the
    example inputs; a failure is the user's input, not our bug."""
    _check_materialized(model)
    _check_same_device(model, inputs)
    try:
        with torch.no_grad():
            return flatten_outputs(call_model(model, inputs))
    except Exception as error:
        raise InputError(
            f"the example inputs do not fit the model ({type(error).__name__}: {first_line(error)}). "
            f"Got {describe_inputs(inputs)}; the model's weights are {_describe_weights(model)}. "
            "Pass a tuple of tensors in the order of forward()'s arguments, or a dict of keyword tensors, "
            "with the shapes, dtypes and device the model expects"
        ) from error


def _check_materialized(model: nn.Module) -> None:
    on_meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if on_meta:
        raise InputError(
            f"{len(on_meta)} parameters and buffers of {model.__class__.__name__} are on the meta device "
            f"(e.g. '{on_meta[0]}'): they have shapes but no values, so there is nothing to compress. "
            "Materialize the weights first, e.g. model.to_empty(device='cpu') then "
            "model.load_state_dict(state_dict), or load the model without device='meta'"
        )


def _check_same_device(model: nn.Module, inputs: Inputs) -> None:
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    if len(devices) != 1:
        return  # no weights, or a model spread over devices on purpose: let the model decide
    device = devices.pop()
    for name, tensor in named_tensors(inputs):
        if tensor.device != device:
            raise InputError(
                f"example input {name} is on device '{tensor.device}' but the model's weights are on '{device}'; "
                f"move the inputs with .to('{device}') (or the model with .to('{tensor.device}'))"
            )


def _describe_weights(model: nn.Module) -> str:
    weights = list(model.parameters())
    if not weights:
        return "absent (the model has no parameters)"
    dtypes = sorted({str(w.dtype) for w in weights})
    devices = sorted({str(w.device) for w in weights})
    return f"{'/'.join(dtypes)} on {'/'.join(devices)}"


def capture(model: nn.Module, inputs: Inputs, reference: list[torch.Tensor] | None = None) -> Capture:
    """Capture `model` as a GraphModule that reproduces it on `inputs`."""
    if reference is None:
        reference = check_inputs_fit(model, inputs)
    try:
        gm = symbolic_capture(model, inputs)
        _check_reproduces(gm, inputs, reference)
        return Capture(gm, "symbolic_trace", "symbolic tracing succeeded")
    except Exception as error:
        trace_error = error
        why = f"symbolic tracing failed ({type(error).__name__}: {first_line(error)})"
    try:
        gm = export_capture(model, inputs)
        _check_reproduces(gm, inputs, reference)
    except Exception as export_error:
        where = _user_code(export_error, model) or _user_code(trace_error, model)
        raise CaptureError(
            f"could not capture {model.__class__.__name__}: {why}; torch.export failed too "
            f"({type(export_error).__name__}: {first_line(export_error)})."
            + (f" The construct that stops both is at {where}." if where else "")
            + " Rewrite it without Python control flow on tensor values (e.g. torch.where instead of "
            "`if tensor:`), or register the module that holds it with "
            "tunecomp_fx.capture.register_leaf_module(Type, reason) so that it stays one opaque call"
        ) from export_error
    batch = "a dynamic batch dimension" if _dynamic_batch(gm) else (
        "the batch size of the example inputs fixed (dim 0 cannot vary in this model): the result runs only at that size"
    )
    return Capture(gm, "torch.export", f"{why}; used torch.export with {batch}")


def _dynamic_batch(gm: fx.GraphModule) -> bool:
    inputs = [node.meta.get("val") for node in gm.graph.nodes if node.op == "placeholder"]
    return any(isinstance(v, torch.Tensor) and v.dim() > 0 and isinstance(v.shape[0], torch.SymInt) for v in inputs)


def _check_reproduces(gm: fx.GraphModule, inputs: Inputs, reference: list[torch.Tensor]) -> None:
    with torch.no_grad():
        outputs = flatten_outputs(call_model(gm, inputs))
    if len(outputs) != len(reference) or not all(
        o.shape == r.shape and torch.allclose(o.float(), r.float(), rtol=1e-4, atol=1e-5, equal_nan=True)
        for o, r in zip(outputs, reference)
    ):
        raise CaptureError("the captured graph does not reproduce the model's outputs")


_LIBRARY_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))


def _user_code(error: BaseException, model: nn.Module) -> str | None:
    """Where in the model's own code `error` (or its cause) was raised: file:line, the module's name
    and class, and the line of source; None when no frame of the traceback is the model's code."""
    module_names = {id(module): name for name, module in model.named_modules()}
    innermost = None
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for frame, line in traceback.walk_tb(error.__traceback__):
            filename = frame.f_code.co_filename
            if filename.startswith(_LIBRARY_DIRS) or not os.path.isfile(filename):
                continue
            code = frame.f_code
            owner = frame.f_locals.get(code.co_varnames[0]) if code.co_argcount else None
            innermost = (filename, line, code.co_name, owner)
        error = error.__cause__ or error.__context__
    if innermost is None:
        return None
    filename, line, function, owner = innermost
    source = linecache.getline(filename, line).strip()
    if isinstance(owner, nn.Module) and id(owner) in module_names:
        name = module_names[id(owner)]
        function = f"{type(owner).__name__}.{function}" + (f" of module '{name}'" if name else " (the root module)")
    return f"{filename}:{line} in {function}: `{source}`"
